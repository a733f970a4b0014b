"""The generate and jobs routes."""

import asyncio
import json
import logging
import uuid
from datetime import datetime
from typing import Optional

from asgiref.sync import sync_to_async
from django.http import Http404, HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.renderers import JSONRenderer
from ninja.responses import Status
from ninja.errors import HttpError
from pydantic import ValidationError as PydanticValidationError

from generation import domain, jobcache, waiting
from generation.inputs import GenerateParams, InputError
from generation.models import VideoJob
from generation.views import _get_job_for_user
from i2v.core.throttles import generate_rate

log = logging.getLogger(__name__)
# One budget for both generate routes.
GENERATE_RATE = generate_rate()
router = Router(tags=["generation"])
RENDERER = JSONRenderer()  # the NinjaAPI's own renderer (its default), for answers rendered once and cached

MULTIPART_FIELDS = set(GenerateParams.model_fields)
GENERATE_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        **GenerateParams.model_json_schema()["properties"],
                    },
                }
            },
            "application/json": {"schema": GenerateParams.model_json_schema()},
        },
        "required": True,
    },
    "parameters": [
        {"in": "header", "name": "Idempotency-Key", "required": False, "schema": {"type": "string", "maxLength": 200},
         "description": "Repeat a request safely: the same key with the same request returns the same job (200); "
                        "with a different request it answers 409. A key whose job failed, or older than 24 h, "
                        "starts a new job."},
        {"in": "header", "name": "Prefer", "required": False, "schema": {"type": "string", "pattern": "^wait(=[0-9]+)?$"},
         "description": "`wait` or `wait=N` (N ≤ 60 s): answer with the finished job if it ends within N s, else 202."},
    ],
}


def _pydantic_detail(exc: PydanticValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "request"
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        parts.append(f"{field}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_BODY_BYTES = MAX_IMAGE_BYTES + 256 * 1024  # the image plus the form fields and multipart framing
MAX_OFFSET = 1_000_000_000


def _parse_generate(request, backend_default):
    content_type = request.content_type or ""
    image_bytes = None
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HttpError(400, "Content-Length is not a number.")
    if length > MAX_BODY_BYTES:
        # Refused before the body is read or spooled to disk.
        raise HttpError(413, f"The request is {length / 1e6:.1f} MB; images may be at most 20 MB.")
    if content_type.startswith("multipart/form-data"):
        raw = {k: v for k, v in request.POST.items()}
        unknown = set(request.FILES) - {"image"}
        if unknown:
            raise InputError(sorted(unknown)[0], "unknown file field; send the image as 'image'")
        upload = request.FILES.get("image")
        if upload is not None:
            if upload.size > MAX_IMAGE_BYTES:
                raise InputError("image", f"the file is {upload.size / 1e6:.1f} MB; the limit is 20 MB")
            image_bytes = upload.read()
        # Form values are strings; empty optional fields mean "not given".
        data = {k: v for k, v in raw.items() if not (v == "" and k not in ("prompt",))}
    elif content_type in ("application/json", "") or content_type.endswith("+json"):
        try:
            data = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "The body is not valid JSON.")
        if not isinstance(data, dict):
            raise HttpError(422, "The JSON body must be an object.")
    else:
        raise HttpError(415, "Send multipart/form-data (with an 'image' file) or application/json (with 'image_url').")
    data.setdefault("backend", backend_default)
    try:
        params = GenerateParams.model_validate(data)
    except PydanticValidationError as exc:
        raise HttpError(422, _pydantic_detail(exc))
    return params, image_bytes


def _generate(request, backend_default):
    try:
        params, image_bytes = _parse_generate(request, backend_default)
    except InputError as exc:
        raise HttpError(422, str(exc))
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and (len(key) > 200 or not key.isprintable()):
        raise HttpError(422, "Idempotency-Key: must be at most 200 printable characters.")
    try:
        job, created = domain.create_job(request.auth, params, image_bytes=image_bytes, idempotency_key=key)
    except domain.IdempotencyConflict as exc:
        raise HttpError(409, str(exc))
    except InputError as exc:
        raise HttpError(422, str(exc))
    except domain.QueueFull as exc:
        raise HttpError(429, str(exc))
    return Status(202 if created else 200, domain.job_json(job, domain.base_url(request)))


class JobOut(Schema):
    id: str
    status: str
    progress: float
    step: int
    steps: int
    current_node: Optional[str]
    queue_position: Optional[int] = Field(description="Jobs ahead of this one (in i2v's queue while waiting, then in its GPU's)")
    expected_start_at: Optional[datetime] = Field(description="When a waiting job is expected to start")
    deadline: Optional[datetime]
    place: Optional[str] = Field(description="Where it runs: config, server:<id>, vast:<instance id> or fal")
    backend: str
    workflow: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    fps: int
    seed: Optional[int]
    error: Optional[str]
    error_class: Optional[VideoJob.ErrorClass]
    advice: Optional[str]
    eta_seconds: Optional[int]
    video_url: Optional[str]
    video_size: Optional[int]
    prompt_id: Optional[str]
    request_id: Optional[str]
    instance_id: Optional[str]
    created_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    cost_usd: Optional[float]
    cost_estimate_usd: Optional[float]
    note: Optional[str]


class JobList(Schema):
    items: list[JobOut]
    count: int
    limit: int
    offset: int


class Error(Schema):
    detail: str


@router.post("/generate-video", response={200: JobOut, 202: JobOut, 400: Error, 413: Error, 409: Error, 415: Error, 422: Error, 429: Error},
             throttle=[GENERATE_RATE],
             openapi_extra=GENERATE_DOC, summary="Generate a video (backend comfyui or fal)")
async def generate_video(request):
    """Multipart with an `image` file, or JSON with `image_url`. 202 with the new job;
    200 with the existing job when the `Idempotency-Key` was used before. With `Prefer: wait`
    (or `wait=N`, N ≤ 60 s) the answer waits for the job: 200 with the finished job, or 202 with
    the job as it is when the wait ran out."""
    return await _generate_waiting(request, "comfyui")


@router.post("/vastai/generate-video", response={200: JobOut, 202: JobOut, 400: Error, 413: Error, 409: Error, 415: Error, 422: Error, 429: Error},
             throttle=[GENERATE_RATE],
             openapi_extra=GENERATE_DOC, summary="Generate a video on the GPU (the seed's endpoint)")
async def vastai_generate_video(request):
    """Uses the configured ComfyUI URL, else a ready vast.ai instance. Honours `Prefer: wait`."""
    return await _generate_waiting(request, "comfyui")


class JobFilter(Schema):
    status: Optional[VideoJob.Status] = None
    limit: int = 20
    offset: int = 0


@router.get("/jobs", response=JobList, summary="Your jobs, newest first")
def list_jobs(request, filters: Query[JobFilter]):
    if not 1 <= filters.limit <= 100:
        raise HttpError(422, "limit: must be between 1 and 100")
    if not 0 <= filters.offset <= MAX_OFFSET:
        raise HttpError(422, f"offset: must be between 0 and {MAX_OFFSET}")
    qs = VideoJob.objects.filter(owner=request.auth).only(*domain.JOB_JSON_FIELDS).order_by("-created_at")
    if filters.status:
        qs = qs.filter(status=filters.status)
    count = qs.count()
    page = qs[filters.offset: filters.offset + filters.limit]
    base = domain.base_url(request)
    return {"items": [domain.job_json(j, base) for j in page], "count": count,
            "limit": filters.limit, "offset": filters.offset}


def _job(request, job_id):
    try:
        return _get_job_for_user(request.auth, job_id)
    except (Http404, ValueError):
        raise HttpError(404, "No such job.")


def _render(job, base: str) -> bytes:
    """The job's answer, validated and rendered once (a cached answer is sent as these bytes)."""
    answer = JobOut.model_validate(domain.job_json(job, base)).model_dump()
    return RENDERER.render(None, answer, response_status=200)


def _answer(user, job_id, base: str = ""):
    """The rendered JSON of the job; from the shared cache when it has the job."""
    cached, version = jobcache.get(job_id)
    # The answer holds absolute URLs: one cached for another host name is not this one's.
    if cached is None or cached[1][0] != base:
        job = domain.read_job(user, job_id)
        if job is None:
            raise HttpError(404, "No such job.")
        cached = (job.owner_id, (base, _render(job, base)))
        jobcache.put(job_id, *cached, version)
    owner_id, (_, body) = cached
    if owner_id != user.pk and not user.is_staff:
        raise HttpError(404, "No such job.")
    return body


def _state_of(job):
    """What a waiting script sees change: status, step, progress, note, queue position."""
    return (job.status, job.step, job.steps_total, round(job.progress, 4), job.note, job.queue_position)


class _Watch:
    """Reads the state a waiting request watches (read_job: the job `user` may see), keeping the
    row it read: the answer is rendered from that row, not read again through the cache, which
    the change that ended the wait has just emptied for this job. A read that ends the wait
    renders the answer in the same thread hop (`body`), on the way from the change to the script:
    one that finds the job changed from `seen` (once set), or with `until_ended`, ended."""

    def __init__(self, user, job_id, base: str, until_ended=False):
        self.user, self.job_id, self.base, self.until_ended = user, job_id, base, until_ended
        self.job = self.seen = self.body = None

    def __call__(self):
        self.job = domain.read_job(self.user, self.job_id)
        state = None if self.job is None else _state_of(self.job)
        if self.job is None:
            ends = False
        elif self.until_ended:
            ends = state[0] in VideoJob.TERMINAL
        else:
            ends = self.seen is not None and state != self.seen
        self.body = _render(self.job, self.base) if ends else None
        return state

    def answer(self) -> bytes:
        if self.job is None:
            raise HttpError(404, "No such job.")
        return self.body if self.body is not None else _render(self.job, self.base)

    async def answer_async(self) -> bytes:
        return self.body if self.body is not None else await sync_to_async(self.answer)()


def _json(body: bytes, status=200) -> HttpResponse:
    return HttpResponse(body, status=status, content_type=f"{RENDERER.media_type}; charset={RENDERER.charset}")


@router.get("/jobs/{uuid:job_id}", response={200: JobOut, 404: Error}, summary="One job")
async def get_job(request, job_id: uuid.UUID,
                  wait: float = Query(0, ge=0, le=waiting.MAX_WAIT,
                                      description="Seconds to wait for the job to change (status, step, progress) "
                                                  "before answering; at most 60. 0 answers at once.")):
    """What scripts poll, or wait on with `?wait=N`: answered as soon as the job changes, or after
    N seconds with it as it is. A waiting request holds no thread (generation/waiting.py)."""
    user = request.auth
    if wait:
        watch = _Watch(user, job_id, domain.base_url(request))
        # What the script waits to see change is the job as this request first read it. Once
        # watching, it is read again only if something was announced since that read (or no
        # listener ran): one read fewer on most waits.
        mark = waiting.heard()
        seen = watch.seen = await sync_to_async(waiting.read_and_release)(watch)
        if seen is None:
            raise HttpError(404, "No such job.")
        if seen[0] not in VideoJob.TERMINAL:
            async with waiting.watching(job_id) as watching:
                unchanged = mark is not None and waiting.heard() == mark
                if unchanged or await watching.read(watch) == seen:
                    await watching.changed(watch, seen, wait)
        return _json(await watch.answer_async())
    return _json(await sync_to_async(_answer)(user, job_id, domain.base_url(request)))


def _prefer_wait(header: str | None) -> float | None:
    """Seconds from `Prefer: wait` (60) or `Prefer: wait=N` (Replicate's convention), else None."""
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return float(waiting.MAX_WAIT)
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            raise HttpError(422, "Prefer: wait=N needs N in seconds, 1 to 60 (or plain 'wait' for 60).")
        if not 1 <= seconds <= waiting.MAX_WAIT:
            raise HttpError(422, f"Prefer: wait={value.strip()}: N must be 1 to 60 seconds.")
        return seconds
    return None


async def _generate_waiting(request, backend_default):
    """_generate, then with `Prefer: wait` hold the answer until the job ends (200) or the wait
    runs out (202 with the job as it is), without a thread."""
    prefer = _prefer_wait(request.headers.get("Prefer"))
    result = await sync_to_async(_generate)(request, backend_default)
    code, job = result.status_code, result.value
    if prefer is None:
        return result
    user = request.auth
    loop = asyncio.get_running_loop()
    deadline = loop.time() + prefer
    watch = _Watch(user, job["id"], domain.base_url(request), until_ended=True)
    async with waiting.watching(job["id"]) as watching:
        state = await watching.read(watch)
        while state is not None and state[0] not in VideoJob.TERMINAL and loop.time() < deadline:
            state = await watching.changed(watch, state, deadline - loop.time())
    if watch.job is not None:
        body = await watch.answer_async()
    else:
        body = await sync_to_async(_answer)(user, job["id"], domain.base_url(request))
    done = state is not None and state[0] in VideoJob.TERMINAL
    response = _json(body, status=200 if done else code)
    response["Preference-Applied"] = f"wait={int(prefer)}"
    return response


@router.post("/jobs/{uuid:job_id}/cancel", response={200: JobOut, 404: Error, 409: Error}, summary="Cancel a job")
def cancel_job(request, job_id: uuid.UUID):
    job = _job(request, job_id)
    if job.is_terminal:
        raise HttpError(409, f"The job is already {job.status}; nothing to cancel.")
    return domain.job_json(domain.cancel_job(job), domain.base_url(request))


@router.get("/jobs/{uuid:job_id}/video", url_name="job_video", response={200: None, 302: None, 404: Error},
            summary="Download the job's video")
def job_video(request, job_id: uuid.UUID):
    """Streams the video (with HTTP range support), or redirects to a presigned storage URL when
    videos live in R2. Takes the same Bearer token as the rest of the API."""
    from generation.views import video_response

    try:
        return video_response(request, _job(request, job_id))
    except Http404 as exc:
        raise HttpError(404, str(exc))


@router.post("/fal/webhook/{uuid:job_id}", auth=None, url_name="fal_webhook", include_in_schema=False)
def fal_webhook(request, job_id: uuid.UUID, token: str = ""):
    """fal.ai's completion callback; authenticated by a per-job token, idempotent on request_id
    (fal retries deliveries)."""
    import hmac as _hmac

    from generation import fal_runner
    from generation.fal import describe_detail
    from generation.tasks import enqueue

    if not _hmac.compare_digest(token, fal_runner.webhook_token(job_id)):
        raise HttpError(403, "Bad webhook token.")
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise HttpError(400, "The body is not valid JSON.")
    job = VideoJob.objects.filter(pk=job_id, backend=VideoJob.Backend.FAL).first()
    if job is None or not isinstance(body, dict) or body.get("request_id") != job.request_id:
        raise HttpError(404, "No such fal.ai request for this job.")
    if job.is_terminal or job.status == VideoJob.Status.UPLOADING:
        return {"ok": True, "duplicate": True}
    if body.get("status") == "OK" and body.get("payload") is None:
        # fal could not serialise the output into the webhook (payload_error): the request
        # succeeded and was paid for, so the worker fetches the result from response_url.
        log.warning("job %s: fal.ai's webhook carried no payload (%s); fetching the result", job.id,
                    str(body.get("payload_error") or "no reason")[:200])
    elif body.get("status") == "OK":
        try:
            fal_runner.take_result(job, body.get("payload"))
        except fal_runner.FalJobFailed as exc:
            fal_runner.fail_job(job, str(exc))
    else:
        reason = body.get("error") or body.get("payload_error") or "unknown error"
        payload = body.get("payload")
        if isinstance(payload, dict) and payload.get("detail"):
            # fal's webhook says only "Invalid status code: 422"; the payload says what was wrong.
            reason = f"{reason}: {describe_detail(payload['detail'])[0]}"
        fal_runner.fail_job(job, f"fal.ai failed to generate the video: {reason}")
    enqueue("generation.tasks.run_job", str(job.id))
    return {"ok": True}
