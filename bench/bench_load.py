"""Load against the app as `make run` starts it (gunicorn + qcluster via `manage.py runall`) on
PostgreSQL + Redis, with the ComfyUI double as the GPU. Prints figures; not a test.

    .venv/bin/python bench/bench_load.py                 # 100 generates, then 50 clients × 10 s per endpoint
    .venv/bin/python bench/bench_load.py --seconds 3     # shorter latency phases

Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379, as `.ci/run`
starts them. The database `i2v_bench` is dropped and created afresh on every run.

1. 100 concurrent `POST /api/generate-video`: 50 without a key and 50 that send 25
   Idempotency-Keys twice each (both copies at the same moment) → exactly 75 jobs, each
   completed, with one `POST /prompt` each on the double.
2. `GET /api/jobs/{id}` and `GET /api/ping` (the trivial endpoint) at 50 concurrent clients on
   the same server in the same run: p50, p99 and throughput of each, and their ratio.
   Goal: jobs p99 ≤ 50 ms and jobs throughput ≥ 0.7 × ping's.
"""

import argparse
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _app  # noqa: E402  (bench/, beside this file)
from tests.doubles.comfyui import ComfyUIDouble  # noqa: E402
from tests.helpers import png_bytes  # noqa: E402

DB = "i2v_bench"


def start_app(web_concurrency, web_threads=4):
    app = _app.App({"WEB_CONCURRENCY": str(web_concurrency), "WEB_THREADS": str(web_threads), "I2V_WORKERS": "4",
                    "I2V_FOLLOW_SLICE": "5",
                    # One user sends all of it: the per-user limits (30 generates a minute, 20 waiting)
                    # would answer most of it 429.
                    "I2V_RATE_GENERATE": "100000/m", "I2V_MAX_WAITING": "1000", "I2V_MAX_RUNNING": "1000"},
                   database=DB, redis_db=3, data_prefix="i2v-bench-load-").start()
    return app, app.base, app.token


def stop_app(app):
    app.stop()


def generate_burst(base, token):
    image = png_bytes()
    requests = [None] * 50 + [f"bench-key-{i}" for i in range(25)] * 2
    random.Random(1).shuffle(requests)
    barrier = threading.Barrier(len(requests))

    def one(i_key):
        i, key = i_key
        headers = {"Authorization": f"Bearer {token}"}
        if key:
            headers["Idempotency-Key"] = key
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            t0 = time.perf_counter()
            resp = http.post(f"{base}/api/generate-video", headers=headers,
                             # The two copies of a key are the same request (another body would be a 409).
                             data={"prompt": f"bench {key or i}", "workflow": "smoke"},
                             files={"image": ("in.png", io.BytesIO(image), "image/png")})
            return key, resp.status_code, resp.json().get("id"), time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(one, enumerate(requests)))
    wall = time.perf_counter() - t0
    return results, wall


def _client_proc(args):
    base, token, paths, seconds, threads, start_at = args
    lat, errors = [], 0
    lock = threading.Lock()

    def loop():
        nonlocal errors
        mine, bad = [], 0
        rnd = random.Random()
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
            while time.time() < start_at:
                time.sleep(0.001)
            end = start_at + seconds
            while time.time() < end:
                t0 = time.perf_counter()
                resp = http.get(base + rnd.choice(paths))
                mine.append(time.perf_counter() - t0)
                bad += resp.status_code != 200
        with lock:
            lat.extend(mine)
            errors += bad

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat, errors


def _wrk_ms(text):
    """wrk prints latencies as 812.00us, 26.74ms or 1.10s."""
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(f"not a wrk latency: {text!r}")


def measure_wrk(base, token, paths, seconds, clients=50):
    """The same load from wrk (C, 2 threads, `clients` keep-alive connections): it needs a
    fraction of the CPU the Python clients take, which on a 2-core machine goes to the server."""
    import re
    import shutil

    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    quoted = ", ".join(f'"{p}"' for p in paths)
    script.write(f'local paths = {{{quoted}}}\n'
                 f'wrk.headers["Authorization"] = "Bearer {token}"\n'
                 'request = function() return wrk.format("GET", paths[math.random(#paths)]) end\n')
    script.close()
    out = subprocess.run([shutil.which("wrk"), "-t2", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency",
                          "-s", script.name, base + "/"], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    n = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"n": n, "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
            "p50": _wrk_ms(re.search(r"^\s+50%\s+(\S+)$", out, re.M).group(1)),
            "p99": _wrk_ms(re.search(r"^\s+99%\s+(\S+)$", out, re.M).group(1)),
            "rps": float(re.search(r"Requests/sec:\s+(\S+)", out).group(1))}


def measure(base, token, paths, seconds, clients=50, procs=10):
    """`clients` concurrent keep-alive clients (spread over `procs` processes so the client's GIL
    is not the bottleneck), each requesting as fast as answers come for `seconds`."""
    start_at = time.time() + 1.0
    with get_context("fork").Pool(procs) as pool:
        parts = pool.map(_client_proc, [(base, token, paths, seconds, clients // procs, start_at)] * procs)
    lat = sorted(x for part, _ in parts for x in part)
    errors = sum(e for _, e in parts)
    q = statistics.quantiles(lat, n=100)
    return {"n": len(lat), "errors": errors, "p50": q[49] * 1000, "p99": q[98] * 1000, "rps": len(lat) / seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each latency phase")
    parser.add_argument("--web-concurrency", type=int, default=2, help="gunicorn workers (runall's default: 2)")
    parser.add_argument("--web-threads", type=int, default=4, help="threads per gunicorn worker (runall's default: 4)")
    parser.add_argument("--client", choices=("wrk", "python"), default=None,
                        help="load generator for the latency phase: wrk (default when installed) or Python/httpx")
    args = parser.parse_args()
    import shutil

    client = args.client or ("wrk" if shutil.which("wrk") else "python")
    run = measure_wrk if client == "wrk" else measure

    with ComfyUIDouble(run_seconds=0.05) as comfy:
        proc, base, token = start_app(args.web_concurrency, args.web_threads)
        try:
            auth = {"Authorization": f"Bearer {token}"}
            resp = httpx.post(f"{base}/api/gpu/config", headers=auth,
                              json={"comfyui_url": comfy.url, "gpu_provider": "local"})
            assert resp.status_code == 200, resp.text
            print(f"app: {base} (gunicorn ×{args.web_concurrency} workers × {args.web_threads} threads + qcluster ×4) "
                  f"on PostgreSQL {DB} + Redis; ComfyUI double at {comfy.url}")

            # 1. The burst.
            results, wall = generate_burst(base, token)
            codes = {}
            for _, code, _, _ in results:
                codes[code] = codes.get(code, 0) + 1
            ids = {job_id for _, _, job_id, _ in results if job_id}
            by_key = {}
            for key, code, job_id, _ in results:
                if key:
                    by_key.setdefault(key, set()).add(job_id)
            lat = sorted(x for *_, x in results)
            print(f"\n[burst] 100 concurrent POST /api/generate-video (50 unique + 25 keys × 2) in {wall:.2f} s")
            print(f"  answers          : {dict(sorted(codes.items()))}   (expected 202×75, 200×25)")
            print(f"  latency          : p50 {statistics.median(lat) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")
            print(f"  distinct jobs    : {len(ids)} (expected 75); keys giving one job each: "
                  f"{sum(len(v) == 1 for v in by_key.values())}/25")
            t0 = time.perf_counter()
            end = time.monotonic() + 300
            while time.monotonic() < end:
                listing = httpx.get(f"{base}/api/jobs?limit=100", headers=auth).json()
                if listing["count"] >= len(ids) and all(j["status"] in ("completed", "failed", "cancelled")
                                                         for j in listing["items"]):
                    break
                time.sleep(0.5)
            statuses = {}
            for job in listing["items"]:
                statuses[job["status"]] = statuses.get(job["status"], 0) + 1
            print(f"  jobs in the API  : {listing['count']} {statuses} after {time.perf_counter() - t0:.1f} s more")
            print(f"  POST /prompt     : {sum(comfy.prompt_posts.values())} in all, "
                  f"max {max(comfy.prompt_posts.values(), default=0)} per prompt")
            ok = (listing["count"] == 75 == len(ids) and statuses == {"completed": 75}
                  and sum(comfy.prompt_posts.values()) == 75 and all(len(v) == 1 for v in by_key.values()))
            print(f"  → {'OK' if ok else 'NOT OK'}: exactly 75 jobs, none lost or duplicated, all completed")

            # 2. Latency side by side, same server, same run (warm-up first, then jobs, then ping).
            paths = [f"/api/jobs/{i}" for i in sorted(ids)]
            run(base, token, paths + ["/api/ping"], 2)
            jobs = run(base, token, paths, args.seconds)
            ping = run(base, token, ["/api/ping"], args.seconds)
            print(f"\n[latency] 50 concurrent keep-alive clients ({client}), {args.seconds:.0f} s each")
            for name, r in (("GET /api/jobs/{id}", jobs), ("GET /api/ping", ping)):
                print(f"  {name:<18}: p50 {r['p50']:6.1f} ms   p99 {r['p99']:6.1f} ms   {r['rps']:7.0f} req/s   "
                      f"({r['n']} requests, {r['errors']} non-200)")
            ratio = jobs["rps"] / ping["rps"]
            print(f"  throughput ratio jobs/ping: {ratio:.2f}   "
                  f"goal p99 ≤ 50 ms: {'met' if jobs['p99'] <= 50 else 'NOT met'}; "
                  f"goal ratio ≥ 0.7: {'met' if ratio >= 0.7 else 'NOT met'}")
        finally:
            stop_app(proc)


if __name__ == "__main__":
    main()
