"""Job-path benchmarks against the ComfyUI double, printed side by side.

    .venv/bin/python bench/bench_jobs.py            # 50 MB overhead, 1 GB RSS, progress delay
    .venv/bin/python bench/bench_jobs.py --quick    # smaller sizes, for a smoke run

1. Platform overhead per job (zero run time, a 50 MB output) against a raw streaming
   copy of the same bytes from the same server into the same storage.
2. Peak RSS growth of a worker process while it stores a 1 GB output.
3. Delay from a `progress` event on the double's websocket to the new step at
   GET /api/jobs/{id}.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _app import throwaway_data_dir  # noqa: E402  (bench/, beside this file)
if "I2V_DATA_DIR" not in os.environ:
    os.environ["I2V_DATA_DIR"] = throwaway_data_dir("i2v-bench-")
os.environ["DJANGO_SETTINGS_MODULE"] = "i2v.settings"
os.environ.setdefault("I2V_FOLLOW_SLICE", "600")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.files import File  # noqa: E402
from django.core.files.base import ContentFile  # noqa: E402
from django.core.files.storage import default_storage  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402

from generation import runner, tasks  # noqa: E402
from generation.models import VideoJob, Workflow  # noqa: E402
from gpu.comfyui import ComfyUIClient  # noqa: E402
from gpu.models import GpuConfig  # noqa: E402
from i2v.core.tokens import ApiToken  # noqa: E402
from tests.doubles.comfyui import ComfyUIDouble  # noqa: E402
from tests.helpers import png_bytes  # noqa: E402

MB = 1024 * 1024


def setup(comfy_url):
    call_command("migrate", verbosity=0)
    user, _ = get_user_model().objects.get_or_create(username="bench")
    config = GpuConfig.get()
    config.comfyui_url = comfy_url
    config.save()
    tasks.enqueue = lambda *a: None  # the benchmark drives slices itself
    return user


def new_job(user):
    wf = Workflow.objects.get(slug="smoke")
    job = VideoJob(owner=user, prompt="bench", workflow=wf, workflow_slug="smoke", width=64, height=64, frames=17, fps=8)
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(png_bytes()))
    job.save()
    return job


def run_job(job):
    while True:
        tasks.run_job(str(job.id))
        job.refresh_from_db()
        if job.is_terminal:
            return job


def bench_overhead(user, comfy, size, rounds):
    comfy.output_size = size
    platform, raw = [], []
    for i in range(rounds):
        job = new_job(user)
        t0 = time.perf_counter()
        job = run_job(job)
        platform.append(time.perf_counter() - t0)
        assert job.status == "completed", job.error
        assert job.video_size == size
        out = job.provider_urls["output"]
        client = ComfyUIClient(comfy.url)
        t0 = time.perf_counter()
        with client.open_view(out["filename"], out["subfolder"]) as resp:
            stream = runner.ResponseStream(resp)
            default_storage.save(f"raw/{job.id}.mp4", File(stream, name="raw.mp4"))
        raw.append(time.perf_counter() - t0)
        client.close()
    p, r = statistics.median(platform), statistics.median(raw)
    print(f"[overhead] {size // MB} MB output, {rounds} rounds (median):")
    print(f"  whole job through i2v : {p:.3f} s")
    print(f"  raw streaming copy    : {r:.3f} s")
    print(f"  overhead              : {p - r:.3f} s   whole job vs 0.25 s + 1.1 × raw = {0.25 + 1.1 * r:.3f} s "
          f"→ {'met' if p <= 0.25 + 1.1 * r else 'NOT met'} (goal: whole job ≤ 0.25 s + 1.1 × raw)")


RSS_CHILD = r"""
import os, resource, sys
sys.path.insert(0, {root!r})
os.environ["DJANGO_SETTINGS_MODULE"] = "i2v.settings"
import django; django.setup()
from generation.models import VideoJob
from generation import runner
job = VideoJob.objects.get(pk={job_id!r})
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
runner.store_output(job, runner.client_for(job))
peak = status("VmHWM")
job.refresh_from_db()
print(base, peak, job.status, job.video_size)
"""


def bench_rss(user, comfy, size):
    comfy.output_size = size
    job = new_job(user)
    # Run it up to `uploading`, then let a fresh process (a worker) do the storing.
    runner.advance(job.id, deadline=time.monotonic() + 120)
    job.refresh_from_db()
    if job.status != "uploading":
        # advance() stores the output too; rewind to measure the store in isolation.
        VideoJob.objects.filter(pk=job.pk).update(status="uploading", video="", video_size=None, finished_at=None)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD.format(root=str(ROOT), job_id=str(job.id))],
                         capture_output=True, text=True, env=os.environ.copy(), check=True)
    base, peak, status, stored = out.stdout.split()
    growth = (int(peak) - int(base)) / 1024
    print(f"[memory] storing a {size // MB} MB output in a worker process:")
    print(f"  status {status}, stored {int(stored) // MB} MB; peak RSS {int(base) / 1024:.0f} → {int(peak) / 1024:.0f} MB")
    print(f"  growth {growth:.1f} MB   goal ≤ 64 MB → {'met' if growth <= 64 else 'NOT met'}")


def bench_progress_delay(user, comfy, steps):
    comfy.output_size = None
    wf = Workflow.objects.get(slug="wan22-i2v")
    job = VideoJob(owner=user, prompt="bench", workflow=wf, workflow_slug=wf.slug, width=832, height=480, frames=81,
                   fps=16, steps=steps)
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(png_bytes()))
    job.save()
    _, key = ApiToken.issue(user)
    http = Client(HTTP_HOST="localhost")
    comfy.hold = threading.Event()
    worker = threading.Thread(target=run_job, args=(job,), daemon=True)
    worker.start()
    delays = []
    last = 0
    while True:
        try:
            comfy.wait_held(timeout=10)
        except TimeoutError:
            break
        t0 = time.perf_counter()
        comfy.release_once()  # the double now sends the next event (a `progress` at a sampler step)
        deadline = t0 + 5
        while time.perf_counter() < deadline:
            body = http.get(f"/api/jobs/{job.id}", headers={"Authorization": f"Bearer {key}"}).json()
            if body["step"] > last:
                delays.append(time.perf_counter() - t0)
                last = body["step"]
                break
            if body["status"] in ("completed", "failed"):
                break
            if time.perf_counter() - t0 > 1.0:
                break  # this hold point was a node, not a sampler step: no step to wait for
        if last >= steps:
            break
    comfy.hold.set()
    comfy.hold = None
    worker.join(timeout=60)
    delays.sort()
    p50 = delays[len(delays) // 2]
    p95 = delays[min(len(delays) - 1, int(len(delays) * 0.95))]
    print(f"[progress] {len(delays)} progress events → visible at GET /api/jobs/{{id}}:")
    print(f"  p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms   goal p95 ≤ 500 ms "
          f"→ {'met' if p95 <= 0.5 else 'NOT met'}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with ComfyUIDouble() as comfy:
        user = setup(comfy.url)
        bench_overhead(user, comfy, (5 if args.quick else 50) * MB, 3 if args.quick else 5)
        bench_rss(user, comfy, (64 if args.quick else 1024) * MB)
        bench_progress_delay(user, comfy, 10 if args.quick else 40)


if __name__ == "__main__":
    main()
