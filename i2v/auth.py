from ninja.security import HttpBearer, SessionAuth

from i2v.models import ApiToken


class TokenAuth(HttpBearer):
    """`Authorization: Bearer <token>`; tokens are looked up by their SHA-256."""

    def authenticate(self, request, token):
        user = ApiToken.authenticate(token)
        if user is not None:
            request.user = user
        return user


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
