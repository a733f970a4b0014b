"""Demand-side vast.ai decisions that look at jobs: capacity for a job, scale-out, reaping idle GPUs."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Max, Q
from django.utils import timezone

from gpu.domain import NO_KEY
from gpu.lifecycle import (MAX_BOOT_ATTEMPTS, ProvisioningError, create_instance, destroy_instance, save_cost,
                           update_instance)
from gpu.models import GpuConfig, VastInstance

log = logging.getLogger(__name__)
St = VastInstance.State
Origin = VastInstance.Origin

TRANSIENT_GRACE = 600  # seconds a job waits through vast.ai outages before it fails


def ensure_capacity_for(job) -> VastInstance | None:
    """A ready instance for `job` (the least busy), or None while one boots.

    Starts an instance when none is live, and scales out when jobs have waited longer
    than scale_out_wait_seconds and fewer than max_instances are live. Raises
    ProvisioningError when no GPU can be had (no API key, spend cap, no offer, or
    MAX_BOOT_ATTEMPTS failed boots while this job waited).
    """
    from generation.models import VideoJob

    if not settings.VASTAI_API_KEY:
        raise ProvisioningError(NO_KEY, status=503)
    config = GpuConfig.get()
    now = timezone.now()
    active = VideoJob.ACTIVE
    ready = (VastInstance.objects.filter(state=St.RUNNING).exclude(comfyui_url="")
             .annotate(busy=Count("jobs", filter=Q(jobs__status__in=active) & ~Q(jobs__pk=job.pk)))
             .order_by("busy", "created_at"))
    instance = ready.first()
    if instance is not None:
        update_instance(instance, last_busy_at=now)
        if job.note.startswith(WAITING_NOTE):
            VideoJob.objects.filter(pk=job.pk, note=job.note).update(note="")
        if instance.busy:
            scale_out_if_needed(config=config, now=now)
        return instance
    booting = VastInstance.objects.filter(state__in=VastInstance.BOOTING).order_by("created_at").first()
    if booting is not None:
        _note_waiting(job, booting)
        return None
    since = job.created_at  # the whole wait, including the rental the job's first slice started
    failures = list(VastInstance.objects.filter(created_at__gte=since).exclude(error="").order_by("-created_at")[:MAX_BOOT_ATTEMPTS])
    if len(failures) >= MAX_BOOT_ATTEMPTS:
        raise ProvisioningError(f"No vast.ai GPU could be readied for this job in {MAX_BOOT_ATTEMPTS} attempts; the last: "
                                f"{failures[0].error}")
    try:
        started = create_instance(user=job.owner, origin=Origin.JOB, live_below=1)
    except ProvisioningError as exc:
        if exc.transient and (now - since).total_seconds() < TRANSIENT_GRACE:
            log.warning("job %s: no GPU yet (%s); will retry", job.pk, exc)
            return None
        raise
    if started is not None:
        _note_waiting(job, started)
    return None


WAITING_NOTE = "Waiting for a vast.ai GPU"


def _note_waiting(job, instance):
    """Show on a waiting job which instance it waits for and how far that one is (claiming the job
    later records the instance it runs on)."""
    from generation.models import VideoJob

    where = f"instance {instance.vast_id}" if instance.vast_id else "renting"
    gpu = f", {instance.gpu_name} at ${instance.dph_total:.3f}/h" if instance.gpu_name else ""
    note = f"{WAITING_NOTE} ({where}{gpu}): {instance.state}" + (f", {instance.status_msg}" if instance.status_msg else "")
    VideoJob.objects.filter(pk=job.pk, prompt_id="").update(instance=instance, note=note[:300])
    job.instance_id, job.note = instance.pk, note[:300]


def scale_out_if_needed(*, config=None, now=None) -> VastInstance | None:
    """Rent one more instance when jobs have waited longer than scale_out_wait_seconds.

    Only with at least one instance live and none booting, and below max_instances."""
    from generation.models import VideoJob

    config = config or GpuConfig.get()
    now = now or timezone.now()
    if config.gpu_provider != GpuConfig.Provider.VASTAI or not settings.VASTAI_API_KEY:
        return None
    live = VastInstance.objects.filter(state__in=VastInstance.LIVE)
    count = live.count()
    if count == 0 or count >= config.max_instances or live.filter(state__in=VastInstance.BOOTING).exists():
        return None
    cutoff = now - timedelta(seconds=config.scale_out_wait_seconds)
    waiting = VideoJob.objects.filter(backend=VideoJob.Backend.COMFYUI).filter(
        Q(status=VideoJob.Status.PROVISIONING, provisioning_at__lt=cutoff)
        | Q(status=VideoJob.Status.SUBMITTED, started_at__isnull=True, instance__isnull=False, submitted_at__lt=cutoff)
    )
    if not waiting.exists():
        return None
    try:
        return create_instance(origin=Origin.SCALE_OUT, live_below=count + 1)
    except ProvisioningError as exc:
        log.warning("scale-out: %s", exc)
        return None


# ---------------------------------------------------------------------- housekeeping


def reap_idle(now=None) -> list[VastInstance]:
    """Destroy running instances idle longer than idle_minutes (no job active on them, none waiting)."""
    from generation.models import VideoJob

    config = GpuConfig.get()
    now = now or timezone.now()
    idle = timedelta(minutes=config.idle_minutes)
    someone_waits = VideoJob.objects.filter(backend=VideoJob.Backend.COMFYUI, status=VideoJob.Status.PROVISIONING).exists()
    reaped = []
    for instance in VastInstance.objects.filter(state__in=VastInstance.LIVE):
        save_cost(instance, now)
        if instance.state != St.RUNNING:
            continue
        if instance.jobs.filter(status__in=VideoJob.ACTIVE, backend=VideoJob.Backend.COMFYUI).exists():
            update_instance(instance, last_busy_at=now)
            continue
        if someone_waits:
            continue  # a waiting job is about to be given this GPU
        last_job = instance.jobs.aggregate(last=Max("finished_at"))["last"]
        since = max(t for t in (instance.last_busy_at, instance.ready_at, last_job, instance.created_at) if t)
        if now - since < idle:
            continue
        try:
            reaped.append(destroy_instance(instance, f"idle for more than {config.idle_minutes} min"))
        except ProvisioningError as exc:
            log.warning("could not reap instance %s: %s", instance.vast_id, exc)
    return reaped
