from django.db import migrations

OLD, NEW = "i2v: reap idle vast.ai instances", "i2v: record vast.ai instance costs"


def forward(apps, schema_editor):
    # Idle instances are destroyed by the scheduler (generation.scheduler) now.
    apps.get_model("django_q", "Schedule").objects.filter(name=OLD).update(name=NEW, func="gpu.tasks.save_costs")


def backward(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NEW).update(name=OLD, func="gpu.tasks.reap_idle")


class Migration(migrations.Migration):
    dependencies = [("gpu", "0004_places")]
    operations = [migrations.RunPython(forward, backward)]
