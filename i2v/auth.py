from ninja.security import HttpBearer, SessionAuth

from i2v.models import ApiToken


class TokenAuth(HttpBearer):
    """`Authorization: Bearer <token>`; tokens are looked up by their SHA-256."""

    def authenticate(self, request, token):
        user = ApiToken.authenticate(token)
        if user is not None:
            request.user = user
        return user


token_auth = TokenAuth()
# Browser session, with Django's CSRF check on unsafe methods.
session_auth = SessionAuth(csrf=True)
API_AUTH = [token_auth, session_auth]


def bearer_user(request):
    """The user of a Bearer token on a plain Django view, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return ApiToken.authenticate(key.strip())
