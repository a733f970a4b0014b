"""Each user's webhook signing secret (Standard Webhooks `whsec_…`), encrypted at rest.

A model of the `i2v` app (i2v/models.py imports it, so Django registers it there) kept in
i2v.core, the one part of the project package the apps may import: generation signs with it.
"""

import base64
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from i2v.core.crypto import EncryptedTextField

WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_ROTATION_GRACE = timedelta(hours=24)


class WebhookSecret(models.Model):
    """A user's webhook signing secret (Standard Webhooks `whsec_…`), encrypted at rest. Shown
    once, when made. Rotating keeps the previous secret signing for WEBHOOK_ROTATION_GRACE, so a
    receiver can switch without missing a delivery."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_secrets")
    secret = EncryptedTextField(purpose="webhook-secret", editable=False)
    prefix = models.CharField(max_length=16, editable=False, help_text="First characters, to tell secrets apart.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Set when rotated; empty while current.")

    class Meta:
        app_label = "i2v"
        ordering = ["-created_at"]
        # signing_secrets(): a user's secrets still valid.
        indexes = [models.Index(fields=["user", "expires_at"])]

    def __str__(self):
        return f"{self.prefix}… ({self.user}, {'current' if self.expires_at is None else 'rotated'})"

    @classmethod
    def rotate(cls, user) -> str:
        """A new current secret for `user`; the previous one signs for 24 h more. Returns the new
        secret, which is not shown again."""
        raw = WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
        now = timezone.now()
        with transaction.atomic():
            cls.objects.filter(user=user, expires_at=None).update(expires_at=now + WEBHOOK_ROTATION_GRACE)
            cls.objects.filter(user=user, expires_at__lte=now).delete()
            cls.objects.create(user=user, secret=raw, prefix=raw[:12])
        return raw

    @classmethod
    def state(cls, user) -> dict:
        """Whether `user` has a current secret, its prefix and age, and until when a rotated one signs."""
        rows = list(cls.objects.filter(user=user).filter(models.Q(expires_at=None) | models.Q(expires_at__gt=timezone.now())))
        current = next((r for r in rows if r.expires_at is None), None)
        return {"configured": current is not None, "prefix": current.prefix if current else None,
                "created_at": current.created_at if current else None,
                "previous_valid_until": max((r.expires_at for r in rows if r.expires_at), default=None)}

    @classmethod
    def signing_secrets(cls, user) -> list[str]:
        """The secrets a delivery to `user` is signed with now: the current one first."""
        now = timezone.now()
        rows = cls.objects.filter(user=user).filter(models.Q(expires_at=None) | models.Q(expires_at__gt=now))
        return [row.secret for row in sorted(rows, key=lambda r: (r.expires_at is not None, r.expires_at or now))]
