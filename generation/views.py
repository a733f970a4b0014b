import mimetypes
import os
import re
import uuid
from decimal import Decimal

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect
from pydantic import ValidationError as PydanticValidationError

from generation import charts
from generation.charts import node_timeline
from generation.domain import QueueFull
from generation.failures import GPU_CLASSES, advice
from generation.inputs import MAX_IMAGE_BYTES, GenerateParams, InputError, clean_image
from generation.models import VideoJob, Workflow
from i2v.core.auth import bearer_user

S = VideoJob.Status


def _get_job_for_user(user, job_id):
    """The job if `user` may see it (owner or staff); 404 otherwise, so ids don't leak."""
    qs = VideoJob.objects.all() if user.is_staff else VideoJob.objects.filter(owner=user)
    try:
        return qs.get(pk=job_id)
    except VideoJob.DoesNotExist:
        raise Http404("No such job.")


RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _file_chunks(fh, start, length, chunk=256 * 1024):
    try:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                break
            remaining -= len(data)
            yield data
    finally:
        fh.close()


@require_GET
def job_video(request, job_id):
    """The job's video, behind an ownership check, with HTTP range support (browsers seek)."""
    user = request.user if request.user.is_authenticated else bearer_user(request)
    if user is None:
        if request.headers.get("Authorization"):
            return HttpResponse("Invalid or revoked token.", status=401, content_type="text/plain")
        return redirect(f"{settings.LOGIN_URL}?next={request.path}")
    return video_response(request, _get_job_for_user(user, job_id))


def video_response(request, job):
    """The job's video: a redirect to its storage URL on R2, else streamed with HTTP range support."""
    if not job.video:
        raise Http404("This job has no video yet.")
    if settings.R2_BUCKET:
        return redirect(default_storage.url(job.video.name))
    try:
        size = default_storage.size(job.video.name)
        fh = default_storage.open(job.video.name, "rb")
    except (FileNotFoundError, OSError):
        raise Http404("The video file is missing from storage.")
    filename = f"i2v-{job.id}{os.path.splitext(job.video.name)[1] or '.mp4'}"
    match = RANGE_RE.match(request.headers.get("Range", ""))
    if match and (match.group(1) or match.group(2)):
        first, last = match.groups()
        if first:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        else:
            start, end = max(0, size - int(last)), size - 1
        if start >= size or start > end:
            fh.close()
            resp = HttpResponse(status=416)
            resp["Content-Range"] = f"bytes */{size}"
            return resp
        resp = StreamingHttpResponse(_file_chunks(fh, start, end - start + 1), status=206, content_type="video/mp4")
        resp["Content-Range"] = f"bytes {start}-{end}/{size}"
        resp["Content-Length"] = str(end - start + 1)
    else:
        resp = FileResponse(fh, content_type="video/mp4")
        resp["Content-Length"] = str(size)
    resp["Accept-Ranges"] = "bytes"
    resp["Content-Disposition"] = f'inline; filename="{filename}"'
    resp["Cache-Control"] = "private, max-age=3600"
    return resp


# ---------------------------------------------------------------------- the generate page

WAN = "wan22-i2v"
GPU_MODEL = f"comfyui:{WAN}"
FAL_MODEL = f"fal:{WAN}"
NUMBER_FIELDS = ("width", "height", "frames", "fps", "seed")
FORM_FIELDS = ("prompt", "negative_prompt", "model", *NUMBER_FIELDS)
# Where an error about a GenerateParams/create_job field is shown on the form.
FIELD_OF = {"backend": "model", "workflow": "model", "image_url": "image"}
FRIENDLY = {
    ("prompt", "string_too_short"): "Write a prompt: describe what should move and how.",
    ("prompt", "missing"): "Write a prompt: describe what should move and how.",
}
PENDING_KEY = "i2v_pending_image"
PER_PAGE = 12


def model_choices():
    """(value, label, workflow) for the model dropdown: Wan 2.2 on the GPU first, on fal.ai
    when FAL_KEY is set, then every other active workflow (run on the GPU)."""
    workflows = list(Workflow.objects.filter(is_active=True).order_by("slug"))
    wan = next((w for w in workflows if w.slug == WAN), None)
    choices = []
    if wan:
        choices.append((GPU_MODEL, "Wan 2.2 (GPU)", wan))
        if settings.FAL_KEY:
            choices.append((FAL_MODEL, "Wan 2.2 (fal.ai)", wan))
    choices += [(f"comfyui:{w.slug}", w.name, w) for w in workflows if w is not wan]
    return choices


def _default_model(choices):
    from gpu.models import GpuConfig

    preferred = f"comfyui:{GpuConfig.get().default_workflow or WAN}"
    values = [value for value, _, _ in choices]
    return preferred if preferred in values else (values[0] if values else "")


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _average_gpu_seconds(workflow_slug):
    """Mean submit→finish time of the last completed GPU jobs of this workflow (None without history)."""
    rows = (
        VideoJob.objects.filter(status=S.COMPLETED, backend=VideoJob.Backend.COMFYUI, workflow_slug=workflow_slug,
                                submitted_at__isnull=False, finished_at__isnull=False)
        .order_by("-finished_at")
        .values_list("submitted_at", "finished_at")[:20]
    )
    seconds = [(end - start).total_seconds() for start, end in rows]
    return sum(seconds) / len(seconds) if seconds else None


def _gpu_estimate(workflow_slug, selected):
    from generation.templatetags.i2v_format import duration, usd
    from gpu.models import GpuConfig, VastInstance

    config = GpuConfig.get()
    row = {"label": "GPU (ComfyUI)", "selected": selected, "link": ""}
    live = VastInstance.objects.filter(state__in=VastInstance.LIVE).order_by("dph_total").first()
    average = _average_gpu_seconds(workflow_slug)
    if live:
        rate = live.dph_total
        if average:
            row["text"] = f"≈ {usd(rate * Decimal(average) / Decimal(3600))} per clip"
            row["detail"] = f"{live.gpu_name or 'GPU'} at {usd(rate)}/hour, about {duration(average)} per clip so far"
        else:
            row["text"] = f"{usd(rate)}/hour"
            row["detail"] = f"{live.gpu_name or 'GPU'} on vast.ai, billed per hour while it runs"
    elif config.comfyui_url:
        row["text"] = "No per-clip charge"
        row["detail"] = "Runs on your own ComfyUI server"
    elif settings.VASTAI_API_KEY:
        row["text"] = f"up to {usd(config.max_dph)}/hour"
        row["detail"] = "A vast.ai GPU is rented for the job and billed per hour while it runs"
    else:
        row["text"] = "No GPU configured"
        row["detail"] = "Set a ComfyUI URL or rent a GPU first"
        row["link"] = reverse("gpu:index")
    return row


def _fal_estimate(width, height, frames, selected):
    from generation import fal
    from generation.templatetags.i2v_format import usd

    endpoint = settings.FAL_ENDPOINT or fal.WAN_I2V
    try:
        cost = fal.estimate_cost(endpoint, width, height, frames)
    except (KeyError, ValueError):
        cost = fal.estimate_cost(fal.WAN_I2V, width, height, frames)
    return {
        "label": "fal.ai", "selected": selected, "link": "", "text": f"{usd(cost)} per clip",
        "detail": f"{frames} frames at {fal.resolution_for(width, height)}, fal.ai's published price",
    }


def cost_estimates(form, choices):
    """One row per backend: what a clip with these settings costs there."""
    by_value = {value: wf for value, _, wf in choices}
    model = form.get("model") or ""
    workflow = by_value.get(model)
    defaults = (workflow.defaults if workflow else {}) or {}
    wan = by_value.get(GPU_MODEL) or by_value.get(FAL_MODEL)
    wan_defaults = (wan.defaults if wan else {}) or {"width": 832, "height": 480, "frames": 81}
    rows = [_gpu_estimate(workflow.slug if workflow else WAN, model.startswith("comfyui:"))]
    if settings.FAL_KEY:
        # fal.ai always runs Wan 2.2: its price follows the form's numbers, else Wan's defaults.
        rows.append(_fal_estimate(
            _int_or_none(form.get("width")) or wan_defaults.get("width", 832),
            _int_or_none(form.get("height")) or wan_defaults.get("height", 480),
            _int_or_none(form.get("frames")) or wan_defaults.get("frames", 81),
            model == FAL_MODEL,
        ))
    return rows, defaults


def _form_context(request, form=None, errors=None):
    choices = model_choices()
    form = {key: value for key, value in (form or {}).items()}
    if form.get("model") not in {value for value, _, _ in choices}:
        form["model"] = _default_model(choices)
    estimates, defaults = cost_estimates(form, choices)
    return {
        "form": form,
        "errors": errors or {},
        "choices": [(value, label) for value, label, _ in choices],
        # Each model's defaults: the Advanced fields' placeholders follow the chosen model (i2v.js).
        "model_defaults": [(value, label, wf.defaults or {}) for value, label, wf in choices],
        "defaults": defaults,
        "estimates": estimates,
        "form_key": form.get("form_key") or uuid.uuid4().hex,
        "kept_image": request.session.get(PENDING_KEY),
        "advanced_open": any(form.get(f) for f in NUMBER_FIELDS) or any(f in (errors or {}) for f in NUMBER_FIELDS),
    }


def _keep_image(request, data, ext, filename):
    """Hold a valid upload across a re-render of the form, so a prompt error doesn't lose the image."""
    _drop_kept_image(request)
    name = default_storage.save(f"inputs/pending/{uuid.uuid4().hex}.{ext}", ContentFile(data))
    request.session[PENDING_KEY] = {"name": name, "filename": os.path.basename(filename or "")[:120] or f"image.{ext}"}


def _kept_image_bytes(request):
    kept = request.session.get(PENDING_KEY)
    if not kept:
        return None
    try:
        with default_storage.open(kept["name"], "rb") as fh:
            return fh.read()
    except OSError:
        request.session.pop(PENDING_KEY, None)
        return None


def _drop_kept_image(request):
    kept = request.session.pop(PENDING_KEY, None)
    if kept:
        try:
            default_storage.delete(kept["name"])
        except OSError:
            pass


def _read_image(request, errors):
    """(bytes, ext, filename, is_new_upload) of the submitted or kept image; records an error otherwise."""
    upload = request.FILES.get("image")
    if upload is not None:
        if upload.size > MAX_IMAGE_BYTES:
            errors["image"] = f"The file is {upload.size / 1e6:.1f} MB; the limit is 20 MB."
            return None
        data = upload.read()
        try:
            data, ext = clean_image(data)
        except InputError as exc:
            errors["image"] = _sentence(exc.message)
            return None
        return data, ext, upload.name, True
    if request.POST.get("keep_image"):
        data = _kept_image_bytes(request)
        if data is not None:
            return data, None, None, False
    errors["image"] = "Choose an image: a PNG, JPEG or WEBP up to 20 MB."
    return None


def _sentence(message):
    message = str(message).removeprefix("Value error, ")
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


def _pydantic_errors(exc):
    errors = {}
    for err in exc.errors():
        field = str(err.get("loc", ("",))[0] or "")
        field = FIELD_OF.get(field, field)
        errors.setdefault(field, FRIENDLY.get((field, err.get("type")), _sentence(err.get("msg", "invalid"))))
    return errors


def _idempotency_key(form_key, params, image_bytes):
    """The form's one-time key plus a digest of what was sent: a double submit gives one job, while
    a changed form re-sent with the same key (the back button) still gives a new one."""
    import hashlib

    if not re.fullmatch(r"[0-9a-f]{32}", form_key or ""):
        return None
    digest = hashlib.sha256(params.model_dump_json().encode() + image_bytes).hexdigest()[:24]
    return f"form:{form_key}:{digest}"


@require_GET
@login_required
def home(request):
    """The generate page."""
    _drop_kept_image(request)
    return render(request, "generation/generate.html", _form_context(request))


@require_GET
@login_required
def estimate(request):
    """The cost estimate for the form's current values (the whole page without HTMX)."""
    form = {key: request.GET.get(key, "") for key in FORM_FIELDS}
    context = _form_context(request, form)
    if request.htmx:
        return render(request, "generation/generate.html#cost-estimate", context)
    return render(request, "generation/generate.html", context)


@require_POST
@login_required
def generate(request):
    """Validate like the API, create the job and open its page; re-render the form with errors (422)."""
    from generation.domain import create_job

    form = {key: request.POST.get(key, "") for key in FORM_FIELDS}
    form["form_key"] = request.POST.get("form_key", "")
    errors = {}
    backend, _, workflow = form["model"].partition(":")
    if form["model"] not in {value for value, _, _ in model_choices()}:
        errors["model"] = "Choose one of the models in the list."
    image = _read_image(request, errors)
    raw = {"prompt": form["prompt"], "negative_prompt": form["negative_prompt"], "backend": backend or "comfyui",
           "workflow": workflow}
    raw.update({key: form[key].strip() for key in NUMBER_FIELDS if form[key].strip()})
    params = None
    try:
        params = GenerateParams.model_validate(raw)
    except PydanticValidationError as exc:
        for field, message in _pydantic_errors(exc).items():
            errors.setdefault(field, message)
    if params is not None and not errors:
        try:
            job, _ = create_job(request.user, params, image_bytes=image[0],
                                idempotency_key=_idempotency_key(form["form_key"], params, image[0]))
        except InputError as exc:
            errors[FIELD_OF.get(exc.field, exc.field)] = _sentence(exc.message)
        except QueueFull as exc:
            errors["form"] = str(exc)
    if errors:
        # Errors about fields the page has no input for (steps, webhook_url) go on top of the form.
        for field in [f for f in errors if f not in (*FORM_FIELDS, "image")]:
            errors.setdefault("form", _sentence(f"{field}: {errors.pop(field)}"))
        if image is not None and image[3]:
            _keep_image(request, image[0], image[1], image[2])
        context = _form_context(request, form, errors)
        template = "generation/generate.html#generate-form" if request.htmx else "generation/generate.html"
        return render(request, template, context, status=422)
    _drop_kept_image(request)
    url = reverse("generation:job_detail", args=[job.id])
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


@require_GET
@login_required
def pending_image(request):
    """The image kept from a form that had errors (this session's only)."""
    kept = request.session.get(PENDING_KEY)
    if not kept:
        raise Http404("No image is waiting.")
    return _serve_image(kept["name"])


# ---------------------------------------------------------------------- the job page

STEP_LABELS = {S.QUEUED: "Queued", S.PROVISIONING: "Provisioning", S.SUBMITTED: "Submitted", S.RUNNING: "Running",
               S.UPLOADING: "Uploading", S.COMPLETED: "Completed"}


def timeline(job):
    """The forward path with each state done, current, skipped, failed or pending."""
    stamps = {S.QUEUED: job.created_at, S.PROVISIONING: job.provisioning_at, S.SUBMITTED: job.submitted_at,
              S.RUNNING: job.started_at, S.UPLOADING: job.uploading_at,
              S.COMPLETED: job.finished_at if job.status == S.COMPLETED else None}
    if job.status in VideoJob.PATH:
        here = VideoJob.PATH.index(job.status)
    else:
        # Failed or cancelled: where it stopped is the last state it reached.
        here = max(i for i, state in enumerate(VideoJob.PATH) if stamps[state] is not None)
    steps = []
    for i, state in enumerate(VideoJob.PATH):
        if i < here:
            mark = "done" if stamps[state] else "skipped"
        elif i == here:
            mark = {S.FAILED: "failed", S.CANCELLED: "cancelled", S.COMPLETED: "done"}.get(job.status, "current")
        else:
            mark = "pending"
        steps.append({"state": state, "label": STEP_LABELS[state], "mark": mark, "at": stamps[state]})
    return steps


def _about(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, int(round(seconds)))} s"
    if seconds < 90 * 60:
        return f"about {int(round(seconds / 60))} min"
    return f"about {seconds / 3600:.1f} h"


def queue_message(job, now=None) -> str:
    """Where a waiting job stands in i2v's queue, and when it is expected to start."""
    from generation.scheduler import queue_estimate

    ahead, start = queue_estimate(job, now)
    if ahead is None:
        return ""
    text = "Waiting in the queue: " + ("next in line" if ahead == 0 else
                                       f"{ahead} job{'s' if ahead != 1 else ''} ahead of it")
    if start is not None:
        text += f", expected to start in {_about((start - (now or timezone.now())).total_seconds())}"
    return text


# What the node that runs now does, by its class (the last open entry of node_timings).
PHASES = (("Sampler", "sampling"), ("Loader", "loading the models"), ("TextEncode", "encoding the prompt"),
          ("VAEDecode", "decoding the frames"), ("ImageToVideo", "preparing the latent video"),
          ("CreateVideo", "encoding the video"), ("SaveVideo", "encoding the video"), ("LoadImage", "loading the image"))


def _phase(job) -> str:
    timings = job.node_timings or []
    if not timings or timings[-1][3] is not None:
        return ""
    class_type = timings[-1][1] or ""
    return next((words for needle, words in PHASES if needle in class_type), f"running {class_type}" if class_type else "")


def status_message(job):
    if job.cancel_requested and not job.is_terminal:
        return "Cancelling…"
    if job.unreachable_since is not None and job.status in (S.QUEUED, S.PROVISIONING, S.SUBMITTED):
        return "Waiting for ComfyUI to answer"
    if job.status in (S.QUEUED, S.PROVISIONING) and not job.place:
        waiting = queue_message(job)
        if job.status == S.PROVISIONING:
            return "Renting and starting a GPU (this can take a few minutes)" + (f". {waiting}" if waiting else "")
        return waiting or "Waiting in the queue"
    if job.status in (S.QUEUED, S.PROVISIONING):
        return "Placed on a GPU; sending it the job"
    if job.status == S.SUBMITTED:
        if job.queue_position:
            return f"Waiting in the ComfyUI queue (position {job.queue_position})"
        return "Submitted; waiting for the GPU to start"
    if job.status == S.RUNNING:
        phase = _phase(job)
        if phase == "sampling" and job.steps_total:
            return f"Sampling: step {job.step} of {job.steps_total}"
        if phase:
            return phase[:1].upper() + phase[1:]
        if job.steps_total:
            return f"Step {job.step} of {job.steps_total}"
        return f"Running {job.current_node}" if job.current_node else "Running"
    if job.status == S.UPLOADING:
        return "Saving the video"
    return job.get_status_display()


def eta_text(job) -> str:
    """ "about 40 s left" from the job's ETA (learned from past runs), or "" when there is none."""
    if job.is_terminal or job.eta_at is None:
        return ""
    left = (job.eta_at - timezone.now()).total_seconds()
    if left < 1:
        return "almost done"
    return f"{_about(left)} left"


def _status_context(job):
    from generation.domain import cost_estimate, video_url

    elapsed = ((job.finished_at or timezone.now()) - job.created_at).total_seconds()
    return {
        "job": job,
        "timeline": timeline(job),
        "elapsed": elapsed,
        "percent": max(0, min(100, int(round((job.progress or 0) * 100)))),
        "message": status_message(job),
        "video_url": video_url(job),
        "error_text": job.error,
        "hint": advice(job),
        "gpu_hint": job.error_class in GPU_CLASSES,
        "eta": eta_text(job),
        "node_timeline": node_timeline(job),
        "estimate": cost_estimate(job),
        "note": job.note,
    }


def _status_response(request, job, *, actions=False):
    """The live status partial; with the action buttons out of band when they change."""
    context = _status_context(job)
    html = render_to_string("generation/job_detail.html#job-status", context, request=request)
    if actions or job.is_terminal:
        html += render_to_string("generation/job_detail.html#job-actions", {**context, "oob": True}, request=request)
    return HttpResponse(html)


@require_GET
@login_required
def job_detail(request, job_id):
    job = _get_job_for_user(request.user, job_id)
    return render(request, "generation/job_detail.html", _status_context(job))


@require_GET
@login_required
def job_status(request, job_id):
    """Polled by the job page; without HTMX, the job page itself."""
    job = _get_job_for_user(request.user, job_id)
    if not request.htmx:
        return redirect("generation:job_detail", job_id=job.id)
    return _status_response(request, job)


@require_POST
@login_required
def job_cancel(request, job_id):
    from generation.domain import cancel_job

    job = _get_job_for_user(request.user, job_id)
    already = job.is_terminal
    if not already:
        job = cancel_job(job)
    if request.htmx:
        return _status_response(request, job, actions=True)
    if already:
        messages.info(request, f"The job is already {job.status}; nothing to cancel.")
    elif job.is_terminal:
        messages.success(request, "The job was cancelled.")
    else:
        messages.info(request, "Cancelling: the GPU is stopping the run.")
    return redirect("generation:job_detail", job_id=job.id)


@require_POST
@login_required
def job_retry(request, job_id):
    """A new job with the same image and settings."""
    from generation.domain import create_job

    job = _get_job_for_user(request.user, job_id)
    back = reverse("generation:job_detail", args=[job.id])
    if not job.is_terminal:
        messages.info(request, "The job is still running; retry it once it has finished.")
        return HttpResponseClientRedirect(back) if request.htmx else redirect(back)
    try:
        with default_storage.open(job.input_image.name, "rb") as fh:
            image = fh.read()
        params = GenerateParams(
            prompt=job.prompt, negative_prompt=job.negative_prompt, backend=job.backend, workflow=job.workflow_slug,
            width=job.width, height=job.height, frames=job.frames, fps=job.fps, seed=job.seed, steps=job.steps,
        )
        new, _ = create_job(request.user, params, image_bytes=image)
    except (OSError, InputError, PydanticValidationError, QueueFull) as exc:
        messages.error(request, f"Could not retry: {exc}")
        return HttpResponseClientRedirect(back) if request.htmx else redirect(back)
    url = reverse("generation:job_detail", args=[new.id])
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


# ---------------------------------------------------------------------- the jobs page


@require_GET
@login_required
def job_list(request):
    status = request.GET.get("status", "")
    jobs = VideoJob.objects.filter(owner=request.user).select_related("workflow").order_by("-created_at")
    if status in S.values:
        jobs = jobs.filter(status=status)
    else:
        status = ""
    page = Paginator(jobs, PER_PAGE).get_page(request.GET.get("page"))
    days = charts.daily(request.user)
    context = {"page_obj": page, "status": status, "statuses": S.choices}
    if any(d.done or d.failed for d in days):
        context["charts"] = [charts.jobs_chart(days), charts.money_chart(days)]
    return render(request, "generation/job_list.html", context)


@require_GET
@login_required
def job_badge(request, job_id):
    """A row's live status badge; without HTMX, the job page."""
    job = _get_job_for_user(request.user, job_id)
    if not request.htmx:
        return redirect("generation:job_detail", job_id=job.id)
    return render(request, "generation/job_list.html#job-badge", {"job": job})


def _serve_image(name):
    if settings.R2_BUCKET:
        return redirect(default_storage.url(name))
    try:
        fh = default_storage.open(name, "rb")
    except (FileNotFoundError, OSError):
        raise Http404("The image is missing from storage.")
    resp = FileResponse(fh, content_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
    resp["Cache-Control"] = "private, max-age=3600"
    resp["X-Content-Type-Options"] = "nosniff"
    return resp


@require_GET
@login_required
def job_image(request, job_id):
    """The job's input image (the thumbnail), behind the ownership check."""
    job = _get_job_for_user(request.user, job_id)
    if not job.input_image:
        raise Http404("This job has no image.")
    return _serve_image(job.input_image.name)
