"""Signed webhooks on a job's terminal state, retried with backoff, every attempt recorded.

Each POST carries the job JSON and `X-I2V-Signature: t=<unix time>,v1=<hex>` where v1 is
HMAC-SHA256 over "<t>.<raw body>" with the shared secret (I2V_WEBHOOK_SECRET).
"""

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta

import httpx
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from generation.models import VideoJob, WebhookDelivery
from gpu import netguard

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 5
BACKOFF = [0, 30, 120, 600, 1800]  # seconds before attempts 1..5


def sign(body: bytes, timestamp: int, secret: str = None) -> str:
    secret = (secret or settings.I2V_WEBHOOK_SECRET).encode()
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def enqueue_webhook(job, attempt=1):
    if not job.webhook_url:
        return
    from django_q.models import Schedule
    from django_q.tasks import async_task

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
    body = json.dumps({"event": f"job.{job.status}", "job": job_json(job)}, cls=DjangoJSONEncoder).encode()
    ts = int(time.time())
    started = time.monotonic()
    row = WebhookDelivery(job=job, attempt=attempt, url=job.webhook_url)
    try:
        with netguard.http_client(timeout=httpx.Timeout(10.0, connect=5.0)) as http:
            resp = http.post(job.webhook_url, content=body, headers={
                "Content-Type": "application/json", "X-I2V-Signature": sign(body, ts),
                "X-I2V-Delivery": f"{job.id}:{attempt}", "User-Agent": "i2v-webhooks/1",
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
