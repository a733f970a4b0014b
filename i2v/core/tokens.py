import copy
import hashlib
import secrets
import threading
import time

from django.conf import settings
from django.db import models
from django.utils import timezone

# Imported here so Django registers it with this app; apps import it from i2v.core.


TOKEN_PREFIX = "i2v_"


def hash_token(key: str) -> str:
    # Tokens are 256-bit random strings, so a plain SHA-256 is enough (no stretching needed).
    return hashlib.sha256(key.encode()).hexdigest()


class _TokenMemo:
    """Per-process memory of recently accepted tokens: key hash → (expiry, user). A hit skips the
    database on the request path (the token lookup was most of `GET /api/jobs/{id}`'s cost).
    Changes made in this process (revoke, a user or token saved or deleted) clear it at once;
    a change made in another process (another gunicorn worker, a shell) takes effect within
    `I2V_TOKEN_CACHE_SECONDS` (0 turns the memory off). Only accepted tokens are remembered."""

    MAX_ENTRIES = 10_000
    clock = staticmethod(time.monotonic)

    def __init__(self):
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, key_hash):
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        expires, user = entry
        if self.clock() >= expires:
            self._entries.pop(key_hash, None)
            return None
        return copy.copy(user)  # each request gets its own instance

    def put(self, key_hash, user):
        seconds = settings.I2V_TOKEN_CACHE_SECONDS
        if seconds <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_hash] = (self.clock() + seconds, copy.copy(user))

    def clear(self, *args, **kwargs):
        with self._lock:
            self._entries.clear()


token_memo = _TokenMemo()


class ApiToken(models.Model):
    """An API token; only its SHA-256 is stored. The plaintext is shown once, at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, editable=False, help_text="First characters, to tell tokens apart.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"
        ordering = ["-created_at"]

    def __str__(self):
        state = "revoked" if self.revoked_at else "active"
        return f"{self.prefix}… ({self.user}, {state})"

    @classmethod
    def issue(cls, user, name=""):
        """Create a token for `user`; returns (row, plaintext). The plaintext is not stored."""
        key = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = cls.objects.create(user=user, name=name, prefix=key[:10], key_hash=hash_token(key))
        return row, key

    @classmethod
    def authenticate(cls, key: str):
        """The active user owning `key`, or None."""
        if not key or len(key) > 200:
            return None
        key_hash = hash_token(key)
        user = token_memo.get(key_hash)
        if user is not None:
            return user
        row = cls.objects.select_related("user").filter(key_hash=key_hash, revoked_at=None).first()
        if row is None or not row.user.is_active:
            return None
        now = timezone.now()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            cls.objects.filter(pk=row.pk).update(last_used_at=now)
        token_memo.put(key_hash, row.user)
        return row.user

    def revoke(self):
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])  # post_save clears token_memo


# A token or user changed or deleted in this process: forget every remembered token at once.
for _model in (ApiToken, settings.AUTH_USER_MODEL):
    models.signals.post_save.connect(token_memo.clear, sender=_model, dispatch_uid=f"token-memo-save-{_model}")
    models.signals.post_delete.connect(token_memo.clear, sender=_model, dispatch_uid=f"token-memo-delete-{_model}")
