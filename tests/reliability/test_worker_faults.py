"""Faults with a real django-q2 worker (qcluster) on the configured broker: the worker's process
group is SIGKILLed after submit, mid-run and mid-upload, a new worker starts, and every job still
completes with exactly one `POST /prompt` per job. ComfyUI answering 500s or garbage JSON on
/history, restarting and losing the run, dropping the websocket, or hanging (connections
accepted, nothing answered) ends in recovery or a clear failure, never a job stuck.

The worker runs with short timings so recovery takes seconds: a task lives at most
I2V_TASK_TIMEOUT=8 s (the job lease lasts as long), the ORM broker redelivers an unacknowledged
task after I2V_TASK_RETRY=10 s, and a job is followed in I2V_FOLLOW_SLICE=2 s slices (so the
runner waits at most ~1 s for one ComfyUI answer; see `runner.comfyui_timeout`).

I2V_TEST_WORKER_LOG=/some/file keeps the workers' output (discarded otherwise)."""

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
from generation.models import VideoJob, Workflow
from gpu.models import ModelFile
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

    def start(self, **overrides):
        env = dict(os.environ)
        env.update(WORKER_ENV)
        env.update(overrides)
        env.update({
            "DJANGO_SETTINGS_MODULE": "i2v.settings_test",
            "I2V_DATA_DIR": str(settings.DATA_DIR),
            "I2V_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
            "I2V_Q_NAME": settings.Q_CLUSTER["name"],
        })
        with open(os.environ.get("I2V_TEST_WORKER_LOG") or os.devnull, "ab") as log:
            proc = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env, start_new_session=True,
                                    stdout=log, stderr=subprocess.STDOUT)
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
        seen = len(comfy.requests)
        workers.start()
        # The run goes on on the GPU until the new worker has reached ComfyUI (on Redis, once the
        # watchdog has handed it the jobs the dead worker had popped).
        for _ in range(20):
            try:
                comfy.wait_for(lambda c: len(c.requests) > seen, timeout=3)
                break
            except TimeoutError:
                recover_lost_tasks()
        else:
            raise AssertionError("the new worker never reached ComfyUI")
        hold.set()
        rows = wait_terminal(ids, 90, tick=recover_lost_tasks)
        assert_completed_once_each(comfy, ids, rows)


def test_sigkill_mid_upload(api, workers, configured):
    # 4 MiB in 64 KiB chunks 40 ms apart: the download takes ~2.5 s; the kill lands inside it.
    with ComfyUIDouble(output_size=4 * 1024 * 1024, view_chunk_delay=0.04) as comfy:
        configured(comfy)
        first = workers.start()
        ids = submit_jobs(api, 1)
        comfy.wait_for(lambda c: c.view_bytes_sent >= 1024 * 1024, timeout=30)  # a quarter downloaded
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
    to: the job fails at once with a message naming it, and nothing is posted twice. The websocket
    drops after its first message, so the worker follows each run through the history (a run the
    socket carries whole never asks it)."""
    with ComfyUIDouble(run_seconds=0.3, drop_websocket_after=1) as comfy:
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


@pytest.fixture
def no_schedules():
    """No scheduled watchdog (the migrations create one, and the first transactional test still
    has it): no worker dies in the tests that use this, so every job must get to its end by
    itself, with no rescue."""
    from django_q.models import Schedule

    Schedule.objects.all().delete()


def job_row(job_id):
    return VideoJob.objects.get(pk=job_id)


def wait_job(job_id, predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = job_row(job_id)
        if predicate(job):
            return job
        time.sleep(0.2)
    job = job_row(job_id)
    raise AssertionError(f"{what}: not seen after {timeout}s (status={job.status}, error={job.error!r})")


def test_comfyui_restart_that_loses_the_run_resubmits_it_once(api, workers, configured, no_schedules):
    """ComfyUI restarts mid-run and forgets its queue and history: the worker posts the same
    prompt again, once, and the user still gets the video."""
    hold = threading.Event()
    with ComfyUIDouble(hold=hold) as comfy:
        configured(comfy)
        workers.start()
        [job_id] = submit_jobs(api, 1)
        prompt_id = comfy.wait_held(timeout=30)
        comfy.restart()
        comfy.wait_for(lambda c: c.prompt_posts[prompt_id] == 2, timeout=30)
        comfy.wait_held(timeout=30)  # the resubmitted run is on the GPU
        hold.set()
        rows = wait_terminal([job_id], 60)
        job = rows[job_id]
        assert job.status == "completed", job.error
        assert comfy.prompt_posts == {prompt_id: 2}
        assert job.submit_count == 2
        out = job.provider_urls["output"]
        with job.video.open("rb") as fh:
            assert fh.read() == comfy.output_bytes(out["filename"], out["subfolder"])


def test_comfyui_losing_the_run_twice_fails_the_job(api, workers, configured, no_schedules):
    """A second restart that loses the same run ends it: failed with a message that says what
    happened, after two `POST /prompt` in all (no resubmission loop)."""
    hold = threading.Event()
    with ComfyUIDouble(hold=hold) as comfy:
        configured(comfy)
        workers.start()
        [job_id] = submit_jobs(api, 1)
        prompt_id = comfy.wait_held(timeout=30)
        comfy.restart()
        comfy.wait_for(lambda c: c.prompt_posts[prompt_id] == 2, timeout=30)
        comfy.wait_held(timeout=30)
        comfy.restart()
        rows = wait_terminal([job_id], 60)
        job = rows[job_id]
        assert job.status == "failed"
        assert job.error == "ComfyUI lost this job twice (did it restart?); giving up. Try again."
        assert comfy.prompt_posts == {prompt_id: 2}
        assert comfy.running_prompt_id is None and comfy.pending_prompt_ids == []


def test_websocket_dropped_mid_run_falls_back_to_polling(api, workers, configured, no_schedules):
    """ComfyUI cuts the websocket mid-run, and every later one right after its greeting: the
    worker learns that the runs ended from /history and both jobs complete, each posted once."""
    hold = threading.Event()
    with ComfyUIDouble(hold=hold, run_seconds=1.0) as comfy:
        configured(comfy)
        workers.start()
        ids = submit_jobs(api, 2)
        comfy.wait_held(timeout=30)
        cut_at = time.monotonic()
        comfy.drop_websocket_after = 1
        hold.set()
        rows = wait_terminal(ids, 60)
        assert_completed_once_each(comfy, ids, rows)
        later = [r for r in comfy.requests if r.at > cut_at]
        for i in ids:
            polled = [r for r in later if r.method == "GET" and r.path.endswith(f"/history/{rows[i].prompt_id}")]
            assert polled, f"job {i} was never looked up on /history after the websocket was cut"


def test_comfyui_that_stops_answering_then_comes_back(api, workers, configured, no_schedules):
    """ComfyUI accepts connections but answers nothing (HTTP and websocket) for a while: the
    job stays running and is marked unreachable, then completes once ComfyUI answers again,
    posted once."""
    hold = threading.Event()
    with ComfyUIDouble(hold=hold) as comfy:
        configured(comfy)
        workers.start()
        [job_id] = submit_jobs(api, 1)
        comfy.wait_held(timeout=30)
        comfy.hang_paths = {"*"}
        job = wait_job(job_id, lambda j: j.unreachable_since is not None, 30, "the worker noticing ComfyUI hangs")
        assert job.status in ("submitted", "running"), (job.status, job.error)  # still followed, not failed
        comfy.release_hangs()
        hold.set()
        rows = wait_terminal([job_id], 60)
        assert_completed_once_each(comfy, [job_id], rows)
        assert rows[job_id].error == ""


def test_comfyui_that_never_answers_again_fails_the_job_after_the_grace(api, workers, configured, no_schedules):
    """ComfyUI hangs for good: after the unreachable grace (3 s here, 120 s by default) the job
    fails with the troubleshooting hint instead of staying `running` forever."""
    hold = threading.Event()
    with ComfyUIDouble(hold=hold) as comfy:
        configured(comfy)
        workers.start(I2V_COMFYUI_GRACE="3")
        [job_id] = submit_jobs(api, 1)
        prompt_id = comfy.wait_held(timeout=30)
        comfy.hang_paths = {"*"}
        rows = wait_terminal([job_id], 60)
        job = rows[job_id]
        assert job.status == "failed", job.error
        assert "ComfyUI did not answer" in job.error and job.error_class == "comfyui_unreachable", job.error
        assert comfy.prompt_posts == {prompt_id: 1}
