"""Running a VideoJob on fal.ai's queue: submit once, poll (or take the webhook), copy the video.

The same slices, lease and states as the ComfyUI runner. Money is spent per submission,
so a submission is never repeated blindly: a `submitting` mark is stored before the POST;
a retry that finds the mark without a request id cannot know whether fal received the
request, and fails the job with that explanation instead of paying twice.
"""

import base64
import hashlib
import hmac
import logging
import time
from decimal import Decimal

from django.conf import settings
from django.core.files.storage import default_storage
from django.urls import reverse
from django.utils import timezone

from generation import scheduler
from generation.fal import FalClient, FalError, build_input, estimate_cost
from generation.models import VideoJob
from i2v.core.crypto import derive_key

log = logging.getLogger(__name__)
S = VideoJob.Status
UNREACHABLE_GRACE = 120


class FalJobFailed(Exception):
    pass


def client() -> FalClient:
    return FalClient(settings.FAL_KEY, settings.FAL_QUEUE_URL)


def webhook_token(job_id) -> str:
    """The token in fal.ai's callback URL for one job, under a key derived for this use alone."""
    return hmac.new(derive_key("fal-webhook-token"), f"fal-webhook:{job_id}".encode(), hashlib.sha256).hexdigest()[:32]


def webhook_url(job) -> str | None:
    if not settings.I2V_PUBLIC_URL:
        return None
    path = reverse("api:fal_webhook", kwargs={"job_id": job.id})
    return f"{settings.I2V_PUBLIC_URL}{path}?token={webhook_token(job.id)}"


def estimate(job) -> Decimal:
    return estimate_cost(settings.FAL_ENDPOINT, job.width, job.height, job.frames)


def input_url_lifetime() -> int:
    """Seconds the input image URL stays valid: the longest fal may keep the request queued
    (the start timeout sent with it) plus the longest a run takes, so fal can still fetch it."""
    return settings.I2V_FAL_START_TIMEOUT + settings.I2V_FAL_RUN_SECONDS


def _image_url(job) -> str:
    """A URL fal can download without our credentials: presigned R2, else a data URI."""
    if settings.R2_BUCKET:
        return default_storage.url(job.input_image.name, expire=input_url_lifetime())
    with default_storage.open(job.input_image.name, "rb") as fh:
        data = fh.read()
    ext = job.input_image.name.rsplit(".", 1)[-1].lower()
    mime = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(ext, "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def fail_job(job, message):
    from generation.failures import fail_job as fail

    fail(job, message)


def advance(job_id, deadline: float) -> bool:
    """Move a fal job forward until `deadline`. True once it is terminal."""
    from generation.runner import StorageFailed, storage_retry

    job = VideoJob.objects.filter(pk=job_id).first()
    if job is None or job.is_terminal:
        return True
    try:
        fal = client()
    except FalError as exc:
        fail_job(job, str(exc))
        return True
    try:
        if job.status in (S.QUEUED, S.PROVISIONING):
            submit(job, fal)
        if job.status in (S.SUBMITTED, S.RUNNING):
            follow(job, fal, deadline)
        if job.status == S.UPLOADING and time.monotonic() < deadline:
            store_output(job, fal)
    except FalJobFailed as exc:
        fail_job(job, str(exc))
    except StorageFailed as exc:
        if storage_retry(job, exc, fail_job):
            return False
    except FalError as exc:
        since = job.status_changed_at or job.created_at
        if exc.retryable and (timezone.now() - since).total_seconds() < UNREACHABLE_GRACE:
            log.warning("job %s: fal.ai unavailable (%s); will retry", job.id, exc.kind)
            return False
        fail_job(job, f"fal.ai: {exc}")
    finally:
        fal.close()
    job.refresh_from_db()
    return job.is_terminal


def submit(job, fal):
    if job.cancel_requested:
        job.transition(S.CANCELLED, error="Cancelled by the user.")
        return
    if job.request_id:
        job.transition(S.SUBMITTED)
        return
    urls = job.provider_urls or {}
    if urls.get("submitting"):
        raise FalJobFailed(
            "The worker stopped while submitting this job to fal.ai, so it is unknown whether fal received it; "
            "it was not sent again to avoid paying twice. Retry the job."
        )
    arguments = build_input(
        image_url=_image_url(job), prompt=job.prompt, negative_prompt=job.negative_prompt, frames=job.frames,
        fps=job.fps, width=job.width, height=job.height, seed=job.seed, endpoint=settings.FAL_ENDPOINT,
    )
    marked = VideoJob.objects.filter(pk=job.pk, request_id="", status=job.status).update(
        provider_urls={"submitting": timezone.now().isoformat()}
    )
    if not marked:
        return
    try:
        handle = fal.submit(settings.FAL_ENDPOINT, arguments, webhook_url=webhook_url(job),
                            start_timeout=settings.I2V_FAL_START_TIMEOUT)
    except FalError as exc:
        # Refused before it was queued (bad key, bad input): nothing was charged, nothing to resume.
        if exc.kind in ("auth", "invalid"):
            raise FalJobFailed(f"fal.ai refused the job: {exc}")
        if exc.kind == "http" and exc.status and exc.status < 500:
            raise FalJobFailed(f"fal.ai refused the job: {exc}")
        raise FalJobFailed(f"fal.ai did not confirm the submission ({exc}); not resubmitted to avoid paying twice. Retry the job.")
    job.transition(
        S.SUBMITTED, request_id=handle["request_id"],
        provider_urls={k: handle[k] for k in ("status_url", "response_url", "cancel_url")},
        steps_total=1, step=0, progress=0.0, gpu_class=scheduler.FAL,
    )


def follow(job, fal, deadline):
    """Poll fal's status URL (with backoff) until the request completes or `deadline`."""
    urls = job.provider_urls
    wait = settings.I2V_FAL_POLL_SECONDS
    while True:
        job.refresh_from_db()
        if job.is_terminal or job.status == S.UPLOADING:
            return  # the webhook got there first
        state = fal.status(urls["status_url"])
        status = state.get("status")
        fields = {}
        logs = [entry.get("message", "") for entry in (state.get("logs") or []) if isinstance(entry, dict)]
        if logs and logs[-1]:
            fields["current_node"] = logs[-1][:100]
        if status == "IN_QUEUE":
            fields["queue_position"] = state.get("queue_position")
        elif status == "IN_PROGRESS" and job.status == S.SUBMITTED:
            job.transition(S.RUNNING, queue_position=None, **fields)
            fields = {}
        elif status == "COMPLETED":
            if state.get("error"):
                # The status says only e.g. "Invalid status code: 422"; the result says what was wrong.
                try:
                    fal.result(urls["response_url"])
                except FalError as exc:
                    if exc.kind != "failed":
                        raise
                    raise FalJobFailed(str(exc)) from None
                raise FalJobFailed(f"fal.ai failed to generate the video: {state['error']}")
            take_result(job, fal.result(urls["response_url"]))
            return
        if fields:
            VideoJob.objects.filter(pk=job.pk, status=job.status).update(**fields)
        if time.monotonic() + wait >= deadline:
            return
        time.sleep(wait)  # fal's queue has no push channel but the webhook: poll politely
        wait = min(max(wait * 1.5, 0.0), 10.0)


def take_result(job, payload):
    """Record fal's output (from polling or the webhook) and move the job to uploading."""
    video = (payload or {}).get("video") or {}
    if not video.get("url"):
        raise FalJobFailed("fal.ai finished but returned no video.")
    urls = dict(job.provider_urls or {})
    urls["output_url"] = video["url"]
    job.refresh_from_db()
    if job.status in (S.SUBMITTED, S.RUNNING):
        if job.transition(S.UPLOADING, provider_urls=urls, progress=0.99, step=1):
            scheduler.record_run(job)


def store_output(job, fal):
    url = (job.provider_urls or {}).get("output_url")
    if not url:
        raise FalJobFailed("The fal.ai output of this job is unknown.")
    from generation.runner import ResponseStream, finish_accounting, save_video

    with fal.open_download(url) as resp:
        stream = ResponseStream(resp)
        name = save_video(f"videos/{job.id}.mp4", stream)
    job.refresh_from_db()
    if not job.transition(S.COMPLETED, video=name, video_size=stream.bytes_read, cost_usd=estimate(job)):
        default_storage.delete(name)
        return
    finish_accounting(job)


def cancel_on_fal(job):
    urls = job.provider_urls or {}
    if urls.get("cancel_url"):
        fal = client()
        try:
            fal.cancel(urls["cancel_url"])
        except FalError as exc:
            log.warning("job %s: cancel on fal.ai failed: %s", job.id, exc)
        finally:
            fal.close()
    job.transition(S.CANCELLED, error="Cancelled by the user.")
