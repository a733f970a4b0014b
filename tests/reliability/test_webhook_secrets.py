"""Webhook secrets of each user's own (Standard Webhooks `whsec_…`): shown once, encrypted at rest,
rotatable with the old secret signing for 24 h more; deliveries verify with the `standardwebhooks`
library under the owner's secret and under nothing else (not SECRET_KEY, not another user's).
fal.ai's callback tokens come from a key derived for them alone."""

import base64
import hashlib
import hmac
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from generation import fal_runner
from generation.models import VideoJob
from generation.webhooks import deliver
from i2v.core.webhook_secrets import WebhookSecret
from tests.generation.test_runner import make_job


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps (headers, body) of each POST."""

    def __init__(self):
        received = self.received = []

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def delivered(user, receiver):
    job = make_job(user, status=VideoJob.Status.COMPLETED, webhook_url=receiver.url)
    deliver(str(job.id), 1)
    assert job.webhook_deliveries.get().ok
    return receiver.received[-1]


def test_secret_is_shown_once_by_the_api_and_never_again(api, user):
    assert api.get("/api/account/webhook-secret").json()["configured"] is False
    resp = api.post("/api/account/webhook-secret")
    body = resp.json()
    assert resp.status_code == 201 and body["secret"].startswith("whsec_") and body["configured"] is True
    shown = api.get("/api/account/webhook-secret")
    assert body["secret"] not in shown.content.decode() and shown.json()["prefix"] == body["secret"][:12]


def test_secret_is_shown_once_on_the_account_page(client, user):
    client.force_login(user)
    page = client.post("/account/").content.decode()
    secret = page.split('<code id="new-secret">', 1)[1].split("<", 1)[0]
    assert secret.startswith("whsec_")
    assert secret not in client.get("/account/").content.decode()


def test_secret_is_encrypted_at_rest(user):
    secret = WebhookSecret.rotate(user)
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM i2v_webhooksecret")
        stored = cursor.fetchone()[0]
    assert secret not in stored and secret.removeprefix("whsec_") not in stored
    assert WebhookSecret.signing_secrets(user) == [secret]


def test_delivery_verifies_with_the_owners_secret_only(user, other_user, settings):
    secret = WebhookSecret.rotate(user)
    other = WebhookSecret.rotate(other_user)
    with Receiver() as receiver:
        headers, body = delivered(user, receiver)
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= {k.lower() for k in headers}
    assert Webhook(secret).verify(body, headers)["event"] == "job.completed"
    for wrong in (other, base64.b64encode(settings.SECRET_KEY.encode()).decode()):
        with pytest.raises(WebhookVerificationError):
            Webhook(wrong).verify(body, headers)


def test_receiver_rejects_a_replayed_delivery_older_than_five_minutes(user):
    secret = WebhookSecret.rotate(user)
    with Receiver() as receiver:
        headers, body = delivered(user, receiver)
    old = {k.lower(): v for k, v in headers.items()}
    old["webhook-timestamp"] = str(int(old["webhook-timestamp"]) - 6 * 60)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, old)


def test_rotation_keeps_the_old_secret_valid_for_24_hours(user):
    old = WebhookSecret.rotate(user)
    new = WebhookSecret.rotate(user)
    with Receiver() as receiver:
        headers, body = delivered(user, receiver)
        Webhook(old).verify(body, headers)
        Webhook(new).verify(body, headers)
        rotated = WebhookSecret.objects.get(user=user, expires_at__isnull=False)
        assert timedelta(hours=23, minutes=59) < rotated.expires_at - timezone.now() <= timedelta(hours=24)
        WebhookSecret.objects.filter(pk=rotated.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        headers, body = delivered(user, receiver)
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)


def test_webhook_url_needs_a_secret_first(api, user):
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": "http://127.0.0.1:9/a.png",
                                            "webhook_url": "http://127.0.0.1:9/hook"})
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("webhook_url") and "signing secret" in resp.json()["detail"]


def test_fal_callback_token_is_not_keyed_by_secret_key(settings):
    job_id = "0f28e096-d3ee-4f75-807a-8f63591d32f0"
    with_secret_key = hmac.new(settings.SECRET_KEY.encode(), f"fal-webhook:{job_id}".encode(), hashlib.sha256)
    token = fal_runner.webhook_token(job_id)
    assert len(token) == 32 and token != with_secret_key.hexdigest()[:32]
    assert token == fal_runner.webhook_token(job_id)  # stable, so the callback can be checked
