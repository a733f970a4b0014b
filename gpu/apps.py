from django.apps import AppConfig


class GpuConfigApp(AppConfig):
    name = "gpu"
    verbose_name = "GPU"
