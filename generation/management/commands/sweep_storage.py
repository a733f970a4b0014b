from django.core.management.base import BaseCommand

from generation.sweeper import sweep_storage


class Command(BaseCommand):
    help = "Delete files under videos/ and inputs/ that no job references and that are older than I2V_SWEEP_AFTER."

    def add_arguments(self, parser):
        parser.add_argument("--older-than", type=int, default=None, help="seconds (default: I2V_SWEEP_AFTER)")
        parser.add_argument("--dry-run", action="store_true", help="list them, delete nothing")

    def handle(self, older_than, dry_run, **options):
        names = sweep_storage(older_than=older_than, dry_run=dry_run)
        for name in names:
            self.stdout.write(name)
        verb = "would delete" if dry_run else "deleted"
        self.stdout.write(f"{verb} {len(names)} orphaned file(s)")
