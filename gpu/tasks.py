"""django-q2 entry points for the vast.ai lifecycle: thin, idempotent, take primitive ids."""

import logging
import time

from django.conf import settings

from gpu import capacity, lifecycle, reconciler
from gpu.models import VastInstance

log = logging.getLogger(__name__)


def enqueue(func, *args):
    from i2v.core.queue import async_task

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
            # Ready (or gone): the scheduler places waiting jobs on it at once.
            capacity.capacity_changed.send(sender=VastInstance, instance_id=instance.pk)
            return step.message or "done"
        if time.monotonic() + step.delay > deadline:
            break
        time.sleep(step.delay)
    enqueue("gpu.tasks.wait_for_instance", str(instance_id))
    return "continued"


def save_costs():
    """Schedule (every minute): record what each live instance has cost so far. (Idle instances
    are destroyed by the scheduler, which knows whether jobs wait for them.)"""
    for instance in VastInstance.objects.filter(state__in=VastInstance.LIVE):
        lifecycle.save_cost(instance)
    return "saved"


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
