import uuid

from django.core.management.base import BaseCommand, CommandError

from gpu import lifecycle
from gpu.models import VastInstance


class Command(BaseCommand):
    help = "Destroy one vast.ai instance (billing stops), by its vast.ai id or its i2v UUID."

    def add_arguments(self, parser):
        parser.add_argument("id", help="the vast.ai instance id, or the i2v instance UUID")
        parser.add_argument("--reason", default="destroyed by an operator (vast_destroy)")

    def handle(self, *args, id, reason, **options):
        value = id.strip()
        try:
            lookup = {"vast_id": int(value)} if value.isdigit() else {"pk": uuid.UUID(value)}
        except ValueError:
            raise CommandError(f"{value!r} is neither a vast.ai id nor a UUID") from None
        instance = VastInstance.objects.filter(**lookup).first()
        if instance is None:
            raise CommandError(f"No instance {value} in the database (`vast_instances --all` lists them; "
                               "`reconcile` destroys rentals the database does not know).")
        try:
            instance = lifecycle.destroy_instance(instance, reason)
        except lifecycle.ProvisioningError as exc:
            raise CommandError(f"{exc} (it stays 'destroying'; the reconciler retries)") from None
        self.stdout.write(f"Instance {instance.vast_id} is {instance.state}; it cost ${instance.cost_usd:.4f}.")
