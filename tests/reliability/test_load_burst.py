"""Concurrent generate requests against a real HTTP server (pytest-django's live server) and a
real django-q2 worker: some repeat an `Idempotency-Key` at the same moment. Exactly the expected
jobs exist, none is lost or duplicated, every one completes with one `POST /prompt` on the
ComfyUI double.

The CI variant sends 20 requests (10 + 5 keys × 2) and SIGKILLs the worker once; the long
variant (`-m slow`, `make test-long`) sends 100 (50 + 25 keys × 2, as `bench/bench_load.py` does
against `make run`) and SIGKILLs the worker three times while they run."""

import random
import threading

import httpx
import pytest
from django.core.servers.basehttp import ThreadedWSGIServer

from generation.models import VideoJob
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import png_bytes
from tests.reliability.test_worker_faults import Workers, recover_lost_tasks, wait_terminal

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow_start]

# The live server's listen backlog is socketserver's default of 5: a burst of 100 connections
# would be reset by the kernel before Django sees them (gunicorn's backlog is 2048). Set at import,
# before the session's live server starts.
ThreadedWSGIServer.request_queue_size = 1024


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop_all()


def fire(url, token, requests):
    """All requests at once (a barrier releases them together); returns (key, status, job id)."""
    image = png_bytes()
    barrier = threading.Barrier(len(requests))
    results = [None] * len(requests)

    def one(i, key):
        headers = {"Authorization": f"Bearer {token}"}
        if key:
            headers["Idempotency-Key"] = key
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            resp = http.post(f"{url}/api/generate-video", headers=headers,
                             # A retried request repeats its body: the same key with another body is a 409.
                             data={"prompt": f"burst {key or i}", "workflow": "smoke"},
                             files={"image": ("in.png", image, "image/png")})
        results[i] = (key, resp.status_code, resp.json().get("id"), resp.text[:300])

    threads = [threading.Thread(target=one, args=(i, key)) for i, key in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("unique, keys, kills", [
    pytest.param(10, 5, 1, id="20-requests-1-kill"),
    pytest.param(50, 25, 3, id="100-requests-3-kills", marks=pytest.mark.slow),
])
def test_concurrent_generates_make_exactly_the_expected_jobs(live_server, token, workers, unique, keys, kills):
    from gpu.models import GpuConfig

    requests = [None] * unique + [f"burst-key-{i}" for i in range(keys)] * 2
    random.Random(7).shuffle(requests)
    expected = unique + keys
    with ComfyUIDouble(run_seconds=0.05) as comfy:
        config = GpuConfig.get()
        config.comfyui_url = comfy.url
        config.gpu_provider = "local"
        config.save()
        proc = workers.start()
        results = fire(live_server.url, token, requests)

        codes = sorted(code for _, code, _, _ in results)
        assert codes == [200] * keys + [202] * expected, [r for r in results if r[1] not in (200, 202)]
        by_key = {}
        for key, _, job_id, _ in results:
            if key:
                by_key.setdefault(key, set()).add(job_id)
        assert all(len(ids) == 1 for ids in by_key.values()), by_key
        ids = sorted({job_id for _, _, job_id, _ in results})
        assert len(ids) == expected == VideoJob.objects.count()

        # SIGKILL the worker while the jobs run, each time a few more have reached the GPU.
        for k in range(kills):
            target = (k + 1) * expected // (kills + 2)
            comfy.wait_for(lambda c: c.count("POST", "/prompt") >= target, timeout=120)
            workers.sigkill(proc)
            proc = workers.start()

        rows = wait_terminal(ids, 240, tick=recover_lost_tasks)
        assert {rows[i].status for i in ids} == {"completed"}, {i: rows[i].error for i in ids if rows[i].error}
        posts = comfy.prompt_posts
        assert sorted(posts[rows[i].prompt_id] for i in ids) == [1] * expected
        assert sum(posts.values()) == expected
