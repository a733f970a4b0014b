"""Faults with a real django-q2 worker (qcluster) on the configured broker: the worker's process
group is SIGKILLed after submit, mid-run and mid-upload, a new worker starts, and every job still
completes with exactly one `POST /prompt` per job. ComfyUI answering 500s or garbage JSON on
/history ends in recovery or a clear failure, never a job stuck.

The worker runs with short timings so recovery takes seconds: a task lives at most
I2V_TASK_TIMEOUT=8 s (the job lease lasts as long), the ORM broker redelivers an unacknowledged
task after I2V_TASK_RETRY=10 s, and a job is followed in I2V_FOLLOW_SLICE=2 s slices."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from generation.domain import sync_shipped_workflows
from generation.models import ModelFile, VideoJob, Workflow
from gpu.models import GpuConfig
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import png_bytes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow_start]
WORKER_ENV = {"I2V_TASK_TIMEOUT": "8", "I2V_TASK_RETRY": "10", "I2V_FOLLOW_SLICE": "2", "I2V_WORKERS": "2"}
TERMINAL = ("completed", "failed", "cancelled")


class Workers:
    """Starts qcluster processes against the test database and kills them like a power cut."""

    def __init__(self):
        self.procs = []

    def start(self):
        env = dict(os.environ)
        env.update(WORKER_ENV)
        env.update({
            "DJANGO_SETTINGS_MODULE": "i2v.settings_test",
            "I2V_DATA_DIR": str(settings.DATA_DIR),
            "I2V_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
            "I2V_Q_NAME": settings.Q_CLUSTER["name"],
        })
        proc = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def sigkill(self, proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self):
        # SIGKILL (a graceful qcluster stop takes ~20 s); what a dead worker leaves is what
        # these tests show is harmless.
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop_all()


def redis_broker():
    return "redis" in settings.Q_CLUSTER


def recover_lost_tasks():
    """With Redis, a task the killed worker had popped is gone (Redis does not redeliver); the
    `generation.tasks.watchdog` schedule (every minute in production, made by `bootstrap`)
    re-enqueues jobs nobody works on. The test database has no schedule, so the test does what
    the schedule does: it enqueues the watchdog, more often than every minute to stay fast.
    (The ORM broker redelivers an unacknowledged task by itself after `retry`.)"""
    if redis_broker():
        from django_q.tasks import async_task

        async_task("generation.tasks.watchdog")


def submit_jobs(api, n, prompt="waves"):
    ids = []
    for i in range(n):
        image = io.BytesIO(png_bytes(color=(i * 40 % 255, 80, 40)))
        image.name = "in.png"
        resp = api.post("/api/generate-video", data={"prompt": f"{prompt} {i}", "workflow": "smoke", "image": image},
                        json=False)
        assert resp.status_code == 202, resp.content
        ids.append(resp.json()["id"])
    return ids


def wait_terminal(ids, timeout, tick=None):
    end = time.monotonic() + timeout
    last_tick = time.monotonic()
    while time.monotonic() < end:
        rows = {str(j.pk): j for j in VideoJob.objects.filter(pk__in=ids)}
        if all(rows[i].status in TERMINAL for i in ids):
            return rows
        if tick and time.monotonic() - last_tick > 3:
            tick()
            last_tick = time.monotonic()
        time.sleep(0.2)
    rows = {str(j.pk): (j.status, j.error, j.lease_until) for j in VideoJob.objects.filter(pk__in=ids)}
    raise AssertionError(f"jobs not finished after {timeout}s: {rows}")


def assert_completed_once_each(comfy, ids, rows):
    assert {i: rows[i].status for i in ids} == {i: "completed" for i in ids}, {i: rows[i].error for i in ids}
    posts = comfy.prompt_posts
    assert {rows[i].prompt_id: posts[rows[i].prompt_id] for i in ids} == {rows[i].prompt_id: 1 for i in ids}
    assert sum(posts.values()) == len(ids)
    for i in ids:
        out = rows[i].provider_urls["output"]
        with rows[i].video.open("rb") as fh:
            assert fh.read() == comfy.output_bytes(out["filename"], out["subfolder"])


@pytest.fixture
def configured():
    sync_shipped_workflows(Workflow, ModelFile)

    def use(comfy):
        config = GpuConfig.get()
        config.comfyui_url = comfy.url
        config.gpu_provider = "local"
        config.save()

    return use


def test_sigkill_right_after_submit(api, workers, configured):
    with ComfyUIDouble(run_seconds=0.2) as comfy:
        configured(comfy)
        first = workers.start()
        ids = submit_jobs(api, 3)
        comfy.wait_for(lambda c: c.count("POST", "/prompt") >= 1, timeout=30)
        workers.sigkill(first)
        workers.start()
        rows = wait_terminal(ids, 90, tick=recover_lost_tasks)
        assert_completed_once_each(comfy, ids, rows)


def test_sigkill_mid_run(api, workers, configured):
    hold = threading.Event()
    with ComfyUIDouble(hold=hold) as comfy:
        configured(comfy)
        first = workers.start()
        ids = submit_jobs(api, 2)
        comfy.wait_held(timeout=30)  # the first job is running on the GPU, the worker follows it
        workers.sigkill(first)
        workers.start()
        time.sleep(1)
        hold.set()
        rows = wait_terminal(ids, 90, tick=recover_lost_tasks)
        assert_completed_once_each(comfy, ids, rows)


def test_sigkill_mid_upload(api, workers, configured):
    # 4 MiB in 64 KiB chunks 40 ms apart: the download takes ~2.5 s; the kill lands inside it.
    with ComfyUIDouble(output_size=4 * 1024 * 1024, view_chunk_delay=0.04) as comfy:
        configured(comfy)
        first = workers.start()
        ids = submit_jobs(api, 1)
        comfy.wait_for(lambda c: c.count("GET", "/view") >= 1, timeout=30)
        time.sleep(0.5)
        workers.sigkill(first)
        assert VideoJob.objects.get(pk=ids[0]).status != "completed"
        workers.start()
        rows = wait_terminal(ids, 90, tick=recover_lost_tasks)
        assert_completed_once_each(comfy, ids, rows)
        assert rows[ids[0]].video_size == 4 * 1024 * 1024
        assert comfy.count("GET", "/view") >= 2  # downloaded again from the start, not resumed half-way


@pytest.mark.parametrize("status, body, content_type, outcome", [
    (500, "500 Internal Server Error", "text/plain", "completed"),
    (200, "{not json", "application/json", "completed"),
    (200, '{"unexpected": ["shape"]}', "application/json", "failed"),
], ids=["500", "garbage-json", "wrong-shape"])
def test_history_errors_end_in_recovery_or_a_clear_failure(api, workers, configured, status, body, content_type, outcome):
    """A 5xx or a non-JSON body is a hiccup: retried (within the runner's unreachable grace) and the
    job completes. An answer of the wrong shape means this is not the ComfyUI API the job was sent
    to: the job fails at once with a message naming it, and nothing is posted twice."""
    with ComfyUIDouble(run_seconds=0.3) as comfy:
        configured(comfy)
        comfy.fail_http("/history*", times=6, status=status, body=body, content_type=content_type)
        workers.start()
        ids = submit_jobs(api, 2)
        rows = wait_terminal(ids, 90, tick=recover_lost_tasks)
        statuses = sorted(rows[i].status for i in ids)
        if outcome == "completed":
            assert statuses == ["completed", "completed"], [(rows[i].status, rows[i].error) for i in ids]
        else:
            # Six bad answers: at least the first job fails; the second may find them used up.
            assert "failed" in statuses and set(statuses) <= {"failed", "completed"}
        for i in ids:
            job = rows[i]
            posts = comfy.prompt_posts[job.prompt_id]
            assert posts == 1 if job.status == "completed" else posts <= 1, (job.status, posts)
            if job.status == "failed":
                assert "ComfyUI" in job.error and "history" in job.error, job.error
