"""The NinjaAPI root: every router is mounted here, under /api."""

import logging

from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from i2v.auth import API_AUTH

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="i2v API",
    version="1.0",
    description="Image-to-video on Wan 2.2: ComfyUI on your GPU or vast.ai, or fal.ai. "
    "Authenticate with `Authorization: Bearer <token>`.",
    auth=API_AUTH,
    urls_namespace="api",
    docs_url="/docs",
)


def _field_name(loc):
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "file", "payload", "header")]
    return ".".join(parts) or "request"


@api.exception_handler(ValidationError)
def on_validation_error(request, exc):
    messages = []
    for err in exc.errors:
        field = _field_name(err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        messages.append(f"{field}: {msg}")
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors]
    return api.create_response(request, {"detail": "; ".join(messages), "errors": errors}, status=422)


@api.exception_handler(AuthenticationError)
def on_auth_error(request, exc):
    if request.headers.get("Authorization"):
        detail = ("The Bearer token was not accepted: it is unknown or revoked. Send 'Authorization: Bearer <token>' "
                  "with a current token (create one with `python manage.py create_api_token USER`).")
    else:
        detail = ("Authentication required: send 'Authorization: Bearer <token>' (create one with "
                  "`python manage.py create_api_token USER`) or log in.")
    response = api.create_response(request, {"detail": detail}, status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(HttpError)
def on_http_error(request, exc):
    return api.create_response(request, {"detail": str(exc.message)}, status=exc.status_code)


@api.exception_handler(Http404)
def on_not_found(request, exc):
    return api.create_response(request, {"detail": str(exc) or "Not found."}, status=404)


@api.get("/ping", auth=None, include_in_schema=False)
def ping(request):
    """Liveness probe (also the trivial endpoint of the load benchmark), with how many requests
    this process holds waiting for a job (?wait=N, Prefer: wait)."""
    from generation.waiting import waiting_now

    return {"ok": True, "waiting": waiting_now()}


def _mount():
    from generation.api import router as generation_router
    from gpu.api import router as gpu_router

    api.add_router("/", gpu_router)
    api.add_router("/", generation_router)


_mount()
