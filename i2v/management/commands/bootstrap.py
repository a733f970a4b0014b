import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from i2v.core.tokens import ApiToken


class Command(BaseCommand):
    help = "First start: create the `admin` superuser and an API token and print both once."

    def handle(self, **options):
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            return
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser("admin", "", password)
        _, key = ApiToken.issue(user, name="first start")
        line = "=" * 64
        self.stdout.write(
            f"{line}\n i2v first start: save these now, they are not shown again.\n"
            f"   admin user:     admin\n   admin password: {password}\n   API token:      {key}\n{line}"
        )
