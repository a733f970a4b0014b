"""Per-user request rates for the API routes that spend money or reach out (django-ninja's
throttling), counted in the shared "throttle" cache so every web process sees the same count."""

from django.conf import settings
from django.core.cache import caches
from django.utils.functional import SimpleLazyObject
from ninja.throttling import UserRateThrottle


class UserRate(UserRateThrottle):
    """At most the rate in settings.<setting> ("30/m") per user, for the routes sharing `scope`."""

    cache = SimpleLazyObject(lambda: caches["throttle"])

    def __init__(self, scope: str, setting: str):
        self.scope = scope
        self.setting = setting
        super().__init__(getattr(settings, setting))

    def allow_request(self, request) -> bool:
        # The setting is read on each request, so a changed value (or a test's) applies at once.
        self.rate = getattr(settings, self.setting)
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request)


def generate_rate() -> UserRate:
    return UserRate("generate", "I2V_RATE_GENERATE")


def probe_rate() -> UserRate:
    return UserRate("probe", "I2V_RATE_PROBE")
