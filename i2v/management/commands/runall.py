import os
import signal
import subprocess
import sys
import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Run the web server (gunicorn) and the django-q2 worker together until Ctrl-C."

    def handle(self, **options):
        host = os.environ.get("HOST", "127.0.0.1")
        port = os.environ.get("PORT", "8000")
        workers = os.environ.get("WEB_CONCURRENCY", "2")
        # ASGI (uvicorn) workers under gunicorn: requests that wait for a job (?wait=N, Prefer: wait)
        # are coroutines that hold no thread; every other view runs in a thread of its own request.
        web = [
            sys.executable, "-m", "gunicorn", "i2v.asgi:application", "-k", "uvicorn_worker.UvicornWorker",
            "--bind", f"{host}:{port}", "--workers", workers,
            "--timeout", "120", "--graceful-timeout", "10", "--access-logfile", "-",
        ]
        worker = [sys.executable, "manage.py", "qcluster"]
        self.stdout.write(f"i2v: serving on http://{host}:{port} (web + worker); Ctrl-C stops both.")
        # The web server's database connections come from a pool per process (i2v/settings.py).
        procs = [subprocess.Popen(web, env={**os.environ, "I2V_DB_POOL": "1"}), subprocess.Popen(worker)]
        stopping = False

        def stop(signum=None, frame=None):
            nonlocal stopping
            if stopping:
                return
            stopping = True
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                if any(proc.poll() is not None for proc in procs):
                    stop()
                    break
                time.sleep(0.5)
        finally:
            deadline = time.monotonic() + 20
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
        code = max(abs(proc.returncode or 0) for proc in procs)
        sys.exit(0 if stopping and code in (0, signal.SIGTERM, 15) else code)
