from django.db import migrations, models


class Migration(migrations.Migration):
    """ModelFile moves from generation to gpu (the model manifest is the GPU side's); its table stays."""

    dependencies = [("gpu", "0005_save_costs_schedule"), ("generation", "0001_initial")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="ModelFile",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("name", models.CharField(max_length=100, unique=True)),
                        ("filename", models.CharField(max_length=300)),
                        ("folder", models.CharField(help_text="ComfyUI models/ folder, e.g. unet, loras, vae", max_length=64)),
                        ("r2_key", models.CharField(max_length=500)),
                        ("size", models.BigIntegerField(blank=True, null=True)),
                        ("sha256", models.CharField(blank=True, max_length=64)),
                        ("source", models.CharField(blank=True, max_length=500)),
                    ],
                    options={"ordering": ["name"], "db_table": "generation_modelfile"},
                ),
            ],
            database_operations=[],
        ),
    ]
