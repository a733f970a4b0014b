"""Keys derived for one purpose each, and a model field encrypted at rest with one of them.

Each purpose ("gpu.comfyui_token", "fal-webhook-token", ...) gets its own key, derived from
SECRET_KEY with HKDF and the purpose as label: a key that leaks for one use is no key for
another, and SECRET_KEY itself never leaves the server. SECRET_KEY_FALLBACKS keep decrypting
values written before a key change.
"""

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models


def derive_key(purpose: str, secret: str | None = None) -> bytes:
    """32 bytes for `purpose`, from SECRET_KEY (or `secret`)."""
    secret = settings.SECRET_KEY if secret is None else secret
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"i2v", info=purpose.encode()).derive(secret.encode())


@functools.lru_cache(maxsize=32)
def _fernet(purpose: str, secrets: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(base64.urlsafe_b64encode(derive_key(purpose, s))) for s in secrets])


def fernet(purpose: str) -> MultiFernet:
    return _fernet(purpose, (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])))


def encrypt(purpose: str, value: str) -> str:
    return fernet(purpose).encrypt(value.encode()).decode()


def decrypt(purpose: str, token: str) -> str:
    """The plaintext; raises InvalidToken for a value this server's keys did not write."""
    return fernet(purpose).decrypt(token.encode()).decode()


def is_encrypted(purpose: str, value: str) -> bool:
    try:
        decrypt(purpose, value)
    except (InvalidToken, ValueError):
        return False
    return True


class EncryptedTextField(models.TextField):
    """A text column stored as a Fernet token under the key derived for `purpose`; reads give
    the plaintext. The empty string stays empty (so "is it set?" needs no key). A value no key
    of this server can read (SECRET_KEY changed without a fallback) reads as empty: the secret
    must be entered again, which is better than a server that cannot start."""

    def __init__(self, *args, purpose: str, **kwargs):
        self.purpose = purpose
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        kwargs["purpose"] = self.purpose
        return name, path, args, kwargs

    def from_db_value(self, value, expression, connection):
        if not value:
            return value
        try:
            return decrypt(self.purpose, value)
        except (InvalidToken, ValueError):
            return ""

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if not value:
            return value
        return encrypt(self.purpose, value)
