"""The NinjaAPI root: every router is mounted here, under /api."""

import logging
import math

from datetime import datetime
from typing import Optional

from django.http import Http404
from ninja import Field, NinjaAPI, Schema
from ninja.responses import Status
from ninja.errors import AuthenticationError, HttpError, Throttled, ValidationError

from i2v.core.auth import API_AUTH, LockedOut
from i2v.core.webhook_secrets import WebhookSecret

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


@api.exception_handler(Throttled)
def on_throttled(request, exc):
    wait = math.ceil(exc.wait or 1)
    return api.create_response(
        request, {"detail": f"Too many requests: this route allows a limited number per user and minute. "
                            f"Try again in {wait} seconds."}, status=429)


@api.exception_handler(LockedOut)
def on_locked_out(request, exc):
    response = api.create_response(request, {"detail": str(exc.message)}, status=429)
    response["Retry-After"] = str(exc.wait)
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


class WebhookSecretOut(Schema):
    configured: bool
    prefix: Optional[str]
    created_at: Optional[datetime]
    previous_valid_until: Optional[datetime] = Field(description="The rotated-out secret still signs until then.")


class NewWebhookSecretOut(WebhookSecretOut):
    secret: str = Field(description="Shown this once: store it where your webhook receiver reads it.")


@api.get("/account/webhook-secret", response=WebhookSecretOut, tags=["account"],
         summary="Your webhook signing secret (whether one is set; never the secret itself)")
def get_webhook_secret(request):
    return WebhookSecret.state(request.auth)


@api.post("/account/webhook-secret", response={201: NewWebhookSecretOut}, tags=["account"],
          summary="Create or rotate your webhook signing secret (the old one stays valid 24 h)")
def rotate_webhook_secret(request):
    secret = WebhookSecret.rotate(request.auth)
    return Status(201, {**WebhookSecret.state(request.auth), "secret": secret})


def _mount():
    from generation.api import router as generation_router
    from gpu.api import router as gpu_router

    api.add_router("/", gpu_router)
    api.add_router("/", generation_router)


_mount()
