"""End to end: a fresh install with only VASTAI_API_KEY (and R2 for the model manifest) runs a job on a rented GPU.

The job, the wait task and the schedules are driven by calling the tasks, as the worker would;
vast.ai and ComfyUI are real HTTP doubles; R2 is a moto S3 server.
"""

import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.files.storage import default_storage
from django.utils import timezone

from generation import tasks as job_tasks
from generation.domain import job_json, sync_shipped_workflows
from generation.models import VideoJob, Workflow
from gpu.models import ModelFile
from gpu import tasks as gpu_tasks
from gpu.models import GpuConfig, VastInstance
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)
from tests.gpu.vast_helpers import CHEAPEST_MATCHING, live_vast_ids, smoke_job
from tests.generation.test_worker_e2e import start_worker  # noqa: F401 (fixture)
from tests.helpers import png_bytes

pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status
I = VastInstance.State


def run_to_end(job, slices=30) -> VideoJob:
    """Run the job's task slice after slice, as the worker would, until it is finished."""
    for _ in range(slices):
        job_tasks.run_job(str(job.id))
        job.refresh_from_db()
        if job.is_terminal:
            break
    return job


def test_smoke_job_rents_the_cheapest_gpu_runs_on_it_and_the_idle_instance_is_destroyed(
        vast_settings, r2_settings, vast, comfy, queued, user):
    vast_settings.I2V_FOLLOW_SLICE = 2
    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()  # the fresh install's defaults, but for the provider
    config.gpu_provider = "vastai"
    config.save()
    assert config.comfyui_url == "" and config.default_workflow == "wan22-i2v"
    job = smoke_job(user)

    # The scheduler finds no GPU for the waiting job: it rents the cheapest matching offer.
    assert job_tasks.schedule() == "bound 0, waiting 1, rented 1, destroyed 0"
    assert job_tasks.run_job(str(job.id)) == "waiting"
    job.refresh_from_db()
    instance = VastInstance.objects.get()
    assert job.status == S.PROVISIONING and job.place == "" and job_json(job)["queue_position"] == 0
    assert instance.state == I.CREATING and instance.offer_id == CHEAPEST_MATCHING and instance.origin == "job"
    assert live_vast_ids(vast) == [instance.vast_id]
    assert ("gpu.tasks.wait_for_instance", str(instance.id)) in queued
    # The onstart carries the manifest: one presigned R2 URL per model of the default workflow.
    onstart = vast.requests_to("PUT", "/asks/*")[-1].json["onstart"]
    script = onstart if not instance.provisioning_key else \
        r2_settings.get_object(Bucket="i2v-models", Key=instance.provisioning_key)["Body"].read().decode()
    assert script.count("X-Amz-Signature=") == 5

    # vast.ai boots it; the wait task follows; the job keeps waiting without renting a second one.
    comfy.token = instance.web_password
    assert gpu_tasks.wait_for_instance(str(instance.id)) == "continued"
    vast.advance(instance.vast_id, "loading")
    assert gpu_tasks.wait_for_instance(str(instance.id)) == "continued"
    assert job_tasks.schedule().startswith("bound 0, waiting 1, rented 0")
    vast.advance(instance.vast_id, "running")
    assert gpu_tasks.wait_for_instance(str(instance.id)) == "continued"  # the portal placeholder: not ready
    instance.refresh_from_db()
    assert instance.state == I.LOADING and "ComfyUI is still starting" in instance.status_msg
    job_tasks.schedule()
    job.refresh_from_db()
    assert job.status == S.PROVISIONING and VastInstance.objects.count() == 1
    assert job_json(job)["note"] == (f"Waiting for a vast.ai GPU (instance {instance.vast_id}, RTX 4090 at $0.362/h): "
                                     "loading, ComfyUI is still starting (installing nodes, downloading models)")
    comfy.placeholder = False
    queued.clear()
    assert gpu_tasks.wait_for_instance(str(instance.id)) == "ready"
    instance.refresh_from_db()
    assert instance.state == I.RUNNING and instance.comfyui_url == f"http://127.0.0.1:{comfy.port}"
    # The instance being ready wakes the scheduler, which places the job on it and hands it to a worker.
    assert queued == [("generation.tasks.schedule",)]
    assert job_tasks.schedule().startswith("bound 1, waiting 0")
    assert ("generation.tasks.run_job", str(job.id)) in queued
    job.refresh_from_db()
    assert job.place == f"vast:{instance.pk}" and job.instance == instance

    # The job runs on it, with the instance's password, and completes.
    job = run_to_end(job)
    assert job.status == S.COMPLETED, job.error
    assert job.instance == instance and job.comfyui_url == instance.comfyui_url and job.note == ""
    assert comfy.prompt_posts[job.prompt_id] == 1
    assert {r.headers.get("Authorization") for r in comfy.requests} == {f"Bearer {instance.web_password}"}
    out = job.provider_urls["output"]
    assert default_storage.open(job.video.name).read() == comfy.output_bytes(out["filename"], out["subfolder"])
    seconds = Decimal((job.finished_at - job.submitted_at).total_seconds())
    assert job.cost_usd == (instance.dph_total * seconds / Decimal(3600)).quantize(Decimal("0.0001"))

    # Just finished: not idle yet. After the idle time the scheduler destroys it.
    assert job_tasks.schedule().endswith("destroyed 0")
    earlier = timezone.now() - timedelta(minutes=config.idle_minutes + 1)
    VastInstance.objects.filter(pk=instance.pk).update(created_at=earlier - timedelta(minutes=10), ready_at=earlier,
                                                       last_busy_at=earlier)
    VideoJob.objects.filter(pk=job.pk).update(finished_at=earlier)
    assert job_tasks.schedule().endswith("destroyed 1")
    instance.refresh_from_db()
    assert instance.state == I.DESTROYED and instance.destroyed_at and "idle" in instance.destroy_reason
    assert gpu_tasks.save_costs() == "saved"
    assert instance.cost_usd == instance.accrued_cost() > 0
    assert live_vast_ids(vast) == [] and vast.instances[instance.vast_id]["destroyed"]
    assert gpu_tasks.reconcile() == "nothing to do"


def test_job_fails_with_the_reason_when_no_gpu_can_be_rented(vast_settings, vast, queued, user):
    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()
    config.gpu_provider, config.default_workflow, config.max_daily_spend = "vastai", "smoke", Decimal("0.10")
    config.save()
    job = smoke_job(user)

    job_tasks.schedule()

    job.refresh_from_db()
    assert job.status == S.FAILED and job.error.startswith("Daily spend cap: $0.00 already spent")
    assert "Raise max_daily_spend" in job_json(job)["error"] and live_vast_ids(vast) == []


def test_job_fails_after_three_machines_died_under_it(vast_settings, vast, queued, user):
    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()
    config.gpu_provider, config.default_workflow = "vastai", "smoke"
    config.save()
    job = smoke_job(user)

    job_tasks.schedule()
    for _ in range(3):
        booting = VastInstance.objects.get(state__in=VastInstance.BOOTING)
        vast.advance(booting.vast_id, "exited")
        gpu_tasks.wait_for_instance(str(booting.id))  # destroys it, rents a replacement while the job waits
        job_tasks.schedule()

    job.refresh_from_db()
    assert job.status == S.FAILED and "No vast.ai GPU could be readied for this job in 3 attempts" in job.error
    assert "went exited" in job.error
    assert VastInstance.objects.filter(state=I.FAILED).count() == 3 and live_vast_ids(vast) == []


def test_a_job_waiting_for_a_gpu_can_be_cancelled(vast_settings, vast, queued, user):
    from generation.domain import cancel_job

    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()
    config.gpu_provider, config.default_workflow = "vastai", "smoke"
    config.save()
    job = smoke_job(user)
    job_tasks.schedule()

    job = cancel_job(VideoJob.objects.get(pk=job.pk))

    assert job.status == S.CANCELLED and job_tasks.run_job(str(job.id)) == "busy-or-finished"
    assert VastInstance.objects.get().state == I.CREATING  # it boots on; unused, the scheduler destroys it when idle


def test_a_heartbeat_gap_while_running_a_job_keeps_the_instance_and_the_job_completes(
        vast_settings, vast, comfy, queued, user):
    import threading

    from gpu import reconciler
    from tests.gpu.vast_helpers import boot_to_ready, rent

    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()
    config.gpu_provider, config.default_workflow = "vastai", "smoke"
    config.save()
    instance = boot_to_ready(rent(), vast, comfy)
    VastInstance.objects.filter(pk=instance.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    comfy.hold = threading.Event()  # the run goes on until the test lets it finish
    job = smoke_job(user)
    assert job_tasks.schedule().startswith("bound 1")  # placed on the ready instance
    assert job_tasks.run_job(str(job.id)) == "continued"
    job.refresh_from_db()
    assert job.instance == instance and job.status in (S.SUBMITTED, S.RUNNING)

    vast.heartbeat_gap(instance.vast_id, 60)  # vast.ai loses the machine's heartbeat for a minute
    start = timezone.now()
    assert gpu_tasks.reconcile() == "nothing to do"
    vast.advance_clock(59)
    assert reconciler.reconcile(now=start + timedelta(seconds=59))["retried"] == []
    instance.refresh_from_db()
    assert instance.state == I.RUNNING and instance.unknown_since is not None
    vast.advance_clock(2)  # the heartbeat is back
    assert reconciler.reconcile(now=start + timedelta(seconds=61))["retried"] == []
    instance.refresh_from_db()
    assert instance.state == I.RUNNING and instance.unknown_since is None

    comfy.hold.set()
    vast_settings.I2V_FOLLOW_SLICE = 2
    job = run_to_end(job)
    assert job.status == S.COMPLETED, job.error
    assert default_storage.exists(job.video.name) and live_vast_ids(vast) == [instance.vast_id]

    # A gap that outlasts the grace is a dead machine: destroyed, as before.
    vast.heartbeat_gap(instance.vast_id, 3600)
    later = timezone.now()
    reconciler.reconcile(now=later)
    report = reconciler.reconcile(now=later + timedelta(seconds=reconciler.UNKNOWN_GRACE))
    instance.refresh_from_db()
    assert report["retried"] == [instance.vast_id] and instance.state == I.FAILED
    assert "went unknown while in use" in instance.error and live_vast_ids(vast) == []


@pytest.mark.slow_start
def test_a_minute_without_heartbeat_does_not_cost_the_job_on_the_worker(
        settings, vast, comfy, api, start_worker, monkeypatch):
    """The same through a real qcluster: the worker runs the job while vast.ai reports the
    instance `unknown` for a minute; the reconciler keeps it and the job completes."""
    import io
    import threading
    import time

    from gpu import lifecycle, reconciler
    from tests.generation.test_worker_e2e import wait_for_status
    from tests.gpu.vast_helpers import boot_to_ready

    settings.VASTAI_API_KEY, settings.VASTAI_API_URL, settings.VASTAI_PACE_SCALE = vast.api_key, vast.url, 0.001
    settings.R2_BUCKET = ""
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)  # the rental's wait task: the test boots it
    sync_shipped_workflows(Workflow, ModelFile)
    config = GpuConfig.get()
    config.gpu_provider, config.default_workflow = "vastai", "smoke"
    config.save()
    instance = boot_to_ready(lifecycle.create_instance(), vast, comfy)
    VastInstance.objects.filter(pk=instance.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    monkeypatch.undo()  # from here on jobs go to the worker's queue
    comfy.hold = threading.Event()  # the run goes on until the test lets it finish
    worker = start_worker(VASTAI_API_KEY=vast.api_key, VASTAI_API_URL=vast.url, VASTAI_PACE_SCALE=0.001)
    image = io.BytesIO(png_bytes())
    image.name = "in.png"
    resp = api.post("/api/generate-video", data={"prompt": "waves", "workflow": "smoke", "image": image}, json=False)
    assert resp.status_code == 202, resp.content
    job_id = resp.json()["id"]
    end = time.monotonic() + 60
    while not comfy.prompt_posts and time.monotonic() < end:  # the worker has submitted it to the instance
        time.sleep(0.1)
    assert comfy.prompt_posts, worker.poll()

    vast.heartbeat_gap(instance.vast_id, 60)
    start = timezone.now()
    assert reconciler.reconcile(now=start)["retried"] == []
    vast.advance_clock(59)
    assert reconciler.reconcile(now=start + timedelta(seconds=59))["retried"] == []
    instance.refresh_from_db()
    assert instance.state == I.RUNNING and instance.unknown_since is not None
    vast.advance_clock(2)
    comfy.hold.set()

    body = wait_for_status(api, job_id)

    assert body["status"] == "completed", (body, worker.poll())
    assert body["instance_id"] == str(instance.id) and live_vast_ids(vast) == [instance.vast_id]
    lifecycle.destroy_instance(instance, "test teardown")
    assert live_vast_ids(vast) == []
