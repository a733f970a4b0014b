"""Shared fixtures for the vast.ai lifecycle tests: the vast.ai and ComfyUI doubles wired together,
settings pointing at them, recorded task enqueues, and a moto S3 server standing in for R2.

Import the fixtures into a test module: ``from tests.gpu.vast_helpers import *``.
"""

import boto3
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from generation.domain import sync_shipped_workflows
from generation.models import VideoJob, Workflow
from gpu.models import ModelFile
from gpu import lifecycle, reconciler
from gpu.models import GpuConfig, VastInstance
from tests.doubles.comfyui import ComfyUIDouble
from tests.doubles.vastai import VastAIDouble
from tests.helpers import png_bytes

__all__ = ["comfy", "vast", "vast_settings", "queued", "policy", "r2_settings", "rent", "boot_to_ready",
           "live_vast_ids", "smoke_job"]

CHEAPEST_MATCHING = 7310001  # RTX 4090 $0.345: the 3090, the unverified and the unreliable ones fail the policy
NEXT_CHEAPEST = 7310007  # RTX 5090 $0.548 (the $0.401 4090 is on a 95 Mbps line)


@pytest.fixture
def comfy():
    """ComfyUI behind vast.ai's portal: the placeholder until the test says it is up."""
    with ComfyUIDouble(placeholder=True) as double:
        yield double


@pytest.fixture
def vast(comfy):
    """vast.ai in manual mode: instances stay where advance() puts them; port 8188 maps to the ComfyUI double."""
    with VastAIDouble(comfyui_port=comfy.port, boot_seconds=None) as double:
        yield double


@pytest.fixture
def vast_settings(db, settings, vast, queued):
    """Settings pointing at the vast.ai double. Afterwards every rental still live is destroyed
    through the app, and the reconciler must leave the double with no live instance."""
    settings.VASTAI_API_KEY = vast.api_key
    settings.VASTAI_API_URL = vast.url
    settings.VASTAI_RETRY_BACKOFF = 0.01
    settings.VASTAI_PACE_SCALE = 0.001  # vast.ai's intervals, a thousand times shorter
    settings.I2V_FOLLOW_SLICE = 0  # one step per task call: tests drive the clock, nobody sleeps
    settings.R2_BUCKET = ""
    settings.R2_ENDPOINT_URL = ""
    yield settings
    settings.VASTAI_API_KEY, settings.VASTAI_API_URL = vast.api_key, vast.url
    for row in VastInstance.objects.exclude(state=VastInstance.State.DESTROYED).exclude(
            state=VastInstance.State.FAILED, destroyed_at__isnull=False):
        try:
            lifecycle.destroy_instance(row, "test teardown")
        except lifecycle.ProvisioningError:
            pass
    reconciler.reconcile()
    assert vast.live_instances() == [], "the test left a vast.ai instance running"


@pytest.fixture
def queued(monkeypatch):
    """Every task enqueued (django_q.tasks.async_task, generation and gpu enqueue), recorded instead of run."""
    calls = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda func, *args, **kw: calls.append((func, *args)))
    monkeypatch.setattr("generation.tasks.enqueue", lambda func, *args: calls.append((func, *args)))
    monkeypatch.setattr("gpu.tasks.enqueue", lambda func, *args: calls.append((func, *args)))
    return calls


@pytest.fixture
def policy(db, vast_settings):
    """The shipped workflows, and a GPU config using vast.ai with the default policy and no model downloads
    (the smoke workflow needs no model file); tests that want the Wan manifest set default_workflow."""
    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()
    config.gpu_provider = "vastai"
    config.comfyui_url = ""
    config.default_workflow = "smoke"
    config.save()
    return config


@pytest.fixture
def r2_settings(settings, s3_server):
    settings.R2_BUCKET = "i2v-models"
    settings.R2_ENDPOINT_URL = s3_server
    settings.R2_ACCESS_KEY_ID = "k"
    settings.R2_SECRET_ACCESS_KEY = "s"
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="k",
                        aws_secret_access_key="s")


def rent(**kw) -> VastInstance:
    return lifecycle.create_instance(**kw)


def boot_to_ready(instance, vast, comfy) -> VastInstance:
    """Walk a rented instance through vast.ai's boot to ready, one wait step per stage."""
    vast.advance(instance.vast_id, "loading")
    lifecycle.wait_until_ready(instance)
    vast.advance(instance.vast_id, "running")
    comfy.token = instance.web_password
    comfy.placeholder = False
    step = lifecycle.wait_until_ready(instance)
    assert step.done and step.message == "ready", step
    instance.refresh_from_db()
    return instance


def live_vast_ids(vast) -> list[int]:
    return [i["id"] for i in vast.live_instances()]


def smoke_job(owner, prompt="a dragon turns its head") -> VideoJob:
    """A queued job on the smoke workflow (no model files needed), with a stored input image."""
    wf = Workflow.objects.get(slug="smoke")
    d = wf.defaults
    job = VideoJob(owner=owner, prompt=prompt, workflow=wf, workflow_slug=wf.slug, width=d["width"],
                   height=d["height"], frames=d["frames"], fps=d["fps"], steps=d.get("steps"))
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(png_bytes()))
    job.save()
    return job
