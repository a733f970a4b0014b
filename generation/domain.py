"""Generation business logic: creating, cancelling and describing VideoJobs."""

import hashlib
import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils import timezone

from generation import jobcache, scheduler
from generation.failures import advice
from generation.inputs import InputError, clean_image, fetch_image
from generation.models import VideoJob, Workflow
from gpu.models import GpuConfig
from i2v.core.sql import columns, convert, fetch, from_row, prebuilt, read_ahead
from i2v.core.webhook_secrets import WebhookSecret

log = logging.getLogger(__name__)


def video_url(job) -> str:
    """Where the page fetches the job's video: R2 (presigned or public) or the local auth-checked view."""
    if not job.video:
        return ""
    if settings.R2_BUCKET:
        return default_storage.url(job.video.name)
    return reverse("generation:job_video", args=[job.id])


def base_url(request=None) -> str:
    """The site's absolute root for links in API answers: I2V_PUBLIC_URL, else the request's own."""
    if settings.I2V_PUBLIC_URL:
        return settings.I2V_PUBLIC_URL
    return request.build_absolute_uri("/").rstrip("/") if request is not None else ""


def api_video_url(job, base: str = "") -> str:
    """The video's URL for scripts: /api/jobs/{id}/video takes the same Bearer token as the rest of
    the API and streams the file (or redirects to a presigned storage URL)."""
    if not job.video:
        return ""
    return f"{base}{reverse('api:job_video', args=[job.id])}"


# The columns job_json reads: API reads load only these (a job row has ~50 columns).
JOB_JSON_FIELDS = (
    "id", "owner_id", "status", "progress", "step", "steps_total", "current_node", "queue_position", "backend",
    "workflow_slug", "prompt", "negative_prompt", "width", "height", "frames", "fps", "seed", "error", "video",
    "video_size", "prompt_id", "request_id", "instance_id", "created_at", "started_at", "finished_at", "cost_usd",
    "note", "place", "deadline_at", "cancel_requested", "error_class", "error_info", "eta_at",
)


# In the model's column order: Model.from_db pairs values with concrete fields in order.
_ANSWER = [f for f in VideoJob._meta.concrete_fields if f.attname in JOB_JSON_FIELDS or f.name in JOB_JSON_FIELDS]
_ANSWER_FIELDS, _ANSWER_ATTNAMES = tuple(f.name for f in _ANSWER), [f.attname for f in _ANSWER]


def read_job(user, job_id):
    """The job `user` may see (owner, or any job for staff) with the columns job_json reads, or
    None. `GET /api/jobs/{id}` is what scripts poll, so this runs one prebuilt SELECT: building
    the same query through the ORM took ~1.5 ms a request, several times the query itself.
    Values pass through the same converters the ORM applies (UUIDs and datetimes on SQLite)."""
    def select(q):
        cols = ", ".join(q(VideoJob, name) for name in _ANSWER_FIELDS)
        return f"SELECT {cols} FROM {q(VideoJob)} WHERE {q(VideoJob, 'id')} = %s"

    pk = VideoJob._meta.pk.get_db_prep_value(job_id, connection)
    if user.is_staff:
        rows = fetch(prebuilt("videojob.answer", select), [pk])
    else:
        rows = fetch(prebuilt("videojob.answer_owned", lambda q: f"{select(q)} AND {q(VideoJob, 'owner')} = %s"),
                     [pk, user.pk])
    if not rows:
        return None
    return VideoJob.from_db(connection.alias, _ANSWER_ATTNAMES, convert(VideoJob, _ANSWER_FIELDS, rows[0]))


def eta_seconds(job: VideoJob) -> int | None:
    if job.is_terminal or job.eta_at is None:
        return None
    return max(0, round((job.eta_at - timezone.now()).total_seconds()))


def job_json(job: VideoJob, base: str = "") -> dict:
    position, expected_start = scheduler.queue_estimate(job)
    if position is None:
        position = job.queue_position  # bound: its place in ComfyUI's or fal's own queue
    return {
        "id": str(job.id),
        "status": job.status,
        "progress": round(job.progress, 4),
        "step": job.step,
        "steps": job.steps_total,
        "current_node": job.current_node or None,
        "queue_position": position,
        "expected_start_at": expected_start,
        "deadline": job.deadline_at,
        "place": job.place or None,
        "backend": job.backend,
        "workflow": job.workflow_slug,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "width": job.width,
        "height": job.height,
        "frames": job.frames,
        "fps": job.fps,
        "seed": job.seed,
        "error": job.error or None,
        "error_class": job.error_class or None,
        "advice": advice(job) or None,
        "eta_seconds": eta_seconds(job),
        "video_url": api_video_url(job, base) or None,
        "video_size": job.video_size,
        "prompt_id": job.prompt_id or None,
        "request_id": job.request_id or None,
        "instance_id": str(job.instance_id) if job.instance_id else None,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cost_usd": float(job.cost_usd) if job.cost_usd is not None else None,
        "cost_estimate_usd": cost_estimate(job),
        "note": job.note or None,
    }


def cost_estimate(job):
    """fal.ai's published price for this clip (per video-second by resolution), for comparison."""
    if not settings.FAL_KEY and job.backend != VideoJob.Backend.FAL:
        return None
    from generation.fal import estimate_cost

    try:
        return float(estimate_cost(settings.FAL_ENDPOINT, job.width, job.height, job.frames))
    except ValueError:
        return None


class QueueFull(Exception):
    """The user has as many jobs waiting as their limit allows (answered 429)."""


def _workflow_read(slug: str) -> tuple[str, list]:
    return prebuilt("workflow.active", lambda q: (  # read on every job's request
        f"SELECT {columns(Workflow, q)} FROM {q(Workflow)} WHERE {q(Workflow, 'slug')} = %s AND {q(Workflow, 'is_active')} = %s"
    )), [slug, True]


def resolve_workflow(slug: str) -> Workflow:
    slug = slug or GpuConfig.get().default_workflow or "wan22-i2v"
    rows = fetch(*_workflow_read(slug))
    wf = from_row(Workflow, rows[0]) if rows else None
    if wf is None:
        known = ", ".join(Workflow.objects.filter(is_active=True).values_list("slug", flat=True))
        raise InputError("workflow", f"unknown workflow {slug!r}; available: {known}")
    return wf


IDEMPOTENCY_TTL = timedelta(hours=24)


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""

    def __init__(self, key: str, job: VideoJob):
        super().__init__(
            f"Idempotency-Key {key!r} was already used with a different request (job {job.id}). "
            "Send a new key for a new request, or repeat the original request to get that job."
        )


def request_hash(params, image_bytes: bytes | None) -> str:
    """What an idempotency key is bound to: the fields sent and the image's bytes (or its URL)."""
    digest = hashlib.sha256(params.model_dump_json().encode())
    digest.update(hashlib.sha256(image_bytes or b"").digest())
    return digest.hexdigest()


def _replay(owner, key: str, fingerprint: str):
    """The job an idempotency key already stands for, or None when the key is free (never used, its
    job failed, or older than 24 h: the key is then released). Raises IdempotencyConflict."""
    existing = VideoJob.objects.filter(owner=owner, idempotency_key=key).first()
    if existing is None:
        return None
    if existing.status == VideoJob.Status.FAILED or existing.created_at < timezone.now() - IDEMPOTENCY_TTL:
        VideoJob.objects.filter(pk=existing.pk, idempotency_key=key).update(idempotency_key=None)
        return None
    if existing.request_hash and existing.request_hash != fingerprint:
        raise IdempotencyConflict(key, existing)
    return existing


def create_job(owner, params, *, image_bytes=None, idempotency_key=None) -> tuple[VideoJob, bool]:
    """Validate, store the image, create a queued VideoJob and enqueue its task.

    Returns (job, created). With an idempotency key this owner used before for the same request
    (within 24 h, and its job did not fail), that job comes back and nothing new is stored or
    enqueued; the same key with another request raises IdempotencyConflict.
    """
    fingerprint = request_hash(params, image_bytes) if idempotency_key else ""
    if idempotency_key:
        existing = _replay(owner, idempotency_key, fingerprint)
        if existing:
            return existing, False
    if image_bytes is None and not params.image_url:
        raise InputError("image", "send an image file (multipart field 'image') or an image_url")
    if image_bytes is not None and params.image_url:
        raise InputError("image_url", "send either an image file or an image_url, not both")
    if params.backend == "fal" and not settings.FAL_KEY:
        raise InputError("backend", "fal.ai is not configured on this server (FAL_KEY is unset); use backend 'comfyui'")
    # The user's waiting count and the workflow (or, when none is named, the default's setting) in
    # one round trip on PostgreSQL: both are read on every job's request.
    with read_ahead(scheduler.waiting_and_limit_read(owner.pk),
                    _workflow_read(params.workflow) if params.workflow else GpuConfig.read()):
        waiting, limit = scheduler.waiting_and_limit(owner.pk)
        if waiting >= limit:
            raise QueueFull(f"You have {waiting} jobs waiting, the limit is {limit} (max_waiting): wait for some to "
                            "start, or cancel some, then send this one again.")
        if params.webhook_url and not WebhookSecret.signing_secrets(owner):
            raise InputError("webhook_url", "create your webhook signing secret first (POST /api/account/webhook-secret, "
                                            "or the Account page), so your receiver can verify each delivery")
        workflow = resolve_workflow(params.workflow)
    field = "image"
    if image_bytes is None:
        image_bytes, field = fetch_image(params.image_url), "image_url"
    image_bytes, ext = clean_image(image_bytes, field=field)
    defaults = workflow.defaults or {}
    job_id = uuid.uuid4()
    job = VideoJob(
        id=job_id,
        owner=owner,
        image_url=params.image_url or "",
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        backend=params.backend,
        workflow=workflow,
        workflow_slug=workflow.slug,
        width=params.width or defaults.get("width", 832),
        height=params.height or defaults.get("height", 480),
        frames=params.frames or defaults.get("frames", 81),
        fps=params.fps or defaults.get("fps", 16),
        seed=params.seed,
        steps=params.steps or defaults.get("steps"),
        idempotency_key=idempotency_key or None,
        request_hash=fingerprint,
        webhook_url=params.webhook_url or "",
        deadline_at=params.deadline,
    )
    name = default_storage.save(f"inputs/{job_id}.{ext}", ContentFile(image_bytes))
    job.input_image.name = name
    try:
        # Its id is told to nobody before this returns: placing it drops no cached answer.
        with jobcache.unseen(job_id), transaction.atomic():
            job.save(force_insert=True)
            scheduler.request_pass(job)
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race.
        default_storage.delete(name)
        existing = _replay(owner, idempotency_key, fingerprint)
        if existing is None:
            raise
        return existing, False
    return job, True


def cancel_job(job: VideoJob) -> VideoJob:
    """Cancel a job: a queued one at once; a submitted one is removed from ComfyUI's queue
    or interrupted, and ends `cancelled` when ComfyUI confirms (or at once if it is unreachable)."""
    VideoJob.objects.filter(pk=job.pk).update(cancel_requested=True)
    job.refresh_from_db()
    if job.is_terminal:
        return job
    if job.status in (VideoJob.Status.QUEUED, VideoJob.Status.PROVISIONING) and not job.prompt_id:
        job.transition(VideoJob.Status.CANCELLED, error="Cancelled by the user.")
    elif job.backend == VideoJob.Backend.FAL:
        from generation.fal_runner import cancel_on_fal

        cancel_on_fal(job)
    else:
        from generation.runner import cancel_on_comfyui

        cancel_on_comfyui(job)
    job.refresh_from_db()
    return job


def sync_shipped_workflows(Workflow, ModelFile) -> list[str]:
    """Create or update the Workflow and ModelFile rows from generation/workflows/*.json.

    Takes the model classes so the data migration can pass its historical models.
    """
    from generation.workflow_schema import load_manifest, shipped_workflows

    by_name = {}
    for entry in load_manifest():
        # A size/sha256 recorded by `upload_models_to_r2` survives a manifest that has none, while the R2 key stays.
        known = ModelFile.objects.filter(name=entry["name"], r2_key=entry["r2_key"]).first()
        row, _ = ModelFile.objects.update_or_create(
            name=entry["name"],
            defaults={
                "filename": entry["filename"],
                "folder": entry["folder"],
                "r2_key": entry["r2_key"],
                "size": entry.get("size") if entry.get("size") is not None else (known.size if known else None),
                "sha256": entry.get("sha256") or (known.sha256 if known else ""),
                "source": entry.get("source") or "",
            },
        )
        by_name[row.name] = row
    slugs = []
    for data in shipped_workflows():
        wf, _ = Workflow.objects.update_or_create(
            slug=data["slug"],
            defaults={
                "name": data["name"],
                "description": data.get("description", ""),
                "graph": data["graph"],
                "bindings": data["bindings"],
                "output_node": data["output_node"],
                "defaults": data.get("defaults", {}),
            },
        )
        wf.model_files.set([by_name[name] for name in data.get("models", [])])
        slugs.append(wf.slug)
    return slugs
