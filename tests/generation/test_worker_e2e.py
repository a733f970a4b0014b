"""The whole path through a real django-q2 worker (qcluster) on the configured broker:
API → queue → worker → ComfyUI double → storage → GET /api/jobs/{id} → the video."""

import time

import pytest

from generation.domain import sync_shipped_workflows
from generation.models import VideoJob, Workflow
from gpu.models import ModelFile
from gpu.models import GpuConfig
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import png_bytes, qcluster

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow_start]


@pytest.fixture
def worker(request):
    # A test may ask for more worker processes (indirect parametrize): one follows each running job.
    with qcluster(I2V_WORKERS=getattr(request, "param", 2)) as proc:
        yield proc


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
        end = time.monotonic() + 60
        body = {}
        while time.monotonic() < end:  # polling the API like a script would
            body = api.get(f"/api/jobs/{job_id}").json()
            if body["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.2)
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
