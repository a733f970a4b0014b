import math

from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth.signals import user_login_failed
from django.utils import timezone
from ninja.errors import HttpError
from ninja.security import HttpBearer, SessionAuth

from i2v.core.tokens import ApiToken

# The name API-token failures are counted under in django-axes (a token has no username).
API_TOKEN_USERNAME = "(api token)"


def client_address(request) -> str:
    """The client's address (AXES_CLIENT_IP_CALLABLE). Behind a proxy (DJANGO_BEHIND_PROXY) the last
    X-Forwarded-For entry, the one the proxy itself appended: earlier entries come from the client
    and can say anything."""
    if settings.I2V_BEHIND_PROXY:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if forwarded:
            return forwarded[-1]
    return request.META.get("REMOTE_ADDR", "")


def lockout_seconds(request, credentials=None) -> int:
    """Seconds until the lock on this username and address lifts (at least 1)."""
    cool_off = get_cool_off(request)
    if cool_off is None:  # no AXES_COOLOFF_TIME: locked until an admin unlocks; retry in an hour at the earliest
        return 3600
    username = (credentials or {}).get("username") or request.POST.get("username", "")
    last = (AccessAttempt.objects.filter(username=username, ip_address=client_address(request))
            .order_by("-attempt_time").values_list("attempt_time", flat=True).first())
    if last is None:
        return math.ceil(cool_off.total_seconds())
    return max(1, math.ceil((last + cool_off - timezone.now()).total_seconds()))


def lockout_message(seconds: int, what: str = "failed logins for this username") -> str:
    minutes = math.ceil(seconds / 60)
    return (f"Too many {what} from your address. Try again in {minutes} minute{'s' if minutes != 1 else ''}, "
            "or ask an admin to unlock it.")


class LockedOut(HttpError):
    """A 429 whose answer carries Retry-After (i2v.api's handler adds it)."""

    def __init__(self, message: str, wait: int):
        super().__init__(429, message)
        self.wait = wait


class TokenAuth(HttpBearer):
    """`Authorization: Bearer <token>`; tokens are looked up by their SHA-256. Wrong tokens count as
    failed logins in django-axes, per client address: past the limit that address gets 429 for
    every wrong token. A right token is always accepted, so no one is locked out by a neighbour."""

    def authenticate(self, request, token):
        user = ApiToken.authenticate(token)
        if user is not None:
            request.user = user
            return user
        credentials = {"username": API_TOKEN_USERNAME}
        if not AxesProxyHandler.is_allowed(request, credentials):
            seconds = lockout_seconds(request, credentials)
            raise LockedOut(lockout_message(seconds, "wrong API tokens"), seconds)
        user_login_failed.send(sender=TokenAuth, credentials=credentials, request=request)
        return None


class CsrfSessionAuth(SessionAuth):
    """The browser session, with Django's CSRF check on unsafe methods, for requests that have a
    logged-in session only: a script without a (valid) token gets the 401 that says so, not
    a "CSRF check Failed" about a cookie it never had."""

    def __call__(self, request):
        if not request.user.is_authenticated:
            return None
        return super().__call__(request)


token_auth = TokenAuth()
session_auth = CsrfSessionAuth(csrf=True)
API_AUTH = [token_auth, session_auth]


def bearer_user(request):
    """The user of a Bearer token on a plain Django view, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return ApiToken.authenticate(key.strip())
