"""A job's whole path against the ComfyUI double: submit once, follow, store, fail, cancel, recover."""

import json
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from generation import runner, scheduler, tasks
from generation.domain import sync_shipped_workflows
from generation.models import RunStat, VideoJob, Workflow
from gpu.models import ModelFile
from gpu.models import GpuConfig
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import StaticServer, png_bytes

pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status


@pytest.fixture
def comfy():
    with ComfyUIDouble() as double:
        yield double


@pytest.fixture
def requeued(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks, "enqueue", lambda func, *args: calls.append(args))
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
    return calls


@pytest.fixture
def configured(comfy, requeued, settings):
    settings.I2V_FOLLOW_SLICE = 5
    config = GpuConfig.get()
    config.comfyui_url = comfy.url
    config.gpu_provider = "local"
    config.save()
    return comfy


def make_job(owner, workflow="smoke", place=True, **kw):
    """A queued job as the API makes it; with `place`, the scheduler's pass places it as a worker would."""
    # transaction=True tests flush the tables the data migration filled.
    sync_shipped_workflows(Workflow, ModelFile)
    wf = Workflow.objects.get(slug=workflow)
    d = wf.defaults
    job = VideoJob(owner=owner, prompt=kw.pop("prompt", "a dragon turns its head"), workflow=wf, workflow_slug=wf.slug,
                   width=d["width"], height=d["height"], frames=d["frames"], fps=d["fps"], steps=d.get("steps"), **kw)
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(png_bytes()))
    job.save()
    if place:
        scheduler.run_pass()
        job.refresh_from_db()
    return job


def run_to_end(job, limit=20):
    for _ in range(limit):
        tasks.run_job(str(job.id))
        job.refresh_from_db()
        if job.is_terminal:
            return job
    raise AssertionError(f"job still {job.status} after {limit} slices")


def wait_for_row(job, predicate, timeout=5.0):
    """Re-read the job until predicate(row) holds (a bounded wait for a condition)."""
    import time

    end = time.monotonic() + timeout
    while True:
        row = VideoJob.objects.get(pk=job.pk)
        if predicate(row) or time.monotonic() > end:
            return row
        time.sleep(0.01)


def in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def test_smoke_job_completes_and_stores_the_video(configured, user, client):
    comfy = configured
    job = run_to_end(make_job(user))
    assert job.status == S.COMPLETED, job.error
    assert comfy.prompt_posts[job.prompt_id] == 1
    out = job.provider_urls["output"]
    expected = comfy.output_bytes(out["filename"], out["subfolder"])
    assert default_storage.open(job.video.name).read() == expected
    assert job.video_size == len(expected)
    assert job.progress == 1.0 and job.step == job.steps_total > 0
    assert job.submitted_at and job.finished_at and job.cost_usd == 0
    # The submitted graph carries the job's image, a per-job prefix and a seed.
    graph = comfy.submitted[-1]["prompt"]
    assert graph["1"]["inputs"]["image"] == f"i2v/{job.id}.png"
    assert graph["6"]["inputs"]["filename_prefix"] == f"i2v/{job.id}"
    assert graph["4"]["inputs"]["seed"] == job.seed
    # The owner can fetch it, with range requests for seeking.
    client.force_login(user)
    resp = client.get(f"/jobs/{job.id}/video", headers={"Range": "bytes=0-9"})
    assert resp.status_code == 206 and b"".join(resp.streaming_content) == expected[:10]
    assert resp["Content-Range"] == f"bytes 0-9/{len(expected)}"
    full = client.get(f"/jobs/{job.id}/video")
    assert b"".join(full.streaming_content) == expected


def test_refusing_private_networks_holds_for_the_next_job_though_the_worker_keeps_its_connection(configured, user, settings):
    """A worker keeps its ComfyUI connection alive from one job to the next (runner.shared_http).
    An operator who turns on I2V_BLOCK_PRIVATE_NETWORKS gets it for the very next job: that job is
    refused, not carried over the connection the last job left open."""
    first = run_to_end(make_job(user))
    assert first.status == S.COMPLETED, first.error
    settings.I2V_BLOCK_PRIVATE_NETWORKS = True
    second = run_to_end(make_job(user))
    assert second.status == S.FAILED
    assert "private and loopback addresses are disabled" in second.error
    assert second.prompt_id not in configured.prompt_posts
    assert configured.count("POST", "/upload/image") == 1


def test_a_cookie_one_job_s_comfyui_sets_never_rides_along_on_the_next_job_s_calls():
    """Jobs share their worker's HTTP client (runner.shared_http): a cookie a ComfyUI or the proxy
    in front of it sets (a portal's session after a token) must not authenticate later jobs, which
    carry their own token."""
    stats = (200, {"Set-Cookie": "portal_session=granted; Path=/", "Content-Type": "application/json"},
             b'{"system": {"comfyui_version": "0.3.64"}, "devices": []}')
    with StaticServer({"/system_stats": stats}) as portal:
        for _ in range(2):  # two jobs, each with its own ComfyUI client on the shared HTTP client
            client = runner.ComfyUIClient(portal.url, http_client=runner.shared_http())
            client.system_stats()
            client.close()
    assert [headers.get("Cookie") for headers in portal.headers_seen] == [None, None]


def test_a_burst_of_progress_events_is_written_at_most_four_times_a_second(configured, user):
    """Every progress write wakes each page and script waiting on the job: a run whose node and
    step events come milliseconds apart is written a few times, and its end holds everything."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    comfy = configured
    comfy.steps_delay = 0.02  # its sampler steps and every node within ~0.1 s
    job = make_job(user, workflow="wan22-i2v", seed=7)
    started = time.monotonic()
    with CaptureQueriesContext(connection) as queries:
        job = run_to_end(job)
    took = time.monotonic() - started
    assert job.status == S.COMPLETED, job.error
    events = [e for e in comfy.emitted if e["sid"] == job.client_id and e["type"] in ("executing", "progress")]
    progress_writes = [q for q in queries.captured_queries
                       if q["sql"].startswith("UPDATE") and "node_progress" in q["sql"] and "completed" not in q["sql"]]
    assert len(events) >= 20
    assert 1 <= len(progress_writes) <= 2 + 4 * took, (len(progress_writes), took)
    # Nothing held back is lost: every step and every node that ran is on the finished job.
    assert job.step == job.steps_total > 0
    ran = {node for node, _, _, seconds in job.node_timings if seconds is not None} - {"upload"}  # (storing)
    assert ran == {e["data"]["node"] for e in events if e["type"] == "executing" and e["data"]["node"]}
    assert job.current_node == [e["data"]["node"] for e in events if e["type"] == "executing" and e["data"]["node"]][-1]


def test_wan_job_reports_sampler_steps_mid_run(configured, user):
    comfy = configured
    comfy.hold = threading.Event()
    job = make_job(user, workflow="wan22-i2v", seed=42)
    worker = in_thread(run_to_end, job)
    # Let the run go one hold point at a time and watch the job's step in the database.
    seen, last = [], 0
    for _ in range(60):
        try:
            comfy.wait_held(timeout=5)
        except TimeoutError:
            break
        comfy.release_once()
        row = wait_for_row(job, lambda r: r.step > last or r.is_terminal, timeout=1.0)
        if row.step > last:
            seen.append((row.status, row.step, row.steps_total))
            last = row.step
        if row.is_terminal or last == 4:
            break
    comfy.hold.set()
    worker.join(timeout=30)
    job.refresh_from_db()
    assert job.status == S.COMPLETED, job.error
    assert job.steps_total == 4
    steps = [step for _, step, _ in seen]
    assert steps == sorted(set(steps)) and steps[-1] == 4 and any(0 < s < 4 for s in steps)
    assert all(status == S.RUNNING and total == 4 for status, _, total in seen)
    graph = comfy.submitted[-1]["prompt"]
    assert graph["86"]["inputs"]["noise_seed"] == 42
    assert (graph["86"]["inputs"]["end_at_step"], graph["85"]["inputs"]["start_at_step"]) == (2, 2)


def test_worker_killed_after_post_resumes_without_second_post(configured, user, monkeypatch):
    comfy = configured
    job = make_job(user)
    real_post = runner._post

    class WorkerDied(BaseException):
        pass

    # Die right after ComfyUI received the prompt, before the job was marked submitted.
    def post_and_die(client, j, before_post):
        VideoJob.objects.filter(pk=j.pk).update(posted_at=timezone.now())  # as _post records before its POST
        before_post()  # the websocket is open
        client.submit(runner.build_graph(j, client.upload_image(png_bytes(), f"{j.id}.png")), prompt_id=j.prompt_id,
                      client_id=j.client_id, output_node=j.workflow.output_node)
        raise WorkerDied()

    monkeypatch.setattr(runner, "_post", post_and_die)
    with pytest.raises(WorkerDied):
        tasks.run_job(str(job.id))
    monkeypatch.setattr(runner, "_post", real_post)
    job.refresh_from_db()
    assert job.status == S.QUEUED and job.prompt_id
    VideoJob.objects.filter(pk=job.pk).update(lease_until=None)  # the dead worker's lease ran out
    job = run_to_end(job)
    assert job.status == S.COMPLETED, job.error
    assert comfy.prompt_posts[job.prompt_id] == 1
    assert sum(comfy.prompt_posts.values()) == 1


def test_worker_killed_mid_run_follows_the_same_run(configured, user):
    comfy = configured
    comfy.hold = threading.Event()
    job = make_job(user)
    # The first slice submits and starts following; it ends (deadline) while ComfyUI holds.
    runner.advance(job.id, deadline=0)  # deadline already passed: submit, then return
    job.refresh_from_db()
    assert job.status == S.SUBMITTED
    comfy.wait_held()
    comfy.hold.set()
    job = run_to_end(job)
    assert job.status == S.COMPLETED
    assert sum(comfy.prompt_posts.values()) == 1


def test_duplicate_task_while_leased_does_nothing(configured, user):
    job = make_job(user)
    VideoJob.objects.filter(pk=job.pk).update(lease_token="other", lease_until="2999-01-01T00:00:00Z")
    assert tasks.run_job(str(job.id)) == "busy-or-finished"
    assert configured.count("POST", "/prompt") == 0


def test_comfyui_restart_resubmits_once_then_fails(configured, user):
    comfy = configured
    comfy.hold = threading.Event()
    job = make_job(user)
    runner.advance(job.id, deadline=0)
    comfy.wait_held()
    comfy.restart()
    comfy.hold = threading.Event()
    runner.advance(job.id, deadline=0)  # finds the run gone: resubmits
    comfy.wait_held()
    job.refresh_from_db()
    assert job.submit_count == 2 and comfy.prompt_posts[job.prompt_id] == 2
    comfy.restart()
    comfy.hold = None
    job = run_to_end(job)
    assert job.status == S.FAILED
    assert "lost this job twice" in job.error


def test_execution_error_fails_with_the_exception_message(configured, user):
    configured.fail_node = "SaveVideo"
    configured.fail_message = "Generic error in an external library: 'avcodec_open2(\"libx264\", {})'"
    job = run_to_end(make_job(user))
    assert job.status == S.FAILED
    assert "avcodec_open2" in job.error and "SaveVideo" in job.error


def test_missing_model_file_fails_naming_it(configured, user):
    configured.models = {"loras": [], "vae": ["wan_2.1_vae.safetensors"], "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
                         "unet": ["Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf", "wan22EnhancedNSFWCameraPrompt_nsfwFASTMOVEV2Q8H.gguf"]}
    job = run_to_end(make_job(user, workflow="wan22-i2v"))
    assert job.status == S.FAILED
    assert "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors" in job.error
    assert "101" in job.error


def test_cancel_running_job_interrupts_it(configured, user, api):
    comfy = configured
    comfy.hold = threading.Event()
    job = make_job(user)
    worker = in_thread(run_to_end, job)
    comfy.wait_held()
    resp = api.post(f"/api/jobs/{job.id}/cancel")
    assert resp.status_code == 200
    worker.join(timeout=30)
    job.refresh_from_db()
    assert job.status == S.CANCELLED
    assert comfy.count("POST", "/interrupt") == 1
    assert not job.video


def test_cancel_pending_job_removes_it_from_the_queue(configured, user, api):
    comfy = configured
    comfy.hold = threading.Event()
    first = make_job(user)
    runner.advance(first.id, deadline=0)
    comfy.wait_held()
    second = make_job(user, prompt="another")
    runner.advance(second.id, deadline=0)
    second.refresh_from_db()
    assert second.prompt_id in comfy.pending_prompt_ids
    resp = api.post(f"/api/jobs/{second.id}/cancel")
    assert resp.json()["status"] == "cancelled"
    assert second.prompt_id not in comfy.pending_prompt_ids
    comfy.hold.set()
    assert run_to_end(first).status == S.COMPLETED


def test_unreachable_comfyui_sends_the_job_back_to_wait_then_fails_after_the_grace(requeued, user, settings):
    from tests.conftest import free_port

    config = GpuConfig.get()
    config.comfyui_url = f"http://127.0.0.1:{free_port()}"
    config.save()
    job = make_job(user)
    assert job.place == "config"
    assert tasks.run_job(str(job.id)) == "done"
    job.refresh_from_db()
    # Nothing was posted, so the job waits in i2v's queue again and says why.
    assert job.status == S.QUEUED and job.place == "" and job.prompt_id == ""
    assert f"ComfyUI at {config.comfyui_url} unreachable since" in job.note and "refused" in job.note
    assert "retrying until" in job.note
    settings.I2V_COMFYUI_GRACE = 0
    scheduler.run_pass()
    job.refresh_from_db()
    assert job.status == S.FAILED
    assert "refused" in job.error.lower() and job.error_class == VideoJob.ErrorClass.COMFYUI_UNREACHABLE


def test_a_job_waiting_for_an_unreachable_gpu_runs_once_the_url_is_fixed(comfy, requeued, user):
    from tests.conftest import free_port

    config = GpuConfig.get()
    config.comfyui_url = f"http://127.0.0.1:{free_port()}"
    config.save()
    job = make_job(user)
    tasks.run_job(str(job.id))
    job.refresh_from_db()
    assert job.status == S.QUEUED and "unreachable since" in job.note
    config.comfyui_url = comfy.url
    config.save()
    job = run_to_end(job)
    assert job.status == S.COMPLETED and job.comfyui_url == comfy.url
    assert len(comfy.prompt_posts) == 1


def test_no_gpu_configured_fails_clearly(requeued, user):
    job = run_to_end(make_job(user))
    assert job.status == S.FAILED and "No GPU is configured" in job.error


def test_a_run_heard_whole_on_the_websocket_ends_without_asking_the_history_again(configured, user):
    """The socket carried the run from execution_start to execution_success with its output: the
    video is fetched at once, and the run time learnt from the events' timestamps."""
    comfy = configured
    comfy.run_seconds = 0.2
    job = run_to_end(make_job(user))
    assert job.status == S.COMPLETED, job.error
    # Never: the socket was open before the prompt was posted, and the run started at once (a run
    # that waits in ComfyUI's queue is asked about after FIRST_LOOK; see the next test).
    assert comfy.count("GET", f"/history/{job.prompt_id}") == 0 and comfy.count("GET", "/queue") == 0
    out = job.provider_urls["output"]
    assert default_storage.open(job.video.name).read() == comfy.output_bytes(out["filename"], out["subfolder"])
    messages = dict(httpx.get(f"{comfy.url}/history/{job.prompt_id}").json()[job.prompt_id]["status"]["messages"])
    ran = (messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"]) / 1000
    stat = RunStat.objects.get(workflow_slug=job.workflow_slug, gpu_class=job.gpu_class)
    assert stat.runs == 1 and stat.mean_seconds == pytest.approx(ran)


def test_the_image_uploads_while_the_websocket_opens_and_the_prompt_waits_for_the_socket(configured, user):
    """The websocket's handshake and the image's upload wait on ComfyUI side by side (one job's way
    to the GPU is shorter by whichever is shorter), yet the prompt is posted only once the socket is
    open: ComfyUI does not keep the events of a client that is not connected."""
    comfy = configured
    comfy.ws_gate = threading.Event()  # the upgrade is held: a slow handshake
    job = make_job(user)
    worker = in_thread(run_to_end, job)
    try:
        # The upload comes in although no upgrade has been answered (the two requests go out side by
        # side: either may reach the double first); the upgrade is held, the prompt not posted.
        comfy.wait_for(lambda c: c.count("POST", "/upload/image") == 1, timeout=10)
        comfy.wait_for(lambda c: c.count("GET", "/ws") == 1, timeout=10)
        assert not comfy.prompt_posts
        assert wait_for_row(job, lambda r: r.posted_at is not None).status == S.QUEUED
    finally:
        comfy.ws_gate.set()
    worker.join(timeout=30)
    job.refresh_from_db()
    assert job.status == S.COMPLETED, job.error
    assert comfy.prompt_posts == {job.prompt_id: 1}
    assert comfy.posted_with_socket == {job.prompt_id: True}
    # The run came whole over the socket: nothing was asked to make up for lost events.
    assert comfy.count("GET", f"/history/{job.prompt_id}") == 0


def test_following_a_run_takes_next_to_no_cpu_while_it_waits_for_events(configured, user):
    """The worker sleeps on the websocket between events: past FIRST_LOOK, a run that started
    is not looked at again (waiting for that look would spin)."""
    comfy = configured
    comfy.run_seconds = 1.5
    job = make_job(user)
    spent = []

    def run():
        started = time.thread_time()
        run_to_end(job)
        spent.append(time.thread_time() - started)

    in_thread(run).join(timeout=30)
    job.refresh_from_db()
    assert job.status == S.COMPLETED, job.error
    assert spent[0] < 0.5, f"the worker's thread used {spent[0]:.2f} s of CPU over a 1.5 s run"


def test_a_prompt_waiting_behind_another_in_comfyuis_queue_shows_its_place(configured, user):
    """Someone else's prompt runs on the GPU: the job's prompt waits in ComfyUI's queue, which the
    worker asks once the run has not started within FIRST_LOOK; the job shows its place there."""
    comfy = configured
    comfy.hold = threading.Event()
    graph = json.loads((Path(__file__).resolve().parents[2] / "generation/workflows/smoke.json").read_text())
    name = httpx.post(f"{comfy.url}/upload/image", files={"image": ("other.png", png_bytes(), "image/png")}).json()["name"]
    prompt = graph["graph"]
    for node, field in graph["bindings"]["image"]:
        prompt[node]["inputs"][field] = name
    assert httpx.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": "someone-else"}).status_code == 200
    comfy.wait_held()
    job = make_job(user)
    worker = in_thread(run_to_end, job)
    row = wait_for_row(job, lambda r: r.queue_position == 1)
    assert row.status == S.SUBMITTED and row.queue_position == 1  # one run ahead of it
    assert comfy.count("GET", "/queue") >= 1
    comfy.hold.set()
    worker.join(timeout=30)
    job.refresh_from_db()
    assert job.status == S.COMPLETED, job.error


def test_dropped_websocket_falls_back_to_polling(configured, user):
    configured.drop_websocket_after = 2
    configured.run_seconds = 0.5
    job = run_to_end(make_job(user))
    assert job.status == S.COMPLETED, job.error
    assert configured.count("GET", "/history/*") >= 1  # the socket never carried the run's end


def test_token_is_sent_to_comfyui(configured, user):
    comfy = configured
    comfy.token = "portal-secret"
    config = GpuConfig.get()
    config.comfyui_token = "portal-secret"
    config.save()
    job = run_to_end(make_job(user))
    assert job.status == S.COMPLETED, job.error
    assert all(r.headers.get("Authorization") == "Bearer portal-secret" for r in comfy.requests)


def test_webhook_is_signed_with_the_owners_secret_and_recorded(configured, user, settings):
    import base64

    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from i2v.core.webhook_secrets import WebhookSecret

    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    secret = WebhookSecret.rotate(user)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    in_thread(srv.serve_forever)
    try:
        job = make_job(user, webhook_url=f"http://127.0.0.1:{srv.server_address[1]}/hook")
        job = run_to_end(job)
        from generation.webhooks import deliver

        deliver(str(job.id), 1)
    finally:
        srv.shutdown()
    assert len(received) == 1
    headers, body = received[0]
    payload = Webhook(secret).verify(body, headers)  # what a receiver does, with the library
    assert payload["job"]["status"] == "completed" and payload["event"] == "job.completed"
    assert headers["webhook-id"] == f"msg_{job.id}_completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(settings.SECRET_KEY.encode()).decode()).verify(body, headers)
    assert job.webhook_deliveries.get().ok


def test_job_timeout_stops_the_run(configured, user, settings):
    comfy = configured
    comfy.hold = threading.Event()
    settings.I2V_JOB_TIMEOUT = 0
    job = run_to_end(make_job(user))
    comfy.hold.set()
    assert job.status == S.FAILED
    assert "took longer than 0 s" in job.error
    assert comfy.count("POST", "/interrupt") + comfy.count("POST", "/queue") >= 1


def test_failed_webhook_is_retried_later_and_recorded(configured, user):
    from django_q.models import Schedule

    from i2v.core.webhook_secrets import WebhookSecret
    from tests.helpers import StaticServer

    WebhookSecret.rotate(user)
    with StaticServer({"/hook": (500, {}, b"boom")}) as srv:
        job = run_to_end(make_job(user, webhook_url=f"{srv.url}/hook"))
        from generation.webhooks import deliver

        deliver(str(job.id), 1)
        deliver(str(job.id), 1)  # a redelivered task: the attempt is not repeated
    row = job.webhook_deliveries.get()
    assert (row.attempt, row.ok, row.status_code, row.error) == (1, False, 500, "HTTP 500")
    retry = Schedule.objects.get(func="generation.tasks.deliver_webhook")
    assert retry.args == f"'{job.id}',2" and retry.schedule_type == Schedule.ONCE


def test_video_goes_to_r2_and_is_served_by_presigned_url(configured, user, settings, api, s3_server):
    import httpx

    settings.R2_BUCKET = "videos"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
        "bucket_name": "videos", "endpoint_url": s3_server, "region_name": "auto", "access_key": "k",
        "secret_key": "s", "file_overwrite": False, "default_acl": None}}}
    job = run_to_end(make_job(user))
    assert job.status == S.COMPLETED, job.error
    out = job.provider_urls["output"]
    url = api.get(f"/api/jobs/{job.id}").json()["video_url"]
    assert url == f"http://testserver/api/jobs/{job.id}/video"
    # The API's video URL takes the Bearer token and redirects to a presigned storage URL.
    redirect = api.get(url)
    assert redirect.status_code == 302
    presigned = redirect["Location"]
    assert presigned.startswith(s3_server) and "X-Amz-Signature=" in presigned
    assert httpx.get(presigned).content == configured.output_bytes(out["filename"], out["subfolder"])


def test_comfyui_hiccup_mid_run_does_not_fail_a_long_job(configured, user, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    comfy = configured
    comfy.hold = threading.Event()
    job = make_job(user)
    runner.advance(job.id, deadline=0)
    comfy.wait_held()
    # The job has been running a long time when the tunnel drops for a moment.
    VideoJob.objects.filter(pk=job.pk).update(status_changed_at=timezone.now() - timedelta(hours=1))
    comfy.hang_paths = {"*"}
    monkeypatch.setattr(runner, "client_for", lambda j, target=None: runner.ComfyUIClient(
        j.comfyui_url, connect_timeout=0.5, read_timeout=0.5, retries=0))
    assert runner.advance(job.id, deadline=time.monotonic() + 2) is False
    job.refresh_from_db()
    assert job.status == S.SUBMITTED and job.unreachable_since is not None
    comfy.release_hangs()
    comfy.hold.set()
    job = run_to_end(job)
    assert job.status == S.COMPLETED and job.unreachable_since is None


def test_on_local_files_a_run_goes_straight_to_completed(configured, user, monkeypatch):
    """Storing a video on local files is a copy of a few ms: the job is written once at the end of its
    run (completed), not twice (uploading, then completed), and the GPU's time is still on record."""
    statuses = []
    real_transition = VideoJob.transition

    def transition(job, to, **fields):
        statuses.append(to)
        return real_transition(job, to, **fields)

    monkeypatch.setattr(VideoJob, "transition", transition)
    configured.run_seconds = 0.2
    job = run_to_end(make_job(user, workflow="wan22-i2v"))
    assert job.status == S.COMPLETED and default_storage.exists(job.video.name)
    assert S.UPLOADING not in statuses and statuses[-1] == S.COMPLETED
    assert job.submitted_at <= job.uploading_at <= job.finished_at
    assert job.node_timings[-1][0] == "upload" and job.progress == 1.0


def test_on_local_files_a_failed_store_waits_in_uploading_and_is_retried(configured, user, monkeypatch):
    real_save = runner.save_video
    failures = iter([OSError("No space left on device")])

    def save_video(name, stream):
        for exc in failures:
            raise runner.StorageFailed(f"Could not upload the video to the storage: {exc}") from exc
        return real_save(name, stream)

    monkeypatch.setattr(runner, "save_video", save_video)
    job = run_to_end(make_job(user))
    # The failed copy left the job uploading (the video is still on ComfyUI); the retry stored it.
    assert job.status == S.COMPLETED and job.uploading_at is not None and default_storage.exists(job.video.name)


def test_a_job_is_never_seen_completed_without_its_cost(configured, user, monkeypatch):
    """A script woken by "completed" reads the cost in that same answer: the cost is written with the
    completion, not a moment after it."""
    seen = []
    real_transition = VideoJob.transition

    def transition(job, to, **fields):
        won = real_transition(job, to, **fields)
        if won and to == S.COMPLETED:  # the row as any reader sees it the moment it is completed
            seen.append(VideoJob.objects.values_list("status", "cost_usd").get(pk=job.pk))
        return won

    monkeypatch.setattr(VideoJob, "transition", transition)
    job = run_to_end(make_job(user))
    assert seen == [(S.COMPLETED, Decimal("0"))] and job.cost_usd == 0  # your own GPU: i2v pays nothing
