"""The fal.ai backend on the same VideoJob: API → queue → status → result → our storage, with cost."""

import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone

from generation import fal_runner, runner, scheduler
from generation.fal import estimate_cost
from generation.models import RunStat, UserQuota, VideoJob
from gpu.models import GpuConfig
from tests.doubles.comfyui import ComfyUIDouble
from tests.doubles.fal import FalDouble
from tests.generation.test_runner import make_job, run_to_end
from tests.helpers import png_bytes

pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status


@pytest.fixture
def fal(settings, monkeypatch):
    with FalDouble() as double:
        settings.FAL_KEY = double.key
        settings.FAL_QUEUE_URL = double.url
        settings.I2V_FAL_POLL_SECONDS = 0
        settings.I2V_FOLLOW_SLICE = 5
        monkeypatch.setattr("generation.tasks.enqueue", lambda *a: None)
        monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
        yield double


def fal_job(user, **kw):
    return make_job(user, workflow="wan22-i2v", backend="fal", **kw)


def test_fal_job_from_the_api_completes_into_our_storage_with_cost(fal, api, user):
    image = io.BytesIO(png_bytes())
    image.name = "in.png"
    resp = api.post("/api/generate-video", data={"prompt": "waves", "backend": "fal", "image": image,
                                                 "width": "832", "height": "480", "frames": "81"}, json=False)
    assert resp.status_code == 202, resp.content
    job = run_to_end(VideoJob.objects.get(pk=resp.json()["id"]))
    assert job.status == S.COMPLETED, job.error
    assert default_storage.open(job.video.name).read() == fal.output_bytes()
    assert job.cost_usd == estimate_cost("fal-ai/wan/v2.2-a14b/image-to-video", 832, 480, 81) == Decimal("0.2025")
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["cost_usd"] == 0.2025 and body["request_id"] == job.request_id
    assert body["video_url"] == f"http://testserver/api/jobs/{job.id}/video"  # served by i2v, not fal's CDN
    sent = fal.submissions[job.request_id]
    assert sent["prompt"] == "waves" and sent["num_frames"] == 81 and sent["resolution"] == "480p"
    assert sent["image_url"].startswith("data:image/png;base64,")
    # Status and result were fetched from the URLs fal returned (without the endpoint's sub-path).
    assert fal.count("GET", "/fal-ai/wan/requests/*/status") >= 1
    assert fal.count("GET", "/fal-ai/wan/v2.2-a14b/image-to-video/requests/*") == 0


def test_fal_queue_position_is_recorded(fal, user):
    fal.queue_polls = None  # stays queued
    job = fal_job(user)
    runner.advance(job.id, deadline=0)
    job.refresh_from_db()
    assert job.status == S.SUBMITTED
    fal_runner.follow(job, fal_runner.client(), deadline=0)
    job.refresh_from_db()
    assert job.queue_position is not None


def test_fal_model_failure_fails_the_job_with_the_message(fal, user):
    fal.fail_message = "CUDA out of memory on the runner"
    job = run_to_end(fal_job(user))
    assert job.status == S.FAILED and "CUDA out of memory" in job.error


def test_fal_submission_cut_off_is_not_paid_twice(fal, user):
    job = fal_job(user)
    VideoJob.objects.filter(pk=job.pk).update(provider_urls={"submitting": timezone.now().isoformat()})
    job = run_to_end(job)
    assert job.status == S.FAILED and "avoid paying twice" in job.error
    assert fal.submissions == {}


def test_fal_bad_key_is_a_clear_failure(fal, user, settings):
    settings.FAL_KEY = "wrong:key"
    job = run_to_end(fal_job(user))
    assert job.status == S.FAILED and "FAL_KEY" in job.error and "wrong:key" not in job.error


def test_cancel_fal_job_uses_the_cancel_url(fal, user, api):
    fal.queue_polls = None
    job = fal_job(user)
    runner.advance(job.id, deadline=0)
    resp = api.post(f"/api/jobs/{job.id}/cancel")
    assert resp.json()["status"] == "cancelled"
    assert fal.count("PUT", "/fal-ai/wan/requests/*/cancel") == 1


def test_fal_webhook_moves_the_job_and_is_idempotent(fal, user, client):
    fal.queue_polls = None
    job = fal_job(user)
    runner.advance(job.id, deadline=0)
    job.refresh_from_db()
    url = f"/api/fal/webhook/{job.id}?token={fal_runner.webhook_token(job.id)}"
    body = {"request_id": job.request_id, "status": "OK",
            "payload": {"video": {"url": f"{fal.url}/files/{job.request_id}.mp4"}}}
    assert client.post(url.replace("token=", "token=x"), body, content_type="application/json").status_code == 403
    first = client.post(url, body, content_type="application/json")
    again = client.post(url, body, content_type="application/json")
    assert first.json() == {"ok": True} and again.json()["duplicate"] is True
    job.refresh_from_db()
    assert job.status == S.UPLOADING


def test_fal_backend_needs_a_key(api, settings):
    settings.FAL_KEY = ""
    resp = api.post("/api/generate-video", data={"prompt": "x", "backend": "fal", "image": io.BytesIO(png_bytes())},
                    json=False)
    assert resp.status_code == 422 and "FAL_KEY" in resp.json()["detail"]


def _learned(kind_job, gpu_class, seconds):
    RunStat.objects.create(workflow_slug=kind_job.workflow_slug, width=kind_job.width, height=kind_job.height,
                           frames=kind_job.frames, gpu_class=gpu_class, runs=5, mean_seconds=seconds)


@pytest.mark.parametrize("policy, deadline, where", [
    ("cheapest", 120, "fal"),  # the GPU (300 s) would miss it; fal.ai (60 s) meets it
    ("cheapest", None, "config"),  # no deadline: the free GPU
    ("gpu_only", 120, "config"),  # the operator never pays fal.ai for GPU jobs
    ("fastest", None, "fal"),
])
def test_policy_and_deadline_choose_between_the_gpu_and_fal(fal, user, settings, policy, deadline, where):
    with ComfyUIDouble() as comfy:
        config = GpuConfig.get()
        config.comfyui_url, config.gpu_provider, config.placement_policy = comfy.url, "local", policy
        config.save()
        probe = make_job(user, workflow="wan22-i2v", place=False)
        _learned(probe, "fal", 60)
        _learned(probe, f"url:{comfy.url}", 300)
        probe.delete()
        deadline_at = timezone.now() + timedelta(seconds=deadline) if deadline else None
        job = make_job(user, workflow="wan22-i2v", deadline_at=deadline_at)
        assert job.place == where
        assert job.backend == ("fal" if where == "fal" else "comfyui")
        if where == "fal":
            job = run_to_end(job)
            assert job.status == S.COMPLETED and job.cost_usd == estimate_cost(settings.FAL_ENDPOINT, 832, 480, 81)


def test_gpu_only_never_spends_on_fal_for_a_gpu_job(fal, user):
    job = make_job(user, workflow="wan22-i2v")
    VideoJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(days=1))
    job = run_to_end(job)
    assert job.backend == "comfyui" and job.status == S.FAILED and "No GPU is configured" in job.error


def test_fal_spend_per_user_per_day_holds_jobs_back(fal, user, settings):
    settings.I2V_FAL_DAILY_USD = 0.1  # one Wan clip at 832x480 costs $0.2025
    job = fal_job(user)
    job.refresh_from_db()
    assert job.place == "" and job.status == S.QUEUED and "fal.ai budget for today is spent" in job.note
    UserQuota.objects.create(user=user, fal_daily_usd=Decimal("5"))
    scheduler.run_pass()
    job.refresh_from_db()
    assert job.place == "fal"


def test_fal_job_survives_two_429s_on_submit_and_a_webhook_without_payload(fal, user, settings, live_server):
    settings.I2V_PUBLIC_URL = live_server.url
    fal.queue_polls, fal.queue_seconds, fal.run_seconds = None, 0.0, 0.05  # done by the clock; the webhook tells us
    fal.unserialisable_payload = True
    fal.fail_submit(times=2, status=429, body='{"detail": "Rate limit exceeded"}')
    job = fal_job(user)

    runner.advance(job.id, deadline=0)  # submits: two 429s, then queued

    job.refresh_from_db()
    assert job.status in (S.SUBMITTED, S.RUNNING) and job.request_id and job.error == ""
    assert fal.count("POST", "/fal-ai/wan/*") == 3 and list(fal.submissions) == [job.request_id]
    fal.wait_for(lambda f: f.webhook_deliveries)
    delivery = fal.webhook_deliveries[0]
    assert delivery["body"]["payload"] is None and delivery["status"] == 200, delivery
    job.refresh_from_db()
    assert job.status in (S.SUBMITTED, S.RUNNING)  # a paid-for success is not failed for a missing payload

    job = run_to_end(job)  # the worker fetches the result from response_url
    assert job.status == S.COMPLETED, job.error
    assert default_storage.open(job.video.name).read() == fal.output_bytes()
    assert fal.count("GET", f"/fal-ai/wan/requests/{job.request_id}") == 1


def test_fal_input_image_url_outlives_the_queue_wait_and_the_run(fal, user, settings, s3_server):
    from urllib.parse import parse_qs, urlsplit

    import httpx

    settings.R2_BUCKET = "videos"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
        "bucket_name": "videos", "endpoint_url": s3_server, "region_name": "auto", "access_key": "k",
        "secret_key": "s", "file_overwrite": False, "default_acl": None}}}
    job = fal_job(user)

    runner.advance(job.id, deadline=0)

    job.refresh_from_db()
    sent = fal.submissions[job.request_id]["image_url"]
    assert int(parse_qs(urlsplit(sent).query)["X-Amz-Expires"][0]) == 4 * 3600  # 3 h in fal's queue at most, 1 h to run
    assert httpx.get(sent).content == default_storage.open(job.input_image.name).read()
    submit = next(r for r in fal.requests if r.method == "POST")
    assert submit.headers["X-Fal-Request-Timeout"] == str(3 * 3600)  # fal drops it rather than start it after that


# fal's documented model error for a flagged input (docs.fal.ai, "Model Errors"): a 422 whose detail
# lists one entry per problem.
CONTENT_POLICY = [{"loc": ["body", "prompt"], "msg": "The content was flagged by a content checker.",
                   "type": "content_policy_violation", "url": "https://docs.fal.ai/errors#content_policy_violation",
                   "input": "a flagged prompt", "categories": ["violence"]}]


def test_fal_content_policy_failure_is_its_own_class_with_advice(fal, user, api):
    fal.fail_status, fal.fail_message, fal.fail_type = 422, CONTENT_POLICY, "content_policy_violation"
    job = run_to_end(fal_job(user))
    assert job.status == S.FAILED and "flagged by a content checker" in job.error
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["error_class"] == "fal_content_policy"
    assert "content checker flagged the prompt or the image" in body["advice"]


def test_fal_bad_input_is_its_own_class(fal, user, api):
    job = fal_job(user)
    VideoJob.objects.filter(pk=job.pk).update(frames=200)  # fal's num_frames is 17-161
    job = run_to_end(job)
    assert job.status == S.FAILED
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["error_class"] == "fal_bad_input", body["error"]
    assert "change the field it names" in body["advice"]


def test_fal_model_failure_is_a_fal_error_with_its_dashboard(fal, user, api):
    fal.fail_message = "CUDA out of memory on the runner"
    job = run_to_end(fal_job(user))
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["error_class"] == "fal_error" and "fal.ai/dashboard/requests" in body["advice"]
