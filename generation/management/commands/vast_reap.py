from django.core.management.base import BaseCommand

from generation import scheduler
from gpu import lifecycle, reconciler
from gpu.models import GpuConfig, VastInstance


class Command(BaseCommand):
    help = ("Run a scheduling pass now (what the every-minute schedule does): destroy idle vast.ai instances, "
            "rent what the queue needs; then reconcile with vast.ai.")

    def add_arguments(self, parser):
        parser.add_argument("--no-reconcile", action="store_true")

    def handle(self, *args, **options):
        config = GpuConfig.get()
        result = scheduler.run_pass()
        scheduler.carry_out(result)
        for instance in VastInstance.objects.filter(pk__in=result.destroy):
            self.stdout.write(f"Destroyed idle instance {instance.vast_id} ({instance.gpu_name}, ${instance.cost_usd:.4f}).")
        if not result.destroy:
            self.stdout.write(f"No instance has been idle for {config.idle_minutes} minutes.")
        if result.rent:
            self.stdout.write(f"Renting {result.rent} more instance(s) for the waiting jobs.")
        if options["no_reconcile"]:
            return
        try:
            report = reconciler.reconcile()
        except lifecycle.ProvisioningError as exc:
            self.stderr.write(f"Reconcile skipped: {exc}")
            return
        changes = {key: value for key, value in report.items() if value}
        self.stdout.write(f"Reconciled: {changes}" if changes else "Reconciled: nothing to do.")
