import contextlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(width=64, height=48, color=(200, 80, 40), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


class StaticServer:
    """A tiny real HTTP server on 127.0.0.1 serving fixed routes: {path: (status, headers, body)}."""

    def __init__(self, routes):
        self.routes = routes
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
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
