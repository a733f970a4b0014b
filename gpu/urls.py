from django.urls import path

from gpu import views

app_name = "gpu"
urlpatterns = [
    path("", views.index, name="index"),
    path("health", views.health, name="health"),
    path("test-connection", views.test_connection, name="test_connection"),
    path("config", views.config_update, name="config"),
    path("instances", views.instances, name="instances"),
    path("instances/<uuid:instance_id>/destroy", views.destroy, name="destroy"),
    path("instances/<uuid:instance_id>/auto-destroy", views.auto_destroy, name="auto_destroy"),
    path("adopt", views.adopt, name="adopt"),
    path("offers", views.offers, name="offers"),
    path("rent", views.rent, name="rent"),
]
