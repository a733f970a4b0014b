"""The generate and jobs routes."""

import json
import uuid
from datetime import datetime
from typing import Optional

from django.http import Http404, HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.renderers import JSONRenderer
from ninja.responses import Status
from ninja.errors import HttpError
from pydantic import ValidationError as PydanticValidationError

from generation import domain, jobcache
from generation.inputs import GenerateParams, InputError
from generation.models import VideoJob
from generation.views import _get_job_for_user
from i2v.core.throttles import generate_rate

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
         "description": "Repeat a request safely: the same key returns the same job."},
    ],
}


def _pydantic_detail(exc: PydanticValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "request"
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        parts.append(f"{field}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def _parse_generate(request, backend_default):
    content_type = request.content_type or ""
    image_bytes = None
    if content_type.startswith("multipart/form-data"):
        raw = {k: v for k, v in request.POST.items()}
        unknown = set(request.FILES) - {"image"}
        if unknown:
            raise InputError(sorted(unknown)[0], "unknown file field; send the image as 'image'")
        upload = request.FILES.get("image")
        if upload is not None:
            if upload.size > 20 * 1024 * 1024:
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
    params, image_bytes = _parse_generate(request, backend_default)
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and (len(key) > 200 or not key.isprintable()):
        raise HttpError(422, "Idempotency-Key: must be at most 200 printable characters.")
    try:
        job, created = domain.create_job(request.auth, params, image_bytes=image_bytes, idempotency_key=key)
    except InputError as exc:
        raise HttpError(422, str(exc))
    except domain.QueueFull as exc:
        raise HttpError(429, str(exc))
    return Status(202 if created else 200, domain.job_json(job))


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


@router.post("/generate-video", response={200: JobOut, 202: JobOut, 400: Error, 415: Error, 422: Error, 429: Error},
             throttle=[GENERATE_RATE],
             openapi_extra=GENERATE_DOC, summary="Generate a video (backend comfyui or fal)")
def generate_video(request):
    """Multipart with an `image` file, or JSON with `image_url`. 202 with the new job;
    200 with the existing job when the `Idempotency-Key` was used before."""
    return _generate(request, "comfyui")


@router.post("/vastai/generate-video", response={200: JobOut, 202: JobOut, 400: Error, 415: Error, 422: Error, 429: Error},
             throttle=[GENERATE_RATE],
             openapi_extra=GENERATE_DOC, summary="Generate a video on the GPU (the seed's endpoint)")
def vastai_generate_video(request):
    """Uses the configured ComfyUI URL, else a ready vast.ai instance."""
    return _generate(request, "comfyui")


class JobFilter(Schema):
    status: Optional[VideoJob.Status] = None
    limit: int = 20
    offset: int = 0


@router.get("/jobs", response=JobList, summary="Your jobs, newest first")
def list_jobs(request, filters: Query[JobFilter]):
    if not 1 <= filters.limit <= 100:
        raise HttpError(422, "limit: must be between 1 and 100")
    if filters.offset < 0:
        raise HttpError(422, "offset: must be 0 or more")
    qs = VideoJob.objects.filter(owner=request.auth).only(*domain.JOB_JSON_FIELDS).order_by("-created_at")
    if filters.status:
        qs = qs.filter(status=filters.status)
    count = qs.count()
    page = qs[filters.offset: filters.offset + filters.limit]
    return {"items": [domain.job_json(j) for j in page], "count": count,
            "limit": filters.limit, "offset": filters.offset}


def _job(request, job_id):
    try:
        return _get_job_for_user(request.auth, job_id)
    except (Http404, ValueError):
        raise HttpError(404, "No such job.")


@router.get("/jobs/{uuid:job_id}", response={200: JobOut, 404: Error}, summary="One job")
def get_job(request, job_id: uuid.UUID):
    """What scripts poll: answered from the shared cache when it has the job (generation/jobcache.py)."""
    renderer = RENDERER
    user = request.auth
    cached = jobcache.get(job_id)
    if cached is None:
        job = domain.read_job(user, job_id)
        if job is None:
            raise HttpError(404, "No such job.")
        # Validated and rendered once; a cached answer is sent as these bytes.
        answer = JobOut.model_validate(domain.job_json(job)).model_dump()
        body = renderer.render(request, answer, response_status=200)
        cached = (job.owner_id, body)
        jobcache.put(job_id, *cached)
    owner_id, body = cached
    if owner_id != user.pk and not user.is_staff:
        raise HttpError(404, "No such job.")
    return HttpResponse(body, content_type=f"{renderer.media_type}; charset={renderer.charset}")


@router.post("/jobs/{uuid:job_id}/cancel", response={200: JobOut, 404: Error, 409: Error}, summary="Cancel a job")
def cancel_job(request, job_id: uuid.UUID):
    job = _job(request, job_id)
    if job.is_terminal:
        raise HttpError(409, f"The job is already {job.status}; nothing to cancel.")
    return domain.job_json(domain.cancel_job(job))


@router.post("/fal/webhook/{uuid:job_id}", auth=None, url_name="fal_webhook", include_in_schema=False)
def fal_webhook(request, job_id: uuid.UUID, token: str = ""):
    """fal.ai's completion callback; authenticated by a per-job token, idempotent on request_id
    (fal retries deliveries)."""
    import hmac as _hmac

    from generation import fal_runner
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
    if body.get("status") == "OK":
        try:
            fal_runner.take_result(job, body.get("payload"))
        except fal_runner.FalJobFailed as exc:
            fal_runner.fail_job(job, str(exc))
    else:
        fal_runner.fail_job(job, f"fal.ai failed to generate the video: {body.get('error') or body.get('payload_error') or 'unknown error'}")
    enqueue("generation.tasks.run_job", str(job.id))
    return {"ok": True}
