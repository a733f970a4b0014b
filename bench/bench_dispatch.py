"""Per-job overhead of i2v over ComfyUI's own execution, side by side with a raw client (the floor).

    .venv/bin/python bench/bench_dispatch.py               # 20 in a row and 10 at once, each setup
    .venv/bin/python bench/bench_dispatch.py --jobs 5      # a quick run
    .venv/bin/python bench/bench_dispatch.py --rtt 20      # the GPUs 20 ms away (a round trip)

The ComfyUI doubles run every prompt for a fixed `--run` seconds, one at a time each, as ComfyUI
does. Overhead of a job = the time from the client's `POST /api/generate-video` to the client
seeing it completed, minus ComfyUI's own execution (its history's execution_start →
execution_success). "In a row" sends one job after another (setup by setup in blocks of 5, the
blocks in turn); "at once" sends `--concurrent` jobs
together to as many GPUs (the configured URL plus ComfyUI servers added in the admin; the raw
client sends job i to GPU i), so that what is measured is dispatch, not the jobs queueing for one
GPU. Setups, all in one run:

- i2v on SQLite + the ORM broker (`make run`'s defaults), the client waiting with
  `GET /api/jobs/{id}?wait=60`;
- i2v on PostgreSQL + Redis, the same;
- i2v on PostgreSQL + Redis, one `POST` with `Prefer: wait=60`;
- the floor: a client talking to the same double directly: POST /upload/image, POST /prompt,
  websocket until the run ends, GET /view.

Then, setup by setup, the whole machine's CPU time per job (/proc/stat): on this two-core machine
the jobs at once share it with the web server, the workers, PostgreSQL, Redis and the doubles.
Last, the least any dispatcher built from these parts (a Django API, a django-q2 queue, a database)
must add to the floor, each part timed alone (parts()), in a row and for as many clients at once
as the jobs at once (on PostgreSQL + Redis, and at once also on SQLite + the ORM broker): what
"≤ 2 × the floor" and the at-once goals leave room for.

Goal: median ≤ 100 ms on SQLite, ≤ 50 ms on PostgreSQL + Redis, and ≤ 2 × the floor.
Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379, as `.ci/run` starts
them; the database `i2v_bench_dispatch` is dropped and created afresh.
"""

import argparse
import contextlib
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _app  # noqa: E402  (bench/, beside this file)
from _latency import DelayProxy  # noqa: E402
from tests.doubles.comfyui import ComfyUIDouble  # noqa: E402
from tests.helpers import png_bytes  # noqa: E402

DB = "i2v_bench_dispatch"
IMAGE = png_bytes()
# One TLS context for every client here (all talk plain HTTP): httpx.Client() builds one of its own
# otherwise, loading the CA bundle, 22 ms of CPU on this machine. At once, ten jobs' clients made
# together took that CPU from the jobs already under way, the floor's as much as i2v's.
TLS = ssl.create_default_context()


def execution_seconds(comfy_urls, prompt_id) -> float:
    """ComfyUI's own execution of the prompt, from the history of whichever GPU ran it."""
    for url in comfy_urls:
        item = httpx.get(f"{url}/history/{prompt_id}", timeout=10, verify=TLS).json().get(prompt_id)
        if item is not None:
            break
    else:
        raise AssertionError(f"no GPU ran prompt {prompt_id}")
    stamps = {name: data.get("timestamp") for name, data in item["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


CHAINED = "floor + every part, in turn per client"  # parts() at once: the parts chained
WORKERS = 12  # django-q2 worker processes per app: room for the jobs at once, and each job's slice
BLOCK = 5  # jobs in a row of one setup before the next setup's


class App(_app.App):
    """`make run`'s stack on SQLite + the ORM broker, or on PostgreSQL + Redis, with the ComfyUI
    doubles as its GPUs: the first the configured URL, the others ComfyUI servers."""

    def __init__(self, comfy_urls, postgres_redis: bool):
        super().__init__({"I2V_WORKERS": str(WORKERS), "WEB_CONCURRENCY": "2", "I2V_MAX_WAITING": "1000",
                          "I2V_MAX_RUNNING": "1000", "I2V_RATE_GENERATE": "100000/m", "I2V_LOG_LEVEL": "WARNING"},
                         database=DB if postgres_redis else None, redis_db=4 if postgres_redis else None,
                         data_prefix="i2v-disp-")
        self.comfy_urls = comfy_urls
        # The other GPUs, as an operator adds them in the admin (ComfyUI servers).
        self.manage("shell", "-c", "import os; from gpu.models import ComfyUIServer; "
                    "[ComfyUIServer.objects.create(name=f'gpu{n}', url=url) for n, url in "
                    "enumerate(os.environ['BENCH_GPUS'].split(), 1)]", env={"BENCH_GPUS": " ".join(comfy_urls[1:])})
        self.start()
        try:
            resp = httpx.post(f"{self.base}/api/gpu/config", headers=self.headers, timeout=30,
                              json={"comfyui_url": comfy_urls[0], "gpu_provider": "local"})
            assert resp.status_code == 200, resp.text
        except BaseException:
            self.stop()
            raise

    def job(self, prefer=False):
        """One job through the API; a function giving its overhead in seconds (overhead())."""
        with httpx.Client(base_url=f"{self.base}/api", headers=self.headers, timeout=90, verify=TLS) as api:
            headers = {"Prefer": "wait=60"} if prefer else {}
            t0 = time.perf_counter()
            resp = api.post("/generate-video", headers=headers, data={"prompt": "bench", "workflow": "smoke"},
                            files={"image": ("in.png", IMAGE, "image/png")})
            body = resp.json()
            while body["status"] not in ("completed", "failed", "cancelled"):
                body = api.get(f"/jobs/{body['id']}", params={"wait": 60}).json()
            took = time.perf_counter() - t0
        assert body["status"] == "completed", body
        return overhead(took, self.comfy_urls, body["prompt_id"])


def overhead(took: float, comfy_urls, prompt_id):
    """A job's overhead in seconds, as a function: it asks the GPUs' history for ComfyUI's own
    execution, a request to each GPU until one knows the prompt. Called once the jobs measured
    together are done: asked at once, jobs that finished first (up to ten new connections each,
    for i2v's jobs) took the CPU of those still running."""
    return lambda: took - execution_seconds(comfy_urls, prompt_id)


def raw_job(comfy_url):
    """The floor: what any client of ComfyUI must do for one clip; its overhead as overhead()."""
    client_id = uuid.uuid4().hex
    ws_url = comfy_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    graph = json.loads((ROOT / "generation/workflows/smoke.json").read_text())
    with httpx.Client(base_url=comfy_url, timeout=30, verify=TLS) as http, ws_connect(ws_url) as ws:
        t0 = time.perf_counter()
        name = http.post("/upload/image", files={"image": (f"{client_id}.png", IMAGE, "image/png")},
                         data={"overwrite": "true"}).json()["name"]
        prompt = json.loads(json.dumps(graph["graph"]))
        for node, field in graph["bindings"]["image"]:
            prompt[node]["inputs"][field] = name
        prompt_id = http.post("/prompt", json={"prompt": prompt, "client_id": client_id}).json()["prompt_id"]
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            data = event.get("data") or {}
            if data.get("prompt_id") == prompt_id and event["type"] in ("execution_success", "execution_error"):
                break
            if event["type"] == "executing" and data.get("prompt_id") == prompt_id and data.get("node") is None:
                break
        outputs = http.get(f"/history/{prompt_id}").json()[prompt_id]["outputs"]
        files = [f for out in outputs.values() for key in ("images", "gifs", "videos") for f in out.get(key, [])]
        with http.stream("GET", "/view", params={"filename": files[0]["filename"], "subfolder": files[0]["subfolder"],
                                                  "type": files[0]["type"]}) as view:
            for _ in view.iter_bytes():
                pass
        took = time.perf_counter() - t0
    return overhead(took, [comfy_url], prompt_id)


def machine_busy_seconds() -> float:
    """CPU time every process on this machine has used so far (Linux /proc/stat: user, nice,
    system, irq and softirq; not idle, iowait or steal)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_per_job(one, jobs: int) -> float:
    """The machine's CPU time per job, in ms, over `jobs` jobs in a row: i2v's web server, workers,
    PostgreSQL, Redis, the ComfyUI double and this client together (ComfyUI's own run is a sleep)."""
    before = machine_busy_seconds()
    for _ in range(jobs):
        one(0)()
    return 1000 * (machine_busy_seconds() - before) / jobs


def figures(overheads):
    """(median, p90) in ms."""
    ms = sorted(1000 * o for o in overheads)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]


def parts(app, comfy_urls, rounds: int, concurrent: int = 1) -> dict:
    """What any dispatcher built from this stack's parts must add to the floor, each measured
    alone against a running app (PostgreSQL + Redis, or SQLite + the ORM broker through
    parts_elsewhere()), interleaved with the floor; with
    `concurrent`, each part for that many clients at once (client i on GPU i), as the jobs at once:

    - the client's one request carrying the image (answered 422 before any job work: the
      server, middlewares, token check and multipart parsing only; `Prefer: wait` needs no other);
    - the queue hop: django-q2 from `async_task` to an empty task done on the worker;
    - three committed one-row writes: the job's insert, the worker's lease (crash safety) and
      the result (the fewest with which a job survives a crash of either process), each client
      on a row of its own;
    - the websocket handshake the floor's client makes before its clock starts;
    - at once, also all of them in turn per client (CHAINED), the clients together: the least
      dispatcher's jobs end to end, one job's request meeting another's queue hop or writes.
    """
    os.environ.update(app.env)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.utils import timezone
    from django_q.models import Task

    from i2v.core.queue import async_task

    users = [get_user_model().objects.get_or_create(username=f"bench-writer-{i}")[0] for i in range(concurrent)]

    def request(api, i):
        t0 = time.perf_counter()
        resp = api.post("/generate-video", data={"workflow": "smoke"}, files={"image": ("in.png", IMAGE, "image/png")})
        assert resp.status_code == 422, resp.text
        return time.perf_counter() - t0

    def queue_hop(api, i):
        sent = timezone.now()
        task_id = async_task("math.floor", 1.5, q_options={"save": True})  # recorded, unlike the app's own
        while (task := Task.objects.filter(id=task_id).first()) is None:
            time.sleep(0.005)  # polling for the record; the figure is the worker's own start stamp
        return (task.stopped - sent).total_seconds()  # stamped by the worker

    def writes(api, i):
        t0 = time.perf_counter()
        for _ in range(3):
            type(users[i]).objects.filter(pk=users[i].pk).update(last_login=timezone.now())
        return time.perf_counter() - t0

    def handshake(api, i):
        t0 = time.perf_counter()
        with ws_connect(comfy_urls[i].replace("http://", "ws://") + f"/ws?clientId={uuid.uuid4().hex}"):
            return time.perf_counter() - t0

    def chained(api, i):
        # Every part in turn, as one job of the least dispatcher: at once, one client's request
        # meets another's queue hop or writes, as a real dispatcher's jobs would.
        spent = request(api, i) + queue_hop(api, i) + writes(api, i) + handshake(api, i)
        floor = raw_job(comfy_urls[i])
        return lambda: spent + floor()

    steps = {"floor": lambda api, i: raw_job(comfy_urls[i]), "request with the image": request, "queue hop": queue_hop,
             "3 writes": writes, "websocket handshake": handshake}
    if concurrent > 1:
        steps[CHAINED] = chained
    taken = {name: [] for name in steps}
    # The steps run on the pool's threads even one at a time: each keeps its database connection.
    # The server (gunicorn's keepalive) closes a connection idle for 2 s; httpx keeps one for 5 s.
    # A request sent on a connection the server is closing is lost ("Server disconnected"): the
    # client lets its connections go after 1 s, before the server does.
    limits = httpx.Limits(keepalive_expiry=1.0)
    with httpx.Client(base_url=f"{app.base}/api", headers=app.headers, timeout=30, verify=TLS, limits=limits) as api, \
            ThreadPoolExecutor(concurrent) as pool:
        for _ in range(rounds):
            for name, step in steps.items():
                done = list(pool.map(lambda i, step=step: step(api, i), range(concurrent)))
                taken[name] += [x() if callable(x) else x for x in done]  # the floor's overhead()
    return {name: statistics.median(xs) * 1000 for name, xs in taken.items()}


def parts_elsewhere(app, comfy_urls, rounds: int, concurrent: int) -> dict:
    """parts() against another app, in a process of its own (Django is set up once per process, on
    one database)."""
    spec = {"env": app.env, "base": app.base, "headers": app.headers, "urls": comfy_urls, "rounds": rounds,
            "concurrent": concurrent}
    out = subprocess.run([sys.executable, __file__, "--parts-of", json.dumps(spec)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env=app.env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parts_of(spec: str) -> None:
    spec = json.loads(spec)
    app = argparse.Namespace(env=spec["env"], base=spec["base"], headers=spec["headers"])
    print(json.dumps(parts(app, spec["urls"], spec["rounds"], spec["concurrent"])))


def print_parts(heading: str, found: dict, times: str) -> None:
    """parts()'s figures, each part on its line (the parts chained printed apart), and their sum."""
    print(heading)
    for name, ms in found.items():
        if name != CHAINED:
            print(f"{name:<40} {ms:8.1f} ms")
    total = found["floor"] + sum(ms for name, ms in found.items() if name not in ("floor", CHAINED))
    print(f"{'floor + every part':<40} {total:8.1f} ms = {total / found['floor']:.2f} {times}, "
          "before any scheduling, storing or answering")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--run", type=float, default=0.5, help="seconds ComfyUI executes each prompt")
    parser.add_argument("--rtt", type=float, default=0.0,
                        help="ms of a round trip to each GPU (a proxy delays each way by half; 0: none)")
    parser.add_argument("--parts-of", help=argparse.SUPPRESS)  # parts_elsewhere()'s process
    args = parser.parse_args()
    if args.parts_of:
        return _parts_of(args.parts_of)
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(ComfyUIDouble(run_seconds=args.run)).url for _ in range(args.concurrent)]
        if args.rtt:  # i2v and the floor alike reach each GPU through its proxy
            urls = [DelayProxy(int(url.rsplit(":", 1)[1]), args.rtt / 2000).url for url in urls]
        sqlite = App(urls, postgres_redis=False)
        stack.callback(sqlite.stop)
        pg = App(urls, postgres_redis=True)
        stack.callback(pg.stop)
        # Warm-up, so that what is measured is a running server's steady state. A web process's first
        # request imports code and opens connections. django-q2 hands tasks to its worker processes in
        # turn, and a worker's first job costs it ~1,100 more page faults (copy-on-write of the memory
        # it shares with the process it was forked from) and 6-9 ms more CPU than its later ones: a
        # once-per-process cost (a worker lives for 500 tasks, `recycle`), which would otherwise fall
        # on most of the jobs measured in a row. Every worker gets two jobs first.
        for app in (sqlite, pg):
            for _ in range(2 * WORKERS):
                app.job()
        setups = {  # one(i): one job, its overhead as overhead() gives it; job i of a batch at once may use GPU i
            "raw client (floor)": lambda i: raw_job(urls[i]),
            "i2v, SQLite + ORM broker": lambda i: sqlite.job(),
            "i2v, PostgreSQL + Redis": lambda i: pg.job(),
            "i2v, PostgreSQL + Redis, Prefer: wait": lambda i: pg.job(prefer=True),
        }
        # In blocks of BLOCK jobs, each setup's block in turn: every setup meets the machine in the
        # same state (the floor included), and within a block a setup's jobs are in a row: each
        # starts while its own last one's tail (the run time learnt, the lease released, the queue
        # looked at) is still running, as a script's next job would. Jobs interleaved one by one
        # started each i2v job during the other app's tail instead: two servers sharing two cores,
        # which no deployment runs.
        in_a_row = {name: [] for name in setups}
        for start in range(0, args.jobs, BLOCK):
            for name, one in setups.items():
                for _ in range(min(BLOCK, args.jobs - start)):
                    in_a_row[name].append(one(0)())
        at_once = {name: [] for name in setups}
        with ThreadPoolExecutor(args.concurrent) as pool:
            for _ in range(2):
                for name, one in setups.items():
                    at_once[name] += [job() for job in list(pool.map(one, range(args.concurrent)))]
        # What a job costs the machine's CPU, setup by setup (not interleaved: /proc/stat counts all).
        cpu = {name: cpu_per_job(one, max(5, args.jobs // 2)) for name, one in setups.items()}
        bound = parts(pg, urls, args.jobs)
        bound_at_once = parts(pg, urls, max(2, args.jobs // 5), args.concurrent)
        sqlite_at_once = parts_elsewhere(sqlite, urls, max(2, args.jobs // 5), args.concurrent)
    far = f", each GPU {args.rtt:g} ms away (a round trip)" if args.rtt else ""
    print(f"\nper-job overhead (end to end − ComfyUI's execution of {args.run} s), ms; {args.jobs} jobs in a row, "
          f"and {args.concurrent} at once on {args.concurrent} GPUs (twice){far}, each setup in turn:")
    print(f"{'setup':<40} {'in a row: median':>17} {'p90':>7} {'× floor':>8} {'at once: median':>16} {'p90':>7} "
          f"{'× floor':>8}")
    floor_row, floor_once = figures(in_a_row["raw client (floor)"]), figures(at_once["raw client (floor)"])
    for name in setups:
        (m1, p1), (m2, p2) = figures(in_a_row[name]), figures(at_once[name])
        print(f"{name:<40} {m1:17.1f} {p1:7.1f} {m1 / floor_row[0]:8.2f} {m2:16.1f} {p2:7.1f} {m2 / floor_once[0]:8.2f}")
    print(f"\nCPU time per job, the whole machine ({os.cpu_count()} cores: web server, workers, databases, the doubles "
          f"and this client), {max(5, args.jobs // 2)} jobs in a row per setup:")
    for name in setups:
        print(f"{name:<40} {cpu[name]:8.1f} ms   {cpu[name] / cpu['raw client (floor)']:5.2f} × floor")
    print_parts(f"\nThe least any dispatcher on these parts adds (medians of {args.jobs}, PostgreSQL + Redis, each part "
                "alone, interleaved with the floor):", bound, "× floor")
    print_parts(f"\nThe same with {args.concurrent} clients at once, each part at once (medians of "
                f"{max(2, args.jobs // 5)} rounds of {args.concurrent}):", bound_at_once, "× floor at once")
    print_parts(f"\nThe same on SQLite + the ORM broker (its writes, its queue), {args.concurrent} clients at once:",
                sqlite_at_once, "× floor at once")
    for where, found in (("PostgreSQL + Redis", bound_at_once), ("SQLite + the ORM broker", sqlite_at_once)):
        print(f"The parts in turn per client, {args.concurrent} clients together, {where}: {found[CHAINED]:.1f} ms "
              "(one job of the least dispatcher, its parts meeting other jobs' parts)")


if __name__ == "__main__":
    main()
