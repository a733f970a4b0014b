from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from i2v.core.tokens import ApiToken


class Command(BaseCommand):
    help = "Create an API token for USER and print it (alone, on the last line)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli")

    def handle(self, username, name, **options):
        User = get_user_model()
        try:
            user = User.objects.get(username=username)
        except User.DoesNotExist:
            raise CommandError(f"No user {username!r}. Create one with `python manage.py createsuperuser`.")
        row, key = ApiToken.issue(user, name=name)
        self.stderr.write(f"Created token {row.prefix}… for {username}; it is shown once:")
        self.stdout.write(key)
