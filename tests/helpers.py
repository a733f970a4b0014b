import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(width=64, height=48, color=(200, 80, 40), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


class StaticServer:
    """A tiny real HTTP server on 127.0.0.1 serving fixed routes: {path: (status, headers, body)}.
    `headers_seen`: the headers of every request, in order."""

    def __init__(self, routes):
        self.routes = routes
        self.headers_seen = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.headers_seen.append(self.headers)
                status, headers, body = outer.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def configured_comfyui(**double_kwargs):
    """A ComfyUI double, configured as the GPU (provider local) while the block runs."""
    from gpu.models import GpuConfig
    from tests.doubles.comfyui import ComfyUIDouble

    with ComfyUIDouble(**double_kwargs) as double:
        config = GpuConfig.get()
        config.comfyui_url = double.url
        config.gpu_provider = "local"
        config.save()
        yield double


@contextlib.contextmanager
def qcluster(**extra_env):
    """A real django-q2 worker (manage.py qcluster) on the test database and broker, with `extra_env`
    (e.g. VASTAI_API_URL pointing at a double); stopped with SIGTERM, killed if it lingers."""
    from django.conf import settings
    from django.db import connection

    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "i2v.settings_test",
        "I2V_DATA_DIR": str(settings.DATA_DIR),
        "I2V_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "I2V_Q_NAME": settings.Q_CLUSTER["name"],
        **{key: str(value) for key, value in extra_env.items()},
    })
    proc = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=Path(__file__).resolve().parents[1], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
