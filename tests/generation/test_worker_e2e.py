"""The whole path through a real django-q2 worker (qcluster) on the configured broker:
API → queue → worker → ComfyUI double → storage → GET /api/jobs/{id} → the video."""

import contextlib
import time
from pathlib import Path

import pytest

from generation.domain import sync_shipped_workflows
from generation.models import VideoJob, Workflow
from gpu.models import ModelFile
from gpu.models import GpuConfig
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import png_bytes, qcluster

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow_start]


@pytest.fixture
def start_worker():
    """start(**env) runs `manage.py qcluster` (tests.helpers.qcluster) with these extra environment
    variables; every one started is stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **extra: stack.enter_context(qcluster(**{"I2V_WORKERS": 2, **extra}))


@pytest.fixture
def worker(request, start_worker):
    # A test may ask for more worker processes (indirect parametrize): one follows each running job.
    return start_worker(I2V_WORKERS=getattr(request, "param", 2))


def wait_for_status(api, job_id, timeout=60) -> dict:
    """Poll the job through the API, as a script would, until it is finished."""
    end = time.monotonic() + timeout
    body = {}
    while time.monotonic() < end:
        body = api.get(f"/api/jobs/{job_id}").json()
        if body["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    return body


def test_api_job_runs_on_the_worker_and_serves_the_video(api, worker):
    import io

    sync_shipped_workflows(Workflow, ModelFile)
    with ComfyUIDouble(run_seconds=0.3) as comfy:
        config = GpuConfig.get()
        config.comfyui_url = comfy.url
        config.save()
        image = io.BytesIO(png_bytes())
        image.name = "in.png"
        resp = api.post("/api/generate-video", data={"prompt": "waves", "workflow": "smoke", "image": image}, json=False)
        assert resp.status_code == 202
        job_id = resp.json()["id"]
        body = wait_for_status(api, job_id)
        assert body["status"] == "completed", (body, worker.poll())
        assert comfy.count("POST", "/prompt") == 1
        video = api.get(body["video_url"])
        out = VideoJob.objects.get(pk=job_id).provider_urls["output"]
        expected = comfy.output_bytes(out["filename"], out["subfolder"])
        assert b"".join(video.streaming_content) == expected


@pytest.mark.parametrize("worker", [5], indirect=True)
def test_the_worker_spreads_jobs_over_two_comfyuis_fairly_between_users(api, client, other_token, worker):
    """Alice posts six jobs, then Bob one: Bob's runs next, not after Alice's backlog; each ComfyUI
    holds at most one running and one waiting job; every job runs exactly once."""
    import io

    from generation.models import VideoJob
    from gpu.models import ComfyUIServer
    from tests.conftest import Api

    def post(who):
        image = io.BytesIO(png_bytes())
        image.name = "in.png"
        resp = who.post("/api/generate-video", data={"prompt": "waves", "workflow": "smoke", "image": image}, json=False)
        assert resp.status_code == 202, resp.content
        return resp.json()["id"]

    bob = Api(client, other_token)
    with ComfyUIDouble(run_seconds=0.6) as first, ComfyUIDouble(run_seconds=0.6) as second:
        config = GpuConfig.get()
        config.comfyui_url = first.url
        config.save()
        ComfyUIServer.objects.create(name="second", url=second.url)
        alice_jobs = [post(api) for _ in range(6)]
        bob_job = post(bob)
        end = time.monotonic() + 90
        while time.monotonic() < end:
            done = VideoJob.objects.filter(status__in=VideoJob.TERMINAL).count()
            if done == 7:
                break
            time.sleep(0.2)
        jobs = {str(j.id): j for j in VideoJob.objects.all()}
        assert {j.status for j in jobs.values()} == {"completed"}, ([(j.status, j.error) for j in jobs.values()],
                                                                    worker.poll())
        assert max(first.max_queued, second.max_queued) <= 2
        assert {j.place for j in jobs.values()} == {"config", f"server:{ComfyUIServer.objects.get().pk}"}
        posts = first.prompt_posts + second.prompt_posts
        assert len(posts) == 7 and set(posts.values()) == {1}
        # Bob's one job was placed before the fifth of Alice's (four fill the two GPUs' slots).
        bound = sorted(jobs.values(), key=lambda j: j.bound_at)
        assert bound.index(jobs[bob_job]) < bound.index(jobs[alice_jobs[4]])


def test_fal_job_through_two_429s_and_a_webhook_without_payload_completes_on_the_worker(
        api, start_worker, settings, live_server):
    import io

    from django.core.files.storage import default_storage

    from tests.doubles.fal import FalDouble

    # fal queues the request on the third try, runs it for half a second, then calls the webhook
    # with `payload: null`; the worker polls every 2 s.
    with FalDouble(queue_polls=None, queue_seconds=0.0, run_seconds=0.5, unserialisable_payload=True) as fal:
        fal.fail_submit(times=2, status=429, body='{"detail": "Rate limit exceeded"}')
        settings.FAL_KEY, settings.FAL_QUEUE_URL = fal.key, fal.url
        worker = start_worker(FAL_KEY=fal.key, FAL_QUEUE_URL=fal.url, I2V_PUBLIC_URL=live_server.url,
                              I2V_FAL_POLL_SECONDS=2)
        image = io.BytesIO(png_bytes())
        image.name = "in.png"
        resp = api.post("/api/generate-video", data={"prompt": "waves", "backend": "fal", "image": image}, json=False)
        assert resp.status_code == 202, resp.content

        body = wait_for_status(api, resp.json()["id"])

        assert body["status"] == "completed", (body, worker.poll())
        assert fal.count("POST", "/fal-ai/wan/*") == 3 and len(fal.submissions) == 1
        fal.wait_for(lambda f: f.webhook_deliveries)
        delivery = fal.webhook_deliveries[0]
        assert delivery["body"]["payload"] is None and delivery["status"] == 200, delivery
        job = VideoJob.objects.get(pk=body["id"])
        assert default_storage.open(job.video.name).read() == fal.output_bytes()


def _poll(api, job_id, done, timeout=60):
    """GET /api/jobs/{id} like a script, until done(body) or the timeout."""
    end = time.monotonic() + timeout
    body = {}
    while time.monotonic() < end:
        body = api.get(f"/api/jobs/{job_id}").json()
        if done(body):
            break
        time.sleep(0.2)
    return body


def test_empty_model_file_fails_through_the_worker_as_a_corrupt_file(api, worker):
    import io
    import json

    sync_shipped_workflows(Workflow, ModelFile)
    cases = json.loads((ROOT / "tests/fixtures/comfyui_errors.json").read_text())["cases"]
    captured = cases["wan_empty_models"]["execution_error"]  # what a real ComfyUI said
    with ComfyUIDouble(fail_node=captured["node_type"], fail_type=captured["exception_type"],
                       fail_message=captured["exception_message"].removesuffix("\n")) as comfy:
        config = GpuConfig.get()
        config.comfyui_url = comfy.url
        config.save()
        image = io.BytesIO(png_bytes())
        image.name = "in.png"
        resp = api.post("/api/generate-video", data={"prompt": "waves", "image": image}, json=False)
        body = wait_for_status(api, resp.json()["id"])
    assert body["status"] == "failed", (body, worker.poll())
    assert body["error_class"] == "corrupt_model" and "header too small" in body["error"]
    assert "wan_2.1_vae.safetensors" in body["advice"] and "upload_models_to_r2" in body["advice"]


def test_wrong_port_says_unreachable_through_the_worker_within_5_s(api, worker):
    import io

    from tests.conftest import free_port

    sync_shipped_workflows(Workflow, ModelFile)
    url = f"http://127.0.0.1:{free_port()}"
    config = GpuConfig.get()
    config.comfyui_url = url
    config.save()
    image = io.BytesIO(png_bytes())
    image.name = "in.png"
    wait_until_running(worker)
    started = time.monotonic()
    resp = api.post("/api/generate-video", data={"prompt": "waves", "workflow": "smoke", "image": image}, json=False)
    body = _poll(api, resp.json()["id"], lambda b: (b["note"] or "").startswith(f"ComfyUI at {url} unreachable since"), 5)
    assert time.monotonic() - started < 5 and body["status"] == "queued", body
    assert "(connection refused); retrying until" in body["note"]


def wait_until_running(worker, timeout=60):
    """Block until the qcluster says it is running (its workers then take tasks at once)."""
    import threading

    ready = threading.Event()

    def read():
        for line in worker.stdout:
            if "running" in line.lower():
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(timeout), "the worker did not start"
