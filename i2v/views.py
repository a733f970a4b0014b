from django.contrib.auth import views as auth_views
from django.core.cache import cache
from django.http import HttpResponse, JsonResponse
from django.views import defaults

LOGIN_ATTEMPTS = 10
LOGIN_WINDOW = 300


class RateLimitedLoginView(auth_views.LoginView):
    """Django's login, refusing more than LOGIN_ATTEMPTS failures per client per window."""

    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def _key(self):
        return f"login-fail:{self.request.META.get('REMOTE_ADDR', '')}"

    def post(self, request, *args, **kwargs):
        if cache.get(self._key(), 0) >= LOGIN_ATTEMPTS:
            return HttpResponse(
                "Too many failed logins from this address. Wait a few minutes and try again.",
                status=429,
                content_type="text/plain",
            )
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        key = self._key()
        cache.add(key, 0, LOGIN_WINDOW)
        try:
            cache.incr(key)
        except ValueError:
            cache.set(key, 1, LOGIN_WINDOW)
        return super().form_invalid(form)


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
