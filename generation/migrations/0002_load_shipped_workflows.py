from django.db import migrations


def load(apps, schema_editor):
    from generation.domain import sync_shipped_workflows

    sync_shipped_workflows(apps.get_model("generation", "Workflow"), apps.get_model("generation", "ModelFile"))


class Migration(migrations.Migration):
    dependencies = [("generation", "0001_initial")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
