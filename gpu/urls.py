from django.urls import path

app_name = "gpu"
urlpatterns = []
