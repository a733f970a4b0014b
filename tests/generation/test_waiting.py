"""Scripts wait without polling: GET /api/jobs/{id}?wait=N and POST /api/generate-video with
Prefer: wait, through the app and through a real ASGI server with 50 waiting clients."""

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from generation import waiting
from generation.models import VideoJob
from tests.conftest import free_port
from tests.generation.test_runner import configured, make_job, requeued, run_to_end  # noqa: F401 (fixtures)
from tests.generation.test_scheduler import comfy  # noqa: F401 (fixture)
from tests.helpers import png_bytes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status


def in_thread(fn):
    out = {}

    def run():
        started = time.monotonic()
        try:
            out["value"] = fn()
        except Exception as exc:  # shown by the test's assertion
            out["value"] = exc
        finally:
            connection.close()
        out["took"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_wait_answers_as_soon_as_the_job_changes(api, user, requeued, monkeypatch):  # noqa: F811
    # Only the announcement can wake it: no re-read on a clock comes before the wait runs out
    # (on SQLite too: the web process's local socket gets a datagram, nothing polls).
    monkeypatch.setattr(waiting, "FALLBACK_POLL", 60.0)
    monkeypatch.setattr(waiting, "SQLITE_POLL", 60.0)
    job = make_job(user, place=False)
    waiter, out = in_thread(lambda: api.get(f"/api/jobs/{job.id}?wait=30"))
    while waiting.waiting_now() == 0 and waiter.is_alive():  # until the request waits
        threading.Event().wait(0.01)
    job.refresh_from_db()
    job.transition(S.RUNNING, step=1, steps_total=4, progress=0.25)
    waiter.join(timeout=30)
    body = out["value"].json()
    assert out["value"].status_code == 200 and body["status"] == "running" and body["step"] == 1
    assert out["took"] < 20  # woken by the change, long before the 30 s wait ran out


@pytest.mark.parametrize("write", [
    lambda job: VideoJob.objects.filter(pk=job.id.hex, status=S.QUEUED).update(note="Waiting for a GPU."),
    lambda job: VideoJob.objects.filter(pk__in=[str(job.id)]).update(note="Waiting for a GPU."),
    lambda job: VideoJob.objects.filter(owner=job.owner).update(note="Waiting for a GPU."),
], ids=["pk as hex", "pk__in", "by owner"])
def test_a_write_however_it_names_the_job_wakes_its_waiter(api, user, requeued, monkeypatch, write):  # noqa: F811
    monkeypatch.setattr(waiting, "FALLBACK_POLL", 60.0)
    monkeypatch.setattr(waiting, "SQLITE_POLL", 60.0)
    job = make_job(user, place=False)
    waiter, out = in_thread(lambda: api.get(f"/api/jobs/{job.id}?wait=30"))
    while waiting.waiting_now() == 0 and waiter.is_alive():
        threading.Event().wait(0.01)
    assert write(job) == 1
    waiter.join(timeout=30)
    assert out["value"].json()["note"] == "Waiting for a GPU." and out["took"] < 20


@pytest.mark.parametrize("announcer", ["as configured", "postgresql"])
def test_a_change_just_after_a_waiters_first_read_still_wakes_it(token, user, requeued, monkeypatch, settings,  # noqa: F811
                                                                   announcer):
    """A waiting request reads the job, then watches it; it reads it again only if some change was
    announced in between. A change landing in that gap must still answer the script at once, and
    not when the wait runs out. (On one event loop whose listener is up, as on a server where other
    scripts wait: Django's async test client, another script waiting on another job.) Also with
    PostgreSQL's LISTEN/NOTIFY, what announces on PostgreSQL without Redis."""
    from django.test import AsyncClient

    if announcer == "postgresql":
        if connection.vendor != "postgresql":
            pytest.skip(f"PostgreSQL only (this run uses {connection.vendor})")
        settings.REDIS_URL = ""
    monkeypatch.setattr(waiting, "FALLBACK_POLL", 60.0)
    monkeypatch.setattr(waiting, "SQLITE_POLL", 60.0)
    job, other = make_job(user, place=False), make_job(user, place=False)
    first_read = waiting.read_and_release
    changed = []

    def read_then_change(read):
        seen = first_read(read)
        if not changed and getattr(read, "job_id", None) == job.id:  # this waiter's first read
            changed.append(VideoJob.objects.filter(pk=job.pk).update(note="Waiting for a GPU."))
        return seen

    async def scenario():
        client, auth = AsyncClient(), {"Authorization": f"Bearer {token}"}
        elsewhere = asyncio.create_task(client.get(f"/api/jobs/{other.id}?wait=30", headers=auth))
        while waiting.heard() is None and not elsewhere.done():  # until this loop's listener hears announcements
            await asyncio.sleep(0.01)
        assert not elsewhere.done(), elsewhere.result().content  # (it waits: a 401 or 404 would not)
        monkeypatch.setattr(waiting, "read_and_release", read_then_change)
        loop = asyncio.get_running_loop()
        started = loop.time()
        resp = await client.get(f"/api/jobs/{job.id}?wait=30", headers=auth)
        took = loop.time() - started
        elsewhere.cancel()
        await sync_to_async(lambda: connection.close())()  # the requests' thread's, before the test database goes
        return resp, took

    resp, took = asyncio.run(scenario())
    assert changed == [1]
    assert resp.status_code == 200 and resp.json()["note"] == "Waiting for a GPU."
    assert took < 20  # answered on the change, long before the 30 s wait ran out


def test_wait_runs_out_with_the_job_as_it_is(api, user, requeued):  # noqa: F811
    job = make_job(user, place=False)
    resp = api.get(f"/api/jobs/{job.id}?wait=0.3")
    assert resp.status_code == 200 and resp.json()["status"] == "queued"


def test_wait_on_a_finished_job_answers_at_once(api, user, requeued):  # noqa: F811
    job = make_job(user, place=False)
    job.transition(S.CANCELLED, error="Cancelled by the user.")
    waiter, out = in_thread(lambda: api.get(f"/api/jobs/{job.id}?wait=60"))
    waiter.join(timeout=30)
    assert out["value"].json()["status"] == "cancelled" and out["took"] < 20


@pytest.mark.parametrize("wait", ["61", "-1", "soon"])
def test_bad_wait_is_a_422_naming_it(api, user, requeued, wait):  # noqa: F811
    job = make_job(user, place=False)
    resp = api.get(f"/api/jobs/{job.id}?wait={wait}")
    assert resp.status_code == 422 and resp.json()["detail"].startswith("wait")


def test_wait_on_someone_elses_job_is_a_404(api, other_user, requeued):  # noqa: F811
    job = make_job(other_user, place=False)
    assert api.get(f"/api/jobs/{job.id}?wait=1").status_code == 404


def _post(api, headers=None):
    image = io.BytesIO(png_bytes())
    image.name = "in.png"
    return api.post("/api/generate-video", data={"prompt": "waves", "workflow": "smoke", "image": image},
                    json=False, headers=headers)


def test_prefer_wait_answers_with_the_finished_job(api, user, configured):  # noqa: F811
    def drive():
        # The worker's part, as a qcluster would do it once the job exists.
        while not VideoJob.objects.exists():
            threading.Event().wait(0.01)
        job = VideoJob.objects.get()
        from generation import scheduler

        scheduler.run_pass()
        run_to_end(job)

    worker = threading.Thread(target=drive, daemon=True)
    worker.start()
    resp = _post(api, headers={"Prefer": "wait=30"})
    worker.join(timeout=60)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "completed" and body["video_url"]
    assert resp["Preference-Applied"] == "wait=30"


def test_prefer_wait_that_runs_out_answers_202_with_the_job(api, user, requeued):  # noqa: F811
    from gpu.models import GpuConfig

    # A GPU nobody runs jobs on here (no worker): the job is placed and stays queued.
    GpuConfig.objects.filter(pk=GpuConfig.get().pk).update(comfyui_url="http://127.0.0.1:9", gpu_provider="local")
    resp = _post(api, headers={"Prefer": "wait=1"})
    assert resp.status_code == 202 and resp.json()["status"] == "queued" and resp.json()["place"] == "config"
    assert resp["Preference-Applied"] == "wait=1"


def test_prefer_wait_answers_at_once_with_a_job_that_failed_at_once(api, user, requeued):  # noqa: F811
    resp = _post(api, headers={"Prefer": "wait=30"})  # no GPU is configured
    assert resp.status_code == 200 and resp.json()["status"] == "failed"
    assert "No GPU is configured" in resp.json()["error"]


@pytest.mark.parametrize("prefer", ["wait=0", "wait=61", "wait=soon"])
def test_bad_prefer_wait_is_a_422(api, user, requeued, prefer):  # noqa: F811
    resp = _post(api, headers={"Prefer": prefer})
    assert resp.status_code == 422 and "Prefer: wait" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0


def test_other_preferences_are_ignored(api, user, requeued):  # noqa: F811
    resp = _post(api, headers={"Prefer": "respond-async"})
    assert resp.status_code == 202 and "Preference-Applied" not in resp


# ---------------------------------------------------------------------- a real ASGI server


@pytest.mark.slow_start
def test_fifty_waiting_clients_hold_no_thread_and_leave_when_they_disconnect(tmp_path):
    """One web process (gunicorn + a uvicorn worker, as `make run` starts it): 50 clients wait on a
    job that does not change, the server goes on answering, and closing them frees their places."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "R2_BUCKET")}
    port = free_port()
    env.update({"DJANGO_SETTINGS_MODULE": "i2v.settings", "I2V_DATA_DIR": str(tmp_path), "I2V_Q_NAME": f"w-{port}"})
    py = sys.executable
    subprocess.run([py, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True)
    token = subprocess.run([py, "manage.py", "bootstrap"], cwd=ROOT, env=env, check=True, capture_output=True,
                           text=True).stdout.split("API token:")[1].split()[0]
    web = subprocess.Popen([py, "-m", "gunicorn", "i2v.asgi:application", "-k", "uvicorn_worker.UvicornWorker",
                            "--bind", f"127.0.0.1:{port}", "--workers", "1"], cwd=ROOT, env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        from tests.i2v.test_make_run import wait_until_serving

        wait_until_serving(f"{base}/api/ping", web)
        # A GPU is configured (nothing listens there and no worker runs): the job is placed and stays so.
        httpx.post(f"{base}/api/gpu/config", headers=auth, timeout=30,
                   json={"comfyui_url": "http://127.0.0.1:9", "gpu_provider": "local"}).raise_for_status()
        created = httpx.post(f"{base}/api/generate-video", headers=auth, timeout=30,
                             files={"image": ("in.png", png_bytes(), "image/png")},
                             data={"prompt": "waves", "workflow": "smoke"})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

        async def scenario():
            async with httpx.AsyncClient(base_url=base, headers=auth, timeout=60) as client:
                waiters = [asyncio.create_task(client.get(f"/api/jobs/{job_id}?wait=55")) for _ in range(50)]
                while (await client.get("/api/ping")).json()["waiting"] < 50:
                    await asyncio.sleep(0.05)
                # All 50 wait in the one process; it still answers everyone else.
                answered = [await client.get(f"/api/jobs/{job_id}") for _ in range(20)]
                assert {r.status_code for r in answered} == {200}
                for task in waiters:
                    task.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                for _ in range(200):
                    if (await client.get("/api/ping")).json()["waiting"] == 0:
                        return True
                    await asyncio.sleep(0.05)
            return False

        assert asyncio.run(scenario()), "the disconnected clients still hold their places"
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        try:
            web.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(web.pid, signal.SIGKILL)


def test_the_sqlite_listener_reads_what_waiters_watch_of_few_jobs_or_many(user):
    """The local listener's one query per wake-up (prebuilt up to PREBUILT_STATES jobs, the ORM
    beyond) reads each watched job's status, step, progress, note and queue position as stored."""
    jobs = [VideoJob.objects.create(owner=user, input_image="inputs/x.png", prompt="p", workflow_slug="smoke", width=64,
                                    height=64, frames=17, fps=8, status=S.RUNNING, step=n, steps_total=50,
                                    progress=n / 50, note=f"note {n}") for n in range(waiting.PREBUILT_STATES + 3)]
    expected = {str(job.pk): (S.RUNNING, job.step, 50, job.progress, job.note, None) for job in jobs}
    few = [str(job.pk) for job in jobs[:3]] + ["00000000-0000-0000-0000-000000000000"]  # one gone meanwhile
    assert waiting._states(few) == {key: expected[key] for key in few[:3]}
    assert waiting._states(list(expected)) == expected
