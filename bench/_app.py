"""The app as `make run` starts it (gunicorn with ASGI workers + qcluster via `manage.py runall`),
on a database of its own, for the benchmarks that drive it over HTTP."""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG = "postgres://postgres@127.0.0.1:5432"


def throwaway_data_dir(prefix: str) -> str:
    """A data folder (videos, SQLite file) for one benchmark run, removed when the run ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*cmd, env=None):
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)


class App:
    """Migrated, bootstrapped (`token`), then started by start(); `base` is its URL.
    `database`: a PostgreSQL database name (dropped and created afresh) or None for SQLite;
    `env`: further settings."""

    def __init__(self, env: dict, database: str | None = None, redis_db: int | None = None, data_prefix="i2v-bench-"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "R2_BUCKET")}
        self.env.update({"DJANGO_SETTINGS_MODULE": "i2v.settings", "HOST": "127.0.0.1", "PORT": str(self.port),
                         "I2V_Q_NAME": f"i2v-bench-{self.port}", "I2V_DATA_DIR": throwaway_data_dir(data_prefix)})
        if database:
            sh("dropdb", "--if-exists", "--force", "-h", "127.0.0.1", "-U", "postgres", database)
            sh("createdb", "-h", "127.0.0.1", "-U", "postgres", database)
            self.env["DATABASE_URL"] = f"{PG}/{database}"
        if redis_db is not None:
            self.env["REDIS_URL"] = f"redis://127.0.0.1:6379/{redis_db}"  # not 0: the test suite flushes that one
        self.env.update(env)
        self.manage("migrate", "--noinput")
        self.manage("collectstatic", "--noinput", "-v", "0")
        self.token = self.manage("bootstrap").stdout.split("API token:")[1].split()[0]
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.proc = None

    def manage(self, *args, env=None):
        return sh(sys.executable, "manage.py", *args, env={**self.env, **(env or {})})

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "manage.py", "runall"], cwd=ROOT, env=self.env,
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/api/ping", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                self.stop()
                raise SystemExit("the app did not come up")
            time.sleep(0.2)  # waiting for the server to start, not timing anything

    def stop(self):
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
