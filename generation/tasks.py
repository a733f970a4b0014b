"""django-q2 entry points: thin, idempotent, take primitive ids."""

import logging
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from generation import runner
from generation.models import VideoJob

log = logging.getLogger(__name__)


def enqueue(func, *args):
    from django_q.tasks import async_task

    async_task(func, *args, group="jobs")


def run_job(job_id):
    """Advance one job for at most one slice, then hand it back to the queue if unfinished.

    A lease on the row makes a duplicate delivery (broker redelivery, the watchdog) a no-op
    while another worker holds the job.
    """
    slice_seconds = settings.I2V_FOLLOW_SLICE
    token = uuid.uuid4().hex
    now = timezone.now()
    got = VideoJob.objects.filter(
        Q(lease_until__isnull=True) | Q(lease_until__lt=now), pk=job_id, status__in=VideoJob.ACTIVE
    # The lease lasts as long as django-q2 lets a task live (`timeout` < `retry`), so a task
    # redelivered after a worker died always finds the dead worker's lease expired.
    ).update(lease_token=token, lease_until=now + timedelta(seconds=settings.Q_CLUSTER["timeout"]))
    if not got:
        return "busy-or-finished"
    done = False
    try:
        done = runner.advance(job_id, deadline=time.monotonic() + slice_seconds)
    finally:
        VideoJob.objects.filter(pk=job_id, lease_token=token).update(lease_token="", lease_until=None)
    if not done:
        enqueue("generation.tasks.run_job", str(job_id))
        return "continued"
    return "done"


def watchdog():
    """Re-enqueue active jobs nobody is working on (a worker died, a task was lost)."""
    stale = timezone.now() - timedelta(seconds=settings.Q_CLUSTER["retry"])
    ids = list(
        VideoJob.objects.filter(status__in=VideoJob.ACTIVE, status_changed_at__lt=stale)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=timezone.now()))
        .values_list("id", flat=True)[:100]
    )
    for job_id in ids:
        enqueue("generation.tasks.run_job", str(job_id))
    return len(ids)


def deliver_webhook(job_id, attempt=1):
    from generation import webhooks

    webhooks.deliver(job_id, int(attempt))
