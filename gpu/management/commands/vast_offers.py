from django.core.management.base import BaseCommand, CommandError

from gpu import lifecycle
from gpu import offers as vast_offers


class Command(BaseCommand):
    help = "List the cheapest vast.ai offers matching the GPU policy (admin → GPU configuration)."

    def add_arguments(self, parser):
        parser.add_argument("--limit", type=int, default=10)
        parser.add_argument("--min-vram-gb", type=float, default=None)
        parser.add_argument("--max-dph", type=float, default=None, help="maximum $/hour")
        parser.add_argument("--gpu", action="append", dest="gpu_names", help="a GPU name, e.g. 'RTX 4090' (repeatable)")

    def handle(self, *args, limit, min_vram_gb, max_dph, gpu_names, **options):
        if not 1 <= limit <= 100:
            raise CommandError("--limit must be between 1 and 100")
        try:
            offers = vast_offers.search_offers(limit=limit, min_vram_gb=min_vram_gb, max_dph=max_dph, gpu_names=gpu_names)
        except lifecycle.ProvisioningError as exc:
            raise CommandError(str(exc)) from None
        if not offers:
            self.stdout.write("No offer matches the GPU policy.")
            return
        self.stdout.write(f"{'offer':>10}  {'gpu':<14} {'vram':>6}  {'$/hour':>7}  {'reliab.':>7}  {'down':>7}  location")
        for offer in map(vast_offers.offer_json, offers):
            gpu = offer["gpu_name"] if offer["num_gpus"] == 1 else f"{offer['num_gpus']}x {offer['gpu_name']}"
            self.stdout.write(
                f"{offer['id']:>10}  {gpu:<14} {offer['vram_gb'] or 0:>4.0f}GB  {offer['dph']:>7.3f}  "
                f"{offer['reliability'] or 0:>7.3f}  {offer['inet_down'] or 0:>7.0f}  {offer['location']}"
            )
