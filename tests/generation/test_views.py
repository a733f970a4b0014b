"""The HTML pages of generation: generate, job, jobs; with and without HTMX."""

import re
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from generation.models import VideoJob, Workflow
from gpu.models import GpuConfig
from tests.helpers import png_bytes

S = VideoJob.Status
HX = {"HX-Request": "true"}


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """create_job enqueues after commit; these tests only look at the rows and pages."""
    calls = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda *args, **kw: calls.append(args))
    return calls


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def make_job(owner, *, status=S.QUEUED, workflow="wan22-i2v", prompt="a dragon turns its head", **fields):
    wf = Workflow.objects.get(slug=workflow)
    job = VideoJob(owner=owner, prompt=prompt, workflow=wf, workflow_slug=wf.slug, width=832, height=480, frames=81, fps=16,
                   status=status, **fields)
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(png_bytes()))
    job.save()
    return job


def field_error(html, field):
    """The text of the error shown next to `field` (its id="error-<field>" paragraph), or None."""
    match = re.search(rf'<p class="field-error" id="error-{field}">(.*?)</p>', html, re.S)
    return match.group(1).strip() if match else None


def image(name="still.png", data=None):
    return SimpleUploadedFile(name, data if data is not None else png_bytes(), content_type="image/png")


# ---------------------------------------------------------------------- access


@pytest.mark.parametrize("path", ["/", "/jobs/", "/estimate", "/jobs/{id}/", "/jobs/{id}/status", "/jobs/{id}/badge",
                                  "/jobs/{id}/image", "/uploads/pending"])
def test_pages_redirect_anonymous_users_to_login(client, user, path):
    job = make_job(user)
    resp = client.get(path.format(id=job.id))
    assert resp.status_code == 302
    assert resp["Location"].startswith("/accounts/login/?next=")


@pytest.mark.parametrize("path", ["/jobs/{id}/", "/jobs/{id}/status", "/jobs/{id}/badge", "/jobs/{id}/image",
                                  "/jobs/{id}/video"])
def test_other_users_job_pages_are_404(client, user, other_user, path):
    job = make_job(user, status=S.COMPLETED)
    client.force_login(other_user)
    assert client.get(path.format(id=job.id)).status_code == 404
    assert client.get(path.format(id=job.id), headers=HX).status_code == 404


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_other_users_job_actions_are_404_and_change_nothing(client, user, other_user, action):
    job = make_job(user, status=S.RUNNING if action == "cancel" else S.FAILED)
    client.force_login(other_user)
    assert client.post(f"/jobs/{job.id}/{action}").status_code == 404
    job.refresh_from_db()
    assert not job.cancel_requested and VideoJob.objects.count() == 1


def test_staff_can_open_any_job(client, user, staff):
    job = make_job(user)
    client.force_login(staff)
    assert job.prompt in client.get(f"/jobs/{job.id}/").content.decode()


def test_pages_refuse_the_wrong_method(logged_in, user):
    job = make_job(user)
    assert logged_in.get(f"/jobs/{job.id}/cancel").status_code == 405
    assert logged_in.get("/generate").status_code == 405
    assert logged_in.post(f"/jobs/{job.id}/").status_code == 405


# ---------------------------------------------------------------------- generate page


def test_generate_page_offers_gpu_models_and_hides_fal_without_key(logged_in, settings):
    settings.FAL_KEY = ""
    html = logged_in.get("/").content.decode()
    assert re.search(r'<option value="comfyui:wan22-i2v" selected[^>]*>Wan 2\.2 \(GPU\)</option>', html)
    smoke = re.search(r'<option value="comfyui:smoke"\s([^>]*)>Smoke test \(model-free\)</option>', html)
    # Each model carries its defaults: the placeholders follow the chosen one (static/js/i2v.js).
    assert smoke and 'data-width="64"' in smoke.group(1) and 'data-frames="17"' in smoke.group(1)
    assert "fal.ai" not in html
    # The advanced settings are there, folded, with the workflow's defaults as placeholders.
    assert '<details class="advanced">' in html and 'placeholder="832"' in html and 'placeholder="81"' in html
    assert 'for="id_image"' in html and 'for="id_prompt"' in html and 'for="id_model"' in html
    assert "No GPU configured" in html  # the GPU row of the estimate, linking to the GPU page


def test_generate_page_offers_fal_with_its_price_when_configured(logged_in, settings):
    settings.FAL_KEY = "key-id:secret"
    html = logged_in.get("/").content.decode()
    assert re.search(r'<option value="fal:wan22-i2v"\s[^>]*>Wan 2\.2 \(fal\.ai\)</option>', html)
    # 81 frames at 480p on the base endpoint: 81/16 s × $0.04.
    assert "$0.20 per clip" in html and "81 frames at 480p" in html
    assert "key-id:secret" not in html


def test_estimate_follows_the_form_values(logged_in, settings):
    settings.FAL_KEY = "key-id:secret"
    resp = logged_in.get("/estimate", {"model": "fal:wan22-i2v", "width": "1280", "height": "720", "frames": "161"}, headers=HX)
    html = resp.content.decode()
    assert resp.status_code == 200 and "<html" not in html and 'id="cost-estimate"' in html
    assert "$0.81 per clip" in html and "161 frames at 720p" in html  # 161/16 s × $0.08
    assert '<li class="selected">' in html
    # Without HTMX: the whole page, with the form filled in.
    page = logged_in.get("/estimate", {"model": "fal:wan22-i2v", "frames": "161"}).content.decode()
    assert "<html" in page and 'value="161"' in page


def test_estimate_of_a_rented_gpu_uses_its_rate_and_past_jobs(logged_in, user):
    from gpu.models import VastInstance

    VastInstance.objects.create(vast_id=1, gpu_name="RTX 4090", dph_total=Decimal("0.36"), state="running")
    now = timezone.now()
    make_job(user, status=S.COMPLETED, submitted_at=now - timedelta(minutes=5), finished_at=now)
    html = logged_in.get("/").content.decode()
    assert "≈ $0.03 per clip" in html and "RTX 4090 at $0.36/hour, about 5m 00s per clip" in html


def test_generate_creates_the_job_and_opens_its_page(logged_in, user, no_worker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        resp = logged_in.post("/generate", {
            "image": image(), "prompt": "  the dragon breathes fire  ", "negative_prompt": "blurry",
            "model": "comfyui:wan22-i2v", "width": "640", "height": "640", "frames": "33", "fps": "12", "seed": "7",
            "form_key": uuid.uuid4().hex,
        })
    job = VideoJob.objects.get()
    assert resp.status_code == 302 and resp["Location"] == f"/jobs/{job.id}/"
    assert (job.owner, job.prompt, job.negative_prompt, job.backend, job.workflow_slug) == (
        user, "the dragon breathes fire", "blurry", "comfyui", "wan22-i2v")
    assert (job.width, job.height, job.frames, job.fps, job.seed) == (640, 640, 33, 12, 7)
    assert default_storage.open(job.input_image.name).read() == png_bytes()
    # No GPU is configured: the pass right after the job was stored failed it, saying so.
    job.refresh_from_db()
    assert job.status == S.FAILED and "No GPU is configured" in job.error and no_worker == []


def test_generate_with_htmx_answers_hx_redirect(logged_in):
    resp = logged_in.post("/generate", {"image": image(), "prompt": "waves", "model": "comfyui:smoke"}, headers=HX)
    job = VideoJob.objects.get()
    assert resp.status_code == 200 and resp["HX-Redirect"] == f"/jobs/{job.id}/"
    # Empty advanced fields take the workflow's defaults.
    assert (job.workflow_slug, job.width, job.height, job.frames, job.fps) == ("smoke", 64, 64, 17, 8)


def test_generate_shows_each_error_next_to_its_field(logged_in):
    resp = logged_in.post("/generate", {"image": image(), "prompt": "   ", "model": "comfyui:wan22-i2v",
                                        "width": "100", "frames": "20", "fps": "0", "seed": "x"})
    html = resp.content.decode()
    assert resp.status_code == 422 and "<html" in html
    assert field_error(html, "prompt") == "Write a prompt: describe what should move and how."
    assert field_error(html, "width").startswith("Must be a multiple of 16 (got 100; try 96)")
    assert field_error(html, "frames").startswith("Must be 4n+1")
    assert "greater than or equal to 1" in field_error(html, "fps")
    assert "valid integer" in field_error(html, "seed")
    assert field_error(html, "image") is None and field_error(html, "height") is None
    assert 'id="id_frames" name="frames"' in html and 'value="20"' in html  # what was typed stays
    assert '<details class="advanced" open>' in html
    assert "Please fix the 5 problems below." in html
    assert not VideoJob.objects.exists()


def test_generate_with_htmx_swaps_only_the_form_on_errors(logged_in):
    resp = logged_in.post("/generate", {"prompt": "ok", "model": "comfyui:wan22-i2v"}, headers=HX)
    html = resp.content.decode()
    assert resp.status_code == 422 and "HX-Redirect" not in resp
    assert html.lstrip().startswith('<form id="generate-form"') and "<html" not in html
    assert field_error(html, "image") == "Choose an image: a PNG, JPEG or WEBP up to 20 MB."


def test_generate_rejects_a_file_that_is_not_an_image(logged_in):
    resp = logged_in.post("/generate", {"image": image("fake.png", b"GIF89a not really"), "prompt": "x",
                                        "model": "comfyui:wan22-i2v"})
    assert resp.status_code == 422
    assert field_error(resp.content.decode(), "image").startswith("Not a readable PNG, JPEG or WEBP image")


def test_generate_rejects_an_unknown_or_unconfigured_model(logged_in, settings):
    settings.FAL_KEY = ""
    for model in ("comfyui:nope", "fal:wan22-i2v"):
        resp = logged_in.post("/generate", {"image": image(), "prompt": "x", "model": model})
        assert resp.status_code == 422
        assert field_error(resp.content.decode(), "model") == "Choose one of the models in the list."
    assert not VideoJob.objects.exists()


def test_a_valid_image_is_kept_when_other_fields_have_errors(logged_in):
    data = png_bytes(color=(1, 2, 3))
    first = logged_in.post("/generate", {"image": image("mine.png", data), "prompt": " ", "model": "comfyui:smoke"},
                           headers=HX)
    html = first.content.decode()
    assert first.status_code == 422 and '<input type="hidden" name="keep_image" value="1">' in html
    assert "Using <strong>mine.png</strong>" in html and 'src="/uploads/pending"' in html
    assert logged_in.get("/uploads/pending").getvalue() == data
    second = logged_in.post("/generate", {"keep_image": "1", "prompt": "now with a prompt", "model": "comfyui:smoke"},
                            headers=HX)
    job = VideoJob.objects.get()
    assert second["HX-Redirect"] == f"/jobs/{job.id}/"
    assert default_storage.open(job.input_image.name).read() == data
    # The kept copy is gone once used.
    assert logged_in.get("/uploads/pending").status_code == 404


def test_a_double_submitted_form_gives_one_job(logged_in):
    key = uuid.uuid4().hex
    fields = {"prompt": "once", "model": "comfyui:smoke", "form_key": key}
    first = logged_in.post("/generate", {**fields, "image": image()})
    second = logged_in.post("/generate", {**fields, "image": image()})
    assert VideoJob.objects.count() == 1 and first["Location"] == second["Location"]
    # The same form sent again with other content (the back button) is a new job.
    logged_in.post("/generate", {**fields, "prompt": "twice", "image": image()})
    assert VideoJob.objects.count() == 2


# ---------------------------------------------------------------------- job page


def test_job_page_shows_timeline_progress_and_polls(logged_in, user):
    now = timezone.now()
    job = make_job(user, status=S.RUNNING, submitted_at=now, started_at=now, step=2, steps_total=4, progress=0.5,
                   created_at=now - timedelta(seconds=75), eta_at=now + timedelta(seconds=41),
                   node_timings=[["95", "UnetLoaderGGUF", 0.0, 3.0], ["86", "KSamplerAdvanced", 3.0, None]])
    html = logged_in.get(f"/jobs/{job.id}/").content.decode()
    assert f'hx-get="/jobs/{job.id}/status" hx-trigger="every 1s"' in html
    assert '<progress id="job-progress" max="100" value="50"' in html and "Sampling: step 2 of 4" in html
    assert re.search(r"· about (40|41) s left", html)
    assert "Elapsed <strong>1m 15s</strong>" in html
    marks = re.findall(r'<li class="tl tl-(\w+)"', html)
    assert marks == ["done", "skipped", "done", "current", "pending", "pending"]  # no provisioning: a configured URL
    assert "Cancel job" in html and "Retry" not in html
    assert f'src="/jobs/{job.id}/image"' in html


def test_status_partial_polls_while_active(logged_in, user):
    job = make_job(user, status=S.SUBMITTED, queue_position=2)
    resp = logged_in.get(f"/jobs/{job.id}/status", headers=HX)
    html = resp.content.decode()
    assert html.lstrip().startswith('<section id="job-status"') and "<html" not in html
    assert 'hx-trigger="every 1s"' in html and "Waiting in the ComfyUI queue (position 2)" in html
    assert "hx-swap-oob" not in html  # the buttons are left alone (and keep focus) while it runs


def test_status_partial_stops_polling_and_shows_the_video_when_completed(logged_in, user):
    now = timezone.now()
    job = make_job(user, status=S.COMPLETED, submitted_at=now, started_at=now, finished_at=now, progress=1.0,
                   cost_usd=Decimal("0.125"), video_size=2048)
    job.video.name = default_storage.save(f"videos/{job.id}.mp4", ContentFile(b"\x00" * 2048))
    job.save()
    html = logged_in.get(f"/jobs/{job.id}/status", headers=HX).content.decode()
    status_part = html.split('<div id="job-actions"')[0]
    assert "hx-trigger" not in status_part and "hx-get" not in status_part
    assert f'<video class="player" controls preload="metadata" playsinline src="/jobs/{job.id}/video"' in html
    assert f'<a class="button" href="/jobs/{job.id}/video" download>Download video</a>' in html
    assert "<dt>Cost</dt><dd>$0.13</dd>" in html
    # The buttons change with the end of the job: Retry comes out of band, Cancel goes.
    assert '<div id="job-actions" class="job-actions" hx-swap-oob="true">' in html
    assert "Run again" in html and "Cancel job" not in html


def test_status_partial_without_htmx_redirects_to_the_job_page(logged_in, user):
    job = make_job(user)
    resp = logged_in.get(f"/jobs/{job.id}/status")
    assert resp.status_code == 302 and resp["Location"] == f"/jobs/{job.id}/"


def test_failed_job_shows_the_error_and_what_to_try(logged_in, user):
    job = make_job(user, status=S.FAILED, finished_at=timezone.now(), submitted_at=timezone.now(),
                   error="Cannot reach ComfyUI at http://10.0.0.9:8188: connection refused",
                   error_class=VideoJob.ErrorClass.COMFYUI_UNREACHABLE)
    html = logged_in.get(f"/jobs/{job.id}/").content.decode()
    assert "The job failed: comfyui unreachable" in html and "Cannot reach ComfyUI at http://10.0.0.9:8188" in html
    assert "What to try:</strong> Check that ComfyUI is running and reachable" in html
    assert html.count("A vast.ai tunnel URL changes") == 1
    assert re.findall(r'<li class="tl tl-(\w+)"', html)[:3] == ["done", "skipped", "failed"]
    assert "Retry" in html and "Cancel job" not in html


def test_failed_job_without_a_gpu_says_where_to_set_one(logged_in, user):
    job = make_job(user, status=S.FAILED, finished_at=timezone.now(),
                   error="No GPU is configured: set a ComfyUI URL (admin → GPU configuration, or POST /api/gpu/config)")
    html = logged_in.get(f"/jobs/{job.id}/").content.decode()
    assert "Set a ComfyUI URL or rent a GPU on the GPU page, then retry." in html


def test_cancel_a_queued_job_with_htmx(logged_in, user):
    job = make_job(user)
    resp = logged_in.post(f"/jobs/{job.id}/cancel", headers=HX)
    job.refresh_from_db()
    assert job.status == S.CANCELLED and job.cancel_requested
    html = resp.content.decode()
    assert html.lstrip().startswith('<section id="job-status"') and "badge-cancelled" in html
    assert "hx-trigger" not in html.split('<div id="job-actions"')[0]
    assert 'hx-swap-oob="true"' in html and "Retry" in html


def test_cancel_without_htmx_redirects_with_a_message(logged_in, user):
    job = make_job(user)
    resp = logged_in.post(f"/jobs/{job.id}/cancel", follow=True)
    job.refresh_from_db()
    assert job.status == S.CANCELLED
    assert resp.redirect_chain == [(f"/jobs/{job.id}/", 302)] and "The job was cancelled." in resp.content.decode()
    again = logged_in.post(f"/jobs/{job.id}/cancel", follow=True)
    assert "already cancelled; nothing to cancel" in again.content.decode()


def test_retry_creates_a_new_job_with_the_same_inputs(logged_in, user):
    old = make_job(user, status=S.FAILED, finished_at=timezone.now(), negative_prompt="blur", seed=99, steps=4)
    resp = logged_in.post(f"/jobs/{old.id}/retry", headers=HX)
    new = VideoJob.objects.exclude(pk=old.pk).get()
    assert resp["HX-Redirect"] == f"/jobs/{new.id}/"
    assert new.status == S.QUEUED and new.owner == user
    fields = ("prompt", "negative_prompt", "backend", "workflow_slug", "width", "height", "frames", "fps", "seed", "steps")
    assert [getattr(new, f) for f in fields] == [getattr(old, f) for f in fields]
    assert default_storage.open(new.input_image.name).read() == default_storage.open(old.input_image.name).read()
    plain = logged_in.post(f"/jobs/{old.id}/retry")
    assert plain.status_code == 302 and VideoJob.objects.count() == 3


def test_retry_of_a_running_job_is_refused(logged_in, user):
    job = make_job(user, status=S.RUNNING)
    resp = logged_in.post(f"/jobs/{job.id}/retry", follow=True)
    assert VideoJob.objects.count() == 1 and "retry it once it has finished" in resp.content.decode()


def test_job_image_is_served_to_its_owner(logged_in, user):
    job = make_job(user)
    resp = logged_in.get(f"/jobs/{job.id}/image")
    assert resp["Content-Type"] == "image/png" and resp.getvalue() == png_bytes()


# ---------------------------------------------------------------------- jobs page


def test_jobs_page_lists_own_jobs_newest_first(logged_in, user, other_user):
    now = timezone.now()
    older = make_job(user, prompt="older one", created_at=now - timedelta(hours=2), status=S.COMPLETED)
    newer = make_job(user, prompt="newer one", created_at=now - timedelta(hours=1), status=S.RUNNING, step=1, steps_total=4)
    make_job(other_user, prompt="someone else's")
    html = logged_in.get("/jobs/").content.decode()
    assert html.index("newer one") < html.index("older one") and "someone else" not in html
    assert f'<img src="/jobs/{newer.id}/image" alt="" loading="lazy"' in html
    # Active badges poll; finished ones don't.
    assert f'id="badge-{newer.id}" class="badge badge-running"\n      hx-get="/jobs/{newer.id}/badge" hx-trigger="every 2s"' in html
    assert re.search(rf'id="badge-{older.id}" class="badge badge-completed"\s*>', html)
    assert "2 jobs" in html


def test_jobs_page_filters_by_status_and_paginates(logged_in, user):
    for i in range(14):
        make_job(user, prompt=f"job number {i:02d}", status=S.COMPLETED if i % 2 else S.FAILED,
                 created_at=timezone.now() - timedelta(minutes=i))
    page1 = logged_in.get("/jobs/").content.decode()
    assert "Page 1 of 2" in page1 and "job number 00" in page1 and "job number 13" not in page1
    assert 'href="?page=2" rel="next"' in page1
    page2 = logged_in.get("/jobs/", {"page": 2}).content.decode()
    assert "job number 13" in page2 and "job number 00" not in page2
    failed = logged_in.get("/jobs/", {"status": "failed"}).content.decode()
    assert "7 jobs failed" in failed and "job number 01" not in failed and "job number 00" in failed
    assert '<option value="failed" selected>' in failed
    # An unknown status is ignored rather than an error.
    assert "14 jobs," in logged_in.get("/jobs/", {"status": "nonsense"}).content.decode()


def test_jobs_page_empty_state(logged_in):
    html = logged_in.get("/jobs/").content.decode()
    assert "No jobs yet" in html and "Generate your first video" in html


def test_badge_partial_stops_polling_when_terminal(logged_in, user):
    job = make_job(user, status=S.RUNNING, step=3, steps_total=4)
    html = logged_in.get(f"/jobs/{job.id}/badge", headers=HX).content.decode()
    assert "hx-trigger" in html and "Running · 3/4" in html and "<html" not in html
    VideoJob.objects.filter(pk=job.pk).update(status=S.COMPLETED)
    html = logged_in.get(f"/jobs/{job.id}/badge", headers=HX).content.decode()
    assert "hx-trigger" not in html and "Completed" in html
    assert logged_in.get(f"/jobs/{job.id}/badge")["Location"] == f"/jobs/{job.id}/"


def test_nav_marks_the_current_page(logged_in):
    html = logged_in.get("/jobs/").content.decode()
    assert '<a href="/jobs/" aria-current="page">Jobs</a>' in html
    assert '<a href="/" aria-current="page">' not in html


def test_pages_have_no_inline_scripts_or_styles(logged_in, user):
    job = make_job(user, status=S.RUNNING)
    GpuConfig.get()
    for path in ("/", "/jobs/", f"/jobs/{job.id}/", "/gpu/"):
        html = logged_in.get(path).content.decode()
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), path
        assert "<style" not in html and " style=" not in html, path
        # Every script and stylesheet is served by i2v itself (no CDN): relative URLs only.
        sources = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', html)
        assert sources and all(src.startswith("/") and not src.startswith("//") for src in sources), (path, sources)
