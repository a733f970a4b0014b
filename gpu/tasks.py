"""django-q2 entry points for the vast.ai lifecycle: thin, idempotent, take primitive ids."""

import logging
import time

from django.conf import settings

from gpu import demand, lifecycle, reconciler
from gpu.models import VastInstance

log = logging.getLogger(__name__)


def enqueue(func, *args):
    from django_q.tasks import async_task

    async_task(func, *args, group="gpu")


def wait_for_instance(instance_id):
    """Watch a booting instance for one slice (pausing as each step asks), then hand it back to the queue."""
    instance = VastInstance.objects.filter(pk=instance_id).first()
    if instance is None or instance.state not in VastInstance.BOOTING:
        return "done"
    deadline = time.monotonic() + settings.I2V_FOLLOW_SLICE
    while True:
        step = lifecycle.wait_until_ready(instance)
        if step.done:
            return step.message or "done"
        if time.monotonic() + step.delay > deadline:
            break
        time.sleep(step.delay)
    enqueue("gpu.tasks.wait_for_instance", str(instance_id))
    return "continued"


def reap_idle():
    """Schedule (every minute): destroy idle instances, rent one more if jobs wait too long."""
    if not settings.VASTAI_API_KEY:
        return "vast.ai is not configured"
    reaped = demand.reap_idle()
    added = demand.scale_out_if_needed()
    return f"reaped {len(reaped)}" + (f", scaled out to {added.vast_id}" if added else "")


def reconcile():
    """Schedule (every minute): make vast.ai and the database agree (see reconciler.reconcile)."""
    if not settings.VASTAI_API_KEY:
        return "vast.ai is not configured"
    try:
        report = reconciler.reconcile()
    except lifecycle.ProvisioningError as exc:
        log.warning("reconcile: %s", exc)
        return str(exc)
    return {key: value for key, value in report.items() if value} or "nothing to do"
