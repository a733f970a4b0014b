from django.core.management.base import BaseCommand

from gpu import demand, lifecycle, reconciler
from gpu.models import GpuConfig


class Command(BaseCommand):
    help = "Destroy idle vast.ai instances now (what the every-minute schedule does), then reconcile."

    def add_arguments(self, parser):
        parser.add_argument("--no-reconcile", action="store_true")

    def handle(self, *args, **options):
        config = GpuConfig.get()
        reaped = demand.reap_idle()
        for instance in reaped:
            self.stdout.write(f"Destroyed idle instance {instance.vast_id} ({instance.gpu_name}, ${instance.cost_usd:.4f}).")
        if not reaped:
            self.stdout.write(f"No instance has been idle for {config.idle_minutes} minutes.")
        if options["no_reconcile"]:
            return
        try:
            report = reconciler.reconcile()
        except lifecycle.ProvisioningError as exc:
            self.stderr.write(f"Reconcile skipped: {exc}")
            return
        changes = {key: value for key, value in report.items() if value}
        self.stdout.write(f"Reconciled: {changes}" if changes else "Reconciled: nothing to do.")
