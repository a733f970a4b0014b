"""End to end, through a real django-q2 worker (qcluster): the seed's "best results" path. A GPU rented
by hand in the vast.ai console is named in POST /api/gpu/config with its Open URL; jobs queue on it; its
quick tunnel rotates while they wait; the worker follows the tunnel and the jobs complete, nobody pasting
a new URL; the instance is destroyed through the API."""

import io
import threading
import time
from decimal import Decimal

import pytest

from generation.domain import sync_shipped_workflows
from generation.models import VideoJob, Workflow
from generation.runner import TUNNEL_NOTE
from gpu.models import GpuConfigChange, ModelFile, VastInstance
from tests.doubles.comfyui import ComfyUIDouble
from tests.doubles.vastai import VastAIDouble
from tests.helpers import png_bytes, qcluster

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow_start]
PASSWORD = "console-web-password-e2e"


def poll_until_finished(api, job_ids, timeout=90.0) -> dict:
    """Each job's JSON once all have ended (polling the API as a script would), or as they are at the deadline."""
    end = time.monotonic() + timeout
    while True:
        bodies = {job_id: api.get(f"/api/jobs/{job_id}").json() for job_id in job_ids}
        if all(b["status"] in ("completed", "failed", "cancelled") for b in bodies.values()) or time.monotonic() > end:
            return bodies
        time.sleep(0.2)


def test_jobs_on_an_adopted_instance_complete_when_its_tunnel_rotates(api, staff_api, settings):
    sync_shipped_workflows(Workflow, ModelFile)
    with ComfyUIDouble(token=PASSWORD, run_seconds=0.2) as comfy, VastAIDouble(comfyui_port=comfy.port) as vast:
        settings.VASTAI_API_KEY, settings.VASTAI_API_URL = vast.api_key, vast.url
        vast_id = vast.create_console_instance(web_password=PASSWORD, label="", dph_base=0.39)
        old_url = vast.tunnel_url(vast_id)

        adopted = staff_api.post("/api/gpu/config", {"vastai_instance_id": vast_id, "comfyui_url": old_url})
        assert adopted.status_code == 200, adopted.content
        assert adopted.json()["vastai_instance"]["origin"] == "adopted"

        comfy.hold = threading.Event()  # both jobs wait: one running on ComfyUI, one queued behind it
        job_ids = []
        for prompt in ("waves on a pier", "a fox in the snow"):
            image = io.BytesIO(png_bytes())
            image.name = "in.png"
            resp = api.post("/api/generate-video", data={"prompt": prompt, "workflow": "smoke", "image": image}, json=False)
            assert resp.status_code == 202, resp.content
            job_ids.append(resp.json()["id"])
        with qcluster(VASTAI_API_KEY=vast.api_key, VASTAI_API_URL=vast.url, VASTAI_RETRY_BACKOFF=0.01,
                      I2V_FOLLOW_SLICE=2) as worker:
            # The queued job's worker asks its place in the queue FIRST_LOOK after posting: once it has,
            # the tunnel rotates (rotating during that look drops its connection, and the move is
            # then found without the old URL ever answering 530).
            comfy.wait_for(lambda c: c.running_prompt_id and len(c.pending_prompt_ids) == 1
                           and c.count("GET", "/queue") >= 1, timeout=60)
            old_tunnel = vast.tunnel(vast_id)
            new_url = vast.rotate_tunnel(vast_id)  # cloudflared restarted: the old URL answers 530 / error 1033
            comfy.hold.set()
            bodies = poll_until_finished(api, job_ids)

        for body in bodies.values():
            assert body["status"] == "completed", (body, worker.poll())
            assert body["note"] == TUNNEL_NOTE
        config = staff_api.get("/api/gpu/config").json()  # only staff see the URL
        assert config["comfyui_url"] == new_url and config["comfyui_available"] is True
        change = GpuConfigChange.objects.get(field="comfyui_url", source="tunnel")
        assert (change.old_value, change.new_value) == (old_url, new_url)
        assert sorted(comfy.prompt_posts.values()) == [1, 1]  # followed on, never submitted twice
        assert old_tunnel.answered_530 >= 1  # the worker did meet the dead URL
        instance = VastInstance.objects.get(vast_id=vast_id)
        for job in VideoJob.objects.all():  # its busy time, at its $/hour
            seconds = Decimal((job.finished_at - job.submitted_at).total_seconds())
            assert job.instance_id == instance.pk
            assert job.cost_usd == (instance.dph_total * seconds / Decimal(3600)).quantize(Decimal("0.0001"))

        gone = staff_api.delete(f"/api/vastai/instances/{vast_id}")
        assert gone.status_code == 200 and gone.json()["state"] == "destroyed" and vast.instances[vast_id]["destroyed"]
