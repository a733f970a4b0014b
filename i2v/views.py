"""Login (throttled by django-axes), the lockout answer, and the account page."""

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views import defaults
from django.views.decorators.http import require_http_methods

from i2v.core.auth import lockout_message, lockout_seconds
from i2v.core.webhook_secrets import WebhookSecret


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True


def locked_out(request, original_response=None, credentials=None) -> HttpResponse:
    """django-axes' answer once a username is locked for this client address (AXES_LOCKOUT_CALLABLE):
    429, Retry-After, and when to try again; other usernames and other addresses are not affected."""
    seconds = lockout_seconds(request, credentials)
    message = lockout_message(seconds)
    if request.path.startswith("/api/"):
        response = JsonResponse({"detail": message}, status=429)
    else:
        response = render(request, "registration/login.html", {"locked_message": message}, status=429)
    response["Retry-After"] = str(seconds)
    return response

def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def not_found(request, exception=None):
    """404: JSON under /api/ (scripts parse it), Django's page elsewhere."""
    if _is_api(request):
        return JsonResponse({"detail": f"No such API path: {request.method} {request.path} (see /api/docs)."}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request):
    """500: JSON under /api/, Django's page elsewhere."""
    if _is_api(request):
        return JsonResponse({"detail": "Internal server error; the server log has the details."}, status=500)
    return defaults.server_error(request)


@require_http_methods(["GET", "POST"])
@login_required
def account(request):
    """The user's webhook signing secret: whether one is set, and a button that makes a new one
    (shown once, on the answer to that POST)."""
    new_secret = WebhookSecret.rotate(request.user) if request.method == "POST" else None
    return render(request, "account.html", {"state": WebhookSecret.state(request.user), "new_secret": new_secret})
