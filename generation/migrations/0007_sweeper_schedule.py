from django.db import migrations

NAME = "i2v: storage sweeper"


def add(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name=NAME, defaults={"func": "generation.sweeper.sweep_storage", "schedule_type": "H", "repeats": -1},
    )


def remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [("generation", "0006_videojob_unreachable_since")]
    operations = [migrations.RunPython(add, remove)]
