from django.core.management.base import BaseCommand

from generation.domain import sync_shipped_workflows
from generation.models import Workflow
from gpu.models import ModelFile


class Command(BaseCommand):
    help = "Create or update the shipped workflows and the model manifest from generation/workflows/."

    def handle(self, **options):
        slugs = sync_shipped_workflows(Workflow, ModelFile)
        self.stdout.write(f"Loaded workflows: {', '.join(slugs)}")
