from django.db import migrations

SCHEDULES = {
    "i2v: reap idle vast.ai instances": "gpu.tasks.reap_idle",
    "i2v: reconcile vast.ai instances": "gpu.tasks.reconcile",
}


def add(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    for name, func in SCHEDULES.items():
        Schedule.objects.update_or_create(
            name=name, defaults={"func": func, "schedule_type": "I", "minutes": 1, "repeats": -1},
        )


def remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name__in=list(SCHEDULES)).delete()


class Migration(migrations.Migration):
    dependencies = [("gpu", "0002_provisioning"), ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more")]
    operations = [migrations.RunPython(add, remove)]
