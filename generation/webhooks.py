"""Signed webhooks on a job's terminal state, retried with backoff, every attempt recorded.

Signed as the Standard Webhooks spec says (https://www.standardwebhooks.com), with the
`standardwebhooks` library: headers `webhook-id` (the same on every retry of one event),
`webhook-timestamp` and `webhook-signature`, an HMAC-SHA256 under the job owner's own `whsec_…`
secret (i2v.core.webhook_secrets). During the 24 h after a rotation each delivery carries a
signature under the old secret and one under the new.
"""

import json
import logging
import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import httpx
from standardwebhooks.webhooks import Webhook
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from generation.models import VideoJob, WebhookDelivery
from gpu import netguard
from i2v.core.webhook_secrets import WebhookSecret

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 5
BACKOFF = [0, 30, 120, 600, 1800]  # seconds before attempts 1..5


def signature_headers(secrets: list[str], msg_id: str, body: bytes, when: datetime) -> dict:
    """The Standard Webhooks headers of `body`, signed under each of `secrets`."""
    signatures = [Webhook(secret).sign(msg_id, when, body.decode()) for secret in secrets]
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": " ".join(signatures)}


def enqueue_webhook(job, attempt=1):
    if not job.webhook_url:
        return
    from django_q.models import Schedule

    from i2v.core.queue import async_task

    delay = BACKOFF[min(attempt, len(BACKOFF)) - 1]
    if delay == 0:
        transaction.on_commit(lambda: async_task("generation.tasks.deliver_webhook", str(job.id), attempt))
    else:
        Schedule.objects.create(
            func="generation.tasks.deliver_webhook", args=f"'{job.id}',{attempt}",
            schedule_type=Schedule.ONCE, next_run=timezone.now() + timedelta(seconds=delay),
            name=f"webhook {job.id} #{attempt}",
        )


def deliver(job_id, attempt):
    from generation.domain import job_json

    job = VideoJob.objects.filter(pk=job_id).first()
    if job is None or not job.webhook_url or not job.is_terminal:
        return
    if WebhookDelivery.objects.filter(job=job, attempt=attempt).exists() or job.webhook_deliveries.filter(ok=True).exists():
        return  # this attempt already ran (a redelivered task), or an earlier one succeeded
    body = json.dumps({"event": f"job.{job.status}", "job": job_json(job, settings.I2V_PUBLIC_URL)}, cls=DjangoJSONEncoder).encode()
    started = time.monotonic()
    row = WebhookDelivery(job=job, attempt=attempt, url=job.webhook_url)
    secrets = WebhookSecret.signing_secrets(job.owner_id)
    if not secrets:
        row.error = "Not sent: the job's owner has no webhook secret (create one on the Account page)."
        row.save()
        return
    signed = signature_headers(secrets, f"msg_{job.id}_{job.status}", body, datetime.now(tz=dt_timezone.utc))
    try:
        with netguard.http_client(timeout=httpx.Timeout(10.0, connect=5.0)) as http:
            resp = http.post(job.webhook_url, content=body, headers={
                "Content-Type": "application/json", **signed, "User-Agent": "i2v-webhooks/1",
            })
        row.status_code = resp.status_code
        row.ok = 200 <= resp.status_code < 300
        if not row.ok:
            row.error = f"HTTP {resp.status_code}"
    except httpx.HTTPError as exc:
        row.error = netguard.blocked_reason(exc) or f"{type(exc).__name__}: could not deliver"
    row.duration_ms = int((time.monotonic() - started) * 1000)
    row.save()
    if not row.ok and attempt < MAX_ATTEMPTS:
        enqueue_webhook(job, attempt + 1)
