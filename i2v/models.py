"""The i2v app's models live in i2v.core (apps may import it); importing them here registers them."""

from i2v.core.tokens import ApiToken  # noqa: F401
from i2v.core.webhook_secrets import WebhookSecret  # noqa: F401
