from django.urls import path

from generation import views

app_name = "generation"
urlpatterns = [
    path("", views.home, name="home"),
    path("jobs/<uuid:job_id>/video", views.job_video, name="job_video"),
]
