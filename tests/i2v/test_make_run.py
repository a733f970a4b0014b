"""`make run`'s steps on a fresh data dir: first-start credentials, gunicorn + qcluster, Ctrl-C."""

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_until_serving(url, proc, deadline=60):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"runall exited early with {proc.returncode}")
        try:
            return httpx.get(url, timeout=1)
        except httpx.HTTPError:
            time.sleep(0.2)  # polling for the server to come up, not timing a result
    raise AssertionError("server did not come up")


def readme_python_example() -> str:
    """The README's httpx example, verbatim."""
    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("## API"):]
    return api[api.index("```python\n") + len("```python\n"):api.index("```", api.index("```python\n") + 10)]


def run_readme_python_example(base, token, folder):
    """Point the server at a ComfyUI double, then run the README's example as a user would (their
    image in the current folder, their token in TOKEN, the server on its default address)."""
    from tests.doubles.comfyui import ComfyUIDouble
    from tests.helpers import png_bytes

    example = readme_python_example().replace("http://127.0.0.1:8000", base)
    (folder / "dragon.png").write_bytes(png_bytes(832, 480))
    with ComfyUIDouble(run_seconds=0.5) as comfy:
        set_gpu = httpx.post(f"{base}/api/gpu/config", headers={"Authorization": f"Bearer {token}"},
                             json={"comfyui_url": comfy.url, "gpu_provider": "local"})
        assert set_gpu.status_code == 200, set_gpu.text
        done = subprocess.run([sys.executable, "-c", f"TOKEN = {token!r}\n{example}"], cwd=folder,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "saved clip.mp4"
        assert (folder / "clip.mp4").read_bytes() == comfy.output_bytes(*_only_output(comfy))


def _only_output(comfy):
    [item] = httpx.get(f"{comfy.url}/history").json().values()
    [entry] = [e for node in item["outputs"].values() for e in node.get("images", [])]
    return entry["filename"], entry["subfolder"]


@pytest.mark.slow_start
def test_make_run_steps_serve_web_and_worker_and_stop_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "R2_BUCKET")}
    port = free_port()
    env.update({"DJANGO_SETTINGS_MODULE": "i2v.settings", "I2V_DATA_DIR": str(tmp_path), "PORT": str(port),
                "HOST": "127.0.0.1", "I2V_Q_NAME": f"i2v-run-{port}"})
    py = sys.executable
    for step in (["migrate", "--noinput"], ["collectstatic", "--noinput", "-v", "0"]):
        subprocess.run([py, "manage.py", *step], cwd=ROOT, env=env, check=True, capture_output=True)
    first = subprocess.run([py, "manage.py", "bootstrap"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "admin password:" in first.stdout
    token = first.stdout.split("API token:")[1].split()[0]
    again = subprocess.run([py, "manage.py", "bootstrap"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert again.stdout.strip() == "", "credentials are printed once, on the first start only"

    proc = subprocess.Popen([py, "manage.py", "runall"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/api/ping", proc)
        home = httpx.get(f"{base}/")
        assert home.status_code == 302 and home.headers["location"].startswith("/accounts/login/")
        assert httpx.get(f"{base}/admin/").status_code == 302
        docs = httpx.get(f"{base}/api/docs")
        assert docs.status_code == 200 and "i2v API" in httpx.get(f"{base}/api/openapi.json").text
        # Swagger UI comes from i2v itself, so the docs work offline and behind firewalls.
        assets = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', docs.text)
        assert any("swagger-ui-bundle" in a for a in assets), docs.text
        for asset in assets:
            assert asset.startswith("/"), asset
            assert httpx.get(f"{base}{asset}").status_code == 200, asset
        css = httpx.get(f"{base}/static/css/i2v.css")  # served in front of Django (i2v/static.py)
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.headers["x-content-type-options"] == "nosniff"
        assert httpx.get(f"{base}/api/gpu/config").status_code == 401
        ok = httpx.get(f"{base}/api/gpu/config", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json()["gpu_provider"] == "none"
        run_readme_python_example(base, token, tmp_path)
        # The worker is up too: its cluster announces itself in the output.
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "Booting worker" in out or "Listening at" in out
    assert "Q Cluster" in out or "qcluster" in out.lower()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/api/ping", timeout=2)


@contextlib.contextmanager
def runall_on_a_new_postgresql_database(tmp_path, **settings):
    """`make run`'s steps and server on a PostgreSQL database of its own; yields (base URL, headers)."""
    import psycopg

    port = free_port()
    name = f"i2v_run_{port}"
    admin_url = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "R2_BUCKET")}
    env.update({"DJANGO_SETTINGS_MODULE": "i2v.settings", "I2V_DATA_DIR": str(tmp_path), "PORT": str(port),
                "HOST": "127.0.0.1", "I2V_Q_NAME": f"i2v-run-{port}", "DATABASE_URL": admin_url.rsplit("/", 1)[0] + f"/{name}",
                "I2V_RATE_GENERATE": "100000/m", "I2V_MAX_WAITING": "1000", **settings})
    py = sys.executable
    proc = None
    try:
        for step in (["migrate", "--noinput"], ["collectstatic", "--noinput", "-v", "0"]):
            subprocess.run([py, "manage.py", *step], cwd=ROOT, env=env, check=True, capture_output=True)
        first = subprocess.run([py, "manage.py", "bootstrap"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        headers = {"Authorization": f"Bearer {first.stdout.split('API token:')[1].split()[0]}"}
        proc = subprocess.Popen([py, "manage.py", "runall"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{base}/api/ping", proc)
        yield base, headers
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


ON_POSTGRESQL = pytest.mark.skipif(not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="PostgreSQL only")


@pytest.mark.slow_start
@ON_POSTGRESQL
def test_a_burst_of_requests_on_postgresql_waits_for_connections_instead_of_failing(tmp_path):
    """`make run`'s web server on PostgreSQL: 100 generate requests at once each run in a thread
    of their own; without a connection pool each opened a connection, past PostgreSQL's
    max_connections, and some answered 500."""
    from tests.helpers import png_bytes

    with runall_on_a_new_postgresql_database(tmp_path) as (base, headers):
        image = png_bytes()
        barrier = threading.Barrier(100)

        def one(i):
            with httpx.Client(timeout=90) as http:
                barrier.wait()
                return http.post(f"{base}/api/generate-video", headers=headers, data={"prompt": f"burst {i}"},
                                 files={"image": ("in.png", image, "image/png")}).status_code

        with ThreadPoolExecutor(100) as pool:
            answers = collections.Counter(pool.map(one, range(100)))
        assert answers == {202: 100}


@pytest.mark.slow_start
@ON_POSTGRESQL
def test_scripts_waiting_on_postgresql_hold_no_database_connection(tmp_path):
    """Five scripts wait on a job with ?wait= on a web process whose pool has two connections: a
    sixth request is still answered while they wait (a waiting request gives its connection back)."""
    from tests.helpers import png_bytes

    # The user may run no job at once: the job waits in the queue, unchanged, for the whole test.
    with runall_on_a_new_postgresql_database(tmp_path, WEB_CONCURRENCY="1", I2V_DB_POOL_SIZE="2",
                                             I2V_MAX_RUNNING="0") as (base, headers):
        gpu = httpx.post(f"{base}/api/gpu/config", headers=headers, timeout=30,
                         json={"comfyui_url": "http://127.0.0.1:9", "gpu_provider": "local"})
        assert gpu.status_code == 200, gpu.text
        job = httpx.post(f"{base}/api/generate-video", headers=headers, data={"prompt": "waited on"},
                         files={"image": ("in.png", png_bytes(), "image/png")}, timeout=30).json()
        assert job["status"] == "queued", job

        def wait_on(i):
            with httpx.Client(timeout=90) as http:
                return http.get(f"{base}/api/jobs/{job['id']}", headers=headers, params={"wait": 30}).status_code

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(wait_on, i) for i in range(5)]
            waiting = 0
            while waiting < 5 and not any(f.done() for f in futures):
                threading.Event().wait(0.05)  # until all five wait (polling for a state, not timing)
                waiting = httpx.get(f"{base}/api/ping", timeout=30).json().get("waiting", 0)
            assert waiting == 5, [f.result() for f in futures if f.done()]
            other = httpx.get(f"{base}/api/jobs/{job['id']}", headers=headers, timeout=60)
            assert other.status_code == 200 and other.json()["status"] == "queued"
            assert not any(f.done() for f in futures)  # answered while all five still wait
        assert [f.result() for f in futures] == [200] * 5


