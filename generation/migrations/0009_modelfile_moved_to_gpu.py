from django.db import migrations, models


class Migration(migrations.Migration):
    """Workflow.model_files points at gpu.ModelFile; the same tables and columns serve."""

    dependencies = [("generation", "0008_scheduler"), ("gpu", "0006_modelfile")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="workflow",
                    name="model_files",
                    field=models.ManyToManyField(blank=True, related_name="workflows", to="gpu.modelfile"),
                ),
                migrations.DeleteModel(name="ModelFile"),
            ],
            database_operations=[],
        ),
    ]
