from django.urls import path

from generation import views

app_name = "generation"
urlpatterns = [
    path("", views.home, name="home"),
    path("generate", views.generate, name="generate"),
    path("estimate", views.estimate, name="estimate"),
    path("uploads/pending", views.pending_image, name="pending_image"),
    path("jobs/", views.job_list, name="job_list"),
    path("jobs/<uuid:job_id>/", views.job_detail, name="job_detail"),
    path("jobs/<uuid:job_id>/status", views.job_status, name="job_status"),
    path("jobs/<uuid:job_id>/badge", views.job_badge, name="job_badge"),
    path("jobs/<uuid:job_id>/cancel", views.job_cancel, name="job_cancel"),
    path("jobs/<uuid:job_id>/retry", views.job_retry, name="job_retry"),
    path("jobs/<uuid:job_id>/image", views.job_image, name="job_image"),
    path("jobs/<uuid:job_id>/video", views.job_video, name="job_video"),
]
