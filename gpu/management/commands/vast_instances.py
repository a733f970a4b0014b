from django.core.management.base import BaseCommand
from django.utils import timezone

from gpu import lifecycle, offers
from gpu.models import GpuConfig, VastInstance


class Command(BaseCommand):
    help = "List vast.ai instances with their state and cost so far (live ones; --all for every one)."

    def add_arguments(self, parser):
        parser.add_argument("--all", action="store_true", help="include destroyed and failed instances")

    def handle(self, *args, **options):
        qs = VastInstance.objects.order_by("-created_at")
        if not options["all"]:
            qs = qs.exclude(state=VastInstance.State.DESTROYED).exclude(state=VastInstance.State.FAILED, destroyed_at__isnull=False)
        now = timezone.now()
        rows = [lifecycle.instance_json(i, now) for i in qs[:500]]
        if not rows:
            self.stdout.write("No vast.ai instances." if options["all"] else "No live vast.ai instances (--all for history).")
        else:
            self.stdout.write(f"{'vast id':>10}  {'state':<10} {'gpu':<12} {'$/hour':>7} {'cost':>9}  {'jobs':>4}  {'uuid':<36}  status")
            for r in rows:
                self.stdout.write(
                    f"{r['vast_id'] or '-':>10}  {r['state']:<10} {r['gpu_name'][:12]:<12} {r['dph']:>7.3f} "
                    f"${r['cost_usd']:>8.4f}  {r['active_jobs']:>4}  {r['id']:<36}  {r['error'] or r['status_msg'] or ''}"
                )
        config = GpuConfig.get()
        self.stdout.write(f"Spent today (UTC): ${offers.spend_today(now):.4f} of ${config.max_daily_spend:.2f}")
