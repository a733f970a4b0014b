"""A ComfyUI test double: a real aiohttp HTTP + websocket server on 127.0.0.1.

It speaks ComfyUI's own HTTP and websocket protocol (ComfyUI 0.3.64's server.py, plus the
newer servers' canonical-UUID ``prompt_id`` rule): the same routes (also under
``/api``), JSON shapes, status codes, validation errors and websocket message order.
It serves a real ``/object_info`` capture (``tests/fixtures/comfyui_object_info.json``), except that model-file
combos list the configured ``models`` and ``LoadImage`` lists the uploaded inputs.

    with ComfyUIDouble(run_seconds=0.2) as comfy:
        client = ComfyUIClient(comfy.url)

The server runs in a background thread with its own asyncio loop; one worker
coroutine runs queued prompts one at a time in priority order. Outputs of
SaveVideo / SaveWEBM / SaveAnimatedWEBP / SaveAnimatedPNG / SaveImage are kept in
memory (``tests/fixtures/tiny.mp4``, a real 64x64 9-frame H.264 clip, unless
``output_size`` asks for bigger, generated content). Identical re-submits are
served from the cache, as on the real server.

Knobs (constructor keyword arguments and attributes; change them at any time from
the test thread):

- ``token``: when set, every HTTP request and the websocket upgrade need
  ``Authorization: Bearer <token>`` or ``?token=<token>``, else 401 (vast.ai's Caddy).
- ``placeholder``: answer everything like vast.ai's portal while ComfyUI starts:
  ``placeholder_status`` (502; 200 through a Cloudflare tunnel), header
  ``X-Portal-Placeholder: true`` and an HTML body.
- ``models``: ``{directory: [file names]}`` under ``models/`` (``unet``,
  ``diffusion_models``, ``loras``, ``text_encoders``, ``vae``, ...); defaults to the
  files listed in comfyui.md section 6. Drives ``/models/{folder}``, the loader
  combos of ``/object_info`` and the ``value_not_in_list`` validation.
- ``device_name``, ``vram_total``, ``vram_free``: what ``/system_stats`` reports.
- ``run_seconds``: wall time of one prompt, spread over its nodes and sampler
  steps (0 = instant). ``steps_delay``: seconds per sampler step instead.
- ``fail_node``: a node id or class_type whose execution raises;
  ``fail_message`` / ``fail_type`` fill the ``execution_error`` event.
- ``hold``: an object with ``is_set()`` (``threading.Event``); while it is not set
  the worker waits before each node and each sampler step (after the
  ``executing`` message), so a test can act mid-run. ``wait_held()`` blocks until
  the worker is waiting there. An interrupt releases a held run.
- ``drop_websocket_after``: abort every websocket after it has been sent N messages.
- ``ws_gate``: an object with ``is_set()`` (``threading.Event``); while it is not set, websocket
  upgrades are held unanswered (a slow handshake), the request recorded.
- ``output_size``: outputs become N bytes (the tiny mp4 followed by a
  deterministic pseudo-random pattern), generated while streaming, never held
  in memory whole.
- ``view_chunk_delay`` (seconds between 64 KiB chunks) and
  ``view_bytes_per_second``: slow ``/view`` downloads.
- ``hang_paths``: a set of path patterns (fnmatch, without the ``/api`` prefix,
  e.g. ``{"/system_stats", "/history/*"}``) that are never answered.
- ``fail_http(pattern, times=1, status=500, body=...)``: answer the next
  ``times`` matching requests with that status and body (``status=200,
  body="{garbage"`` gives invalid JSON).
- ``restart()``: lose queue, history, cache and temp files, drop every
  websocket; uploaded inputs and output files stay (they live on disk for real).

Observation: ``requests`` (every request: method, path, query, headers),
``prompt_posts`` (a Counter of ``POST /prompt`` per prompt_id), ``posted_with_socket``
(per prompt_id: whether its client_id's websocket was open when the prompt was posted),
``submitted`` (the JSON bodies), ``count(method, path)``, ``running_prompt_id``,
``pending_prompt_ids``, ``max_queued``, ``history_ids``, ``output_bytes()``, ``output_sha256()``,
``wait_for(predicate)``.
"""

import asyncio
import collections
import copy
import fnmatch
import hashlib
import heapq
import json
import mimetypes
import posixpath
import random
import re
import string
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

REPO_ROOT = Path(__file__).resolve().parents[2]
from tests.doubles.base import LoopServer, RecordedRequest, generated_bytes  # noqa: E402
TINY_MP4 = REPO_ROOT / "tests/fixtures/tiny.mp4"
# A capture of a real ComfyUI 0.3.64's GET /object_info.
DEFAULT_OBJECT_INFO = REPO_ROOT / "tests/fixtures/comfyui_object_info.json"

DEFAULT_MODELS = {
    "unet": [
        "Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf",
        "wan22EnhancedNSFWCameraPrompt_nsfwFASTMOVEV2Q8H.gguf",
    ],
    "diffusion_models": [
        "Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf",
        "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
    ],
    "loras": [
        "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
        "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
    ],
    "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "vae": ["wan_2.1_vae.safetensors"],
}

# GET /models, LIVE with ComfyUI-GGUF installed, and the directories behind each key.
FOLDER_DIRS = {
    "checkpoints": ["checkpoints"],
    "configs": ["configs"],
    "loras": ["loras"],
    "vae": ["vae"],
    "text_encoders": ["text_encoders", "clip"],
    "diffusion_models": ["unet", "diffusion_models"],
    "clip_vision": ["clip_vision"],
    "style_models": ["style_models"],
    "embeddings": ["embeddings"],
    "diffusers": ["diffusers"],
    "vae_approx": ["vae_approx"],
    "controlnet": ["controlnet", "t2i_adapter"],
    "gligen": ["gligen"],
    "upscale_models": ["upscale_models"],
    "custom_nodes": ["custom_nodes"],
    "hypernetworks": ["hypernetworks"],
    "photomaker": ["photomaker"],
    "classifiers": ["classifiers"],
    "model_patches": ["model_patches"],
    "audio_encoders": ["audio_encoders"],
    "unet_gguf": ["unet", "diffusion_models"],
    "clip_gguf": ["text_encoders", "clip"],
}
CORE_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

# (class_type, input) -> the folder keys whose files make up that combo.
MODEL_INPUTS = {
    ("UnetLoaderGGUF", "unet_name"): ["unet_gguf"],
    ("UnetLoaderGGUFAdvanced", "unet_name"): ["unet_gguf"],
    ("UNETLoader", "unet_name"): ["diffusion_models"],
    ("CLIPLoader", "clip_name"): ["text_encoders"],
    ("DualCLIPLoader", "clip_name1"): ["text_encoders"],
    ("DualCLIPLoader", "clip_name2"): ["text_encoders"],
    ("CLIPLoaderGGUF", "clip_name"): ["text_encoders", "clip_gguf"],
    ("DualCLIPLoaderGGUF", "clip_name1"): ["text_encoders", "clip_gguf"],
    ("DualCLIPLoaderGGUF", "clip_name2"): ["text_encoders", "clip_gguf"],
    ("VAELoader", "vae_name"): ["vae"],
    ("LoraLoader", "lora_name"): ["loras"],
    ("LoraLoaderModelOnly", "lora_name"): ["loras"],
    ("CheckpointLoaderSimple", "ckpt_name"): ["checkpoints"],
    ("CLIPVisionLoader", "clip_name"): ["clip_vision"],
}

SAVE_EXTENSIONS = {"SaveWEBM": "webm", "SaveAnimatedWEBP": "webp", "SaveAnimatedPNG": "png"}
SAMPLERS = {"KSampler", "KSamplerAdvanced"}
DIR_TYPES = ("output", "input", "temp")
MAXIMUM_HISTORY_SIZE = 10000
CHUNK = 64 * 1024
FORCED_OCTET = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}

for _type, _ext in (("video/mp4", ".mp4"), ("video/webm", ".webm"), ("image/webp", ".webp"), ("image/png", ".png")):
    mimetypes.add_type(_type, _ext)

_object_info_cache: dict[str, dict] = {}


def _load_object_info(path) -> dict:
    key = str(path)
    if key not in _object_info_cache:
        with open(path, encoding="utf-8") as f:
            _object_info_cache[key] = json.load(f)
    return _object_info_cache[key]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _full_type_name(klass) -> str:
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def _annotated(name: str):
    """ComfyUI's folder_paths.annotated_filepath: 'x.png [output]' -> ('x.png', 'output')."""
    for kind in DIR_TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def _norm_sub(subfolder: str):
    """Normalise a subfolder relative to a type directory; None if it escapes it."""
    if not subfolder:
        return ""
    if subfolder.startswith("/"):
        return None
    norm = posixpath.normpath(subfolder)
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


@dataclass
class _Blob:
    data: bytes | None = None
    size: int = 0
    mtime: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.data is not None:
            self.size = len(self.data)


@dataclass(order=True)
class _Item:
    number: float
    seq: int
    prompt_id: str = field(compare=False)
    prompt: dict = field(compare=False)
    extra_data: dict = field(compare=False)
    outputs: list = field(compare=False)

    def as_list(self):
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class _Interrupted(Exception):
    pass


class _NodeFailed(Exception):
    def __init__(self, message, exception_type):
        super().__init__(message)
        self.exception_type = exception_type


class ComfyUIDouble(LoopServer):
    name = "comfyui-double"

    def __init__(
        self,
        *,
        token=None,
        object_info_path=DEFAULT_OBJECT_INFO,
        models=None,
        inputs=None,
        path_prefix="",
        device_name="cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync",
        vram_total=34190458880,
        vram_free=33024262144,
        run_seconds=0.0,
        steps_delay=None,
        fail_node=None,
        fail_message="Simulated failure in the ComfyUI test double",
        fail_type="RuntimeError",
        hold=None,
        drop_websocket_after=None,
        ws_gate=None,
        output_size=None,
        view_chunk_delay=0.0,
        view_bytes_per_second=None,
        hang_paths=(),
        placeholder=False,
        placeholder_status=502,
        max_upload_size=100 * 1024 * 1024,
    ):
        self.token = token
        self.models = copy.deepcopy(DEFAULT_MODELS if models is None else models)
        self.path_prefix = path_prefix.rstrip("/")
        self.device_name = device_name
        self.vram_total = vram_total
        self.vram_free = vram_free
        self.run_seconds = run_seconds
        self.steps_delay = steps_delay
        self.emitted: list[dict] = []  # every websocket message sent, for tests to count
        self.fail_node = fail_node
        self.fail_message = fail_message
        self.fail_type = fail_type
        self.hold = hold
        self.drop_websocket_after = drop_websocket_after
        self.ws_gate = ws_gate
        self.output_size = output_size
        self.view_chunk_delay = view_chunk_delay
        self.view_bytes_per_second = view_bytes_per_second
        self.hang_paths = set(hang_paths)
        self.placeholder = placeholder
        self.placeholder_status = placeholder_status
        self.max_upload_size = max_upload_size

        self._object_info = _load_object_info(object_info_path)
        self._tiny = TINY_MP4.read_bytes()

        self._lock = threading.Lock()  # guards the observation lists and fail_http rules
        self.requests: list[RecordedRequest] = []
        self.view_bytes_sent = 0  # output bytes written to /view responses so far
        self.prompt_posts: collections.Counter = collections.Counter()
        self.posted_with_socket: dict[str, bool] = {}
        self.submitted: list[dict] = []
        self.max_queued = 0  # the most prompts it held at once (running + pending)
        self._fail_rules: list[dict] = []
        self._held = threading.Event()
        self._passes = 0

        # Server state, touched only on the server's loop.
        self._files: dict[tuple[str, str, str], _Blob] = {}
        for name, data in (inputs or {}).items():
            sub, base = posixpath.split(name)
            self._files[("input", sub, base)] = _Blob(data=data)
        self._reset_state()


    # ------------------------------------------------------------------ lifecycle

    @property
    def url_suffix(self):
        return self.path_prefix

    async def _astart(self):
        self._outbox = asyncio.Queue()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=self.max_upload_size, middlewares=[self._middleware])
        self._add_routes(app)
        await self._serve(app)
        self._work = asyncio.Event()
        self._worker_task = asyncio.ensure_future(self._worker())
        self._publisher_task = asyncio.ensure_future(self._publisher())

    async def _astop(self):
        self._stopping.set()
        for task in (self._worker_task, self._publisher_task):
            task.cancel()
        await asyncio.gather(self._worker_task, self._publisher_task, return_exceptions=True)
        for ws, request in list(self._socket_requests.items()):
            _abort(request)
        await self._runner.cleanup()

    def _reset_state(self):
        self._pending: list[_Item] = []
        self._running: _Item | None = None
        self._history: dict[str, dict] = {}
        self._number = 0
        self._seq = 0
        self._cache: dict[str, dict | None] = {}
        self._interrupt = False
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._socket_requests: dict[web.WebSocketResponse, web.Request] = {}
        self._sent_counts: dict[web.WebSocketResponse, int] = {}
        self._client_id = None
        self._last_node_id = None
        self._flags = {}
        for key in [k for k in self._files if k[0] == "temp"]:
            del self._files[key]

    # ------------------------------------------------------------------ test-facing helpers

    def restart(self):
        """Simulate a ComfyUI restart: queue, history and cache gone, sockets dropped."""

        async def do():
            self._worker_task.cancel()
            await asyncio.gather(self._worker_task, return_exceptions=True)
            requests = list(self._socket_requests.values())
            self._reset_state()
            while not self._outbox.empty():
                self._outbox.get_nowait()
            for request in requests:
                _abort(request)
            self._worker_task = asyncio.ensure_future(self._worker())

        self._call(do)

    def fail_http(self, pattern, *, times=1, status=500, body="500 Internal Server Error\n\nServer got itself in trouble", content_type="text/plain", method=None):
        """Answer the next `times` requests whose path (no /api prefix) matches `pattern` with status and body."""
        with self._lock:
            self._fail_rules.append(
                {"pattern": pattern, "times": times, "status": status, "body": body, "content_type": content_type, "method": method}
            )

    def release_hangs(self):
        """Let requests stuck on hang_paths finish (they answer 503)."""
        self.hang_paths = set()

    def _hangs(self, path):
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in list(self.hang_paths))

    def wait_for(self, predicate, timeout=5.0, interval=0.005):
        """Wait until predicate(self) is true (a condition, e.g. on running_prompt_id or history_ids)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("ComfyUIDouble.wait_for: condition not met")
            time.sleep(interval)

    def release_once(self):
        """Let a held run pass one hold point (a node or a sampler step), then hold again."""
        self._held.clear()
        self._passes += 1

    def wait_held(self, timeout=5.0) -> str:
        """Block until the worker waits on `hold`; returns the running prompt id."""
        if not self._held.wait(timeout):
            raise TimeoutError("the ComfyUI double never reached the hold point")
        return self.running_prompt_id

    def next_hold(self, timeout=5.0) -> str | None:
        """After release_once: block until the run waits at its next hold point (its prompt id is
        returned) or no run is left (None)."""
        self.wait_for(lambda c: c._held.is_set() or c.running_prompt_id is None, timeout)
        return self.running_prompt_id if self._held.is_set() else None

    @property
    def running_prompt_id(self):
        return self._call(lambda: self._running.prompt_id if self._running else None)

    @property
    def pending_prompt_ids(self):
        return self._call(lambda: [item.prompt_id for item in sorted(self._pending)])

    @property
    def history_ids(self):
        return self._call(lambda: list(self._history))

    def count(self, method, path) -> int:
        """How many requests hit `path` (fnmatch pattern, /api prefix ignored) with `method`."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and fnmatch.fnmatchcase(self._route_path(r.path), path))

    def add_input(self, name, data: bytes):
        """Put a file into input/ as if it had been uploaded ('sub/name.png' allowed)."""
        sub, base = posixpath.split(name)
        self._call(lambda: self._files.__setitem__(("input", sub, base), _Blob(data=data)))

    def output_files(self, type="output"):
        return self._call(lambda: sorted(posixpath.join(k[1], k[2]) for k in self._files if k[0] == type))

    def output_bytes(self, filename, subfolder="", type="output") -> bytes:
        blob = self._call(lambda: self._files[(type, subfolder, filename)])
        return b"".join(self._iter_blob(blob, 0, blob.size))

    def output_sha256(self, filename, subfolder="", type="output") -> str:
        blob = self._call(lambda: self._files[(type, subfolder, filename)])
        h = hashlib.sha256()
        for chunk in self._iter_blob(blob, 0, blob.size):
            h.update(chunk)
        return h.hexdigest()

    # ------------------------------------------------------------------ HTTP plumbing

    def _route_path(self, path: str) -> str:
        if self.path_prefix and path.startswith(self.path_prefix):
            path = path[len(self.path_prefix):] or "/"
        if path.startswith("/api/"):
            path = path[4:]
        return path

    def _add_routes(self, app):
        routes = [
            ("GET", "/ws", self._ws),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/features", self._features),
            ("GET", "/object_info", self._get_object_info),
            ("GET", "/object_info/{node_class}", self._get_object_info_node),
            ("GET", "/models", self._get_models),
            ("GET", "/models/{folder}", self._get_models_folder),
            ("POST", "/upload/image", self._upload_image),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_prompt),
            ("POST", "/history", self._post_history),
            ("GET", "/view", self._view),
        ]
        for prefix in (self.path_prefix + "/api", self.path_prefix):
            for method, path, handler in routes:
                app.router.add_route(method, prefix + path, handler)

    @web.middleware
    async def _middleware(self, request, handler):
        headers = CIMultiDict(request.headers)
        with self._lock:
            self.requests.append(RecordedRequest(request.method, request.path, dict(request.rel_url.query), headers))
        path = self._route_path(request.path)

        # Caddy checks the token before it proxies, so a starting instance still wants it.
        token = self.token
        if token:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {token}" and request.rel_url.query.get("token") != token:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="restricted"'})

        if self.placeholder:
            html = "<!DOCTYPE html><html><head><title>Loading...</title></head><body><h1>Instance is starting</h1><p>This service is not ready yet. Please wait.</p></body></html>"
            return web.Response(status=self.placeholder_status, text=html, content_type="text/html", headers={"X-Portal-Placeholder": "true"})

        if self._hangs(path):
            # Never answered: polls so that release_hangs() (or a test emptying hang_paths) lets it go.
            while self._hangs(path) and not self._stopping.is_set():
                await asyncio.sleep(0.02)
            return web.Response(status=503)

        rule = self._take_fail_rule(path, request.method)
        if rule is not None:
            return web.Response(status=rule["status"], body=rule["body"].encode() if isinstance(rule["body"], str) else rule["body"], content_type=rule["content_type"])

        return await handler(request)

    # ------------------------------------------------------------------ simple endpoints

    def _queue_info(self):
        return {"exec_info": {"queue_remaining": len(self._pending) + (1 if self._running else 0)}}

    async def _system_stats(self, request):
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 67108864000,
                    "ram_free": 60129542144,
                    "comfyui_version": "0.3.64",
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": "3.12.3 (main, Aug 14 2025, 17:47:21) [GCC 13.3.0]",
                    "pytorch_version": "2.8.0+cu128",
                    "embedded_python": False,
                    "argv": ["main.py", "--disable-auto-launch", "--enable-cors-header", "--port", "18188"],
                },
                "devices": [
                    {
                        "name": self.device_name,
                        "type": self.device_name.split(":", 1)[0] if ":" in self.device_name else "cpu",
                        "index": 0 if self.device_name.startswith("cuda") else None,
                        "vram_total": self.vram_total,
                        "vram_free": self.vram_free,
                        "torch_vram_total": self.vram_total,
                        "torch_vram_free": self.vram_free,
                    }
                ],
            }
        )

    async def _features(self, request):
        return web.json_response({"supports_preview_metadata": True, "max_upload_size": self.max_upload_size})

    def _folder_files(self, key) -> list[str]:
        extensions = {".gguf"} if key in ("unet_gguf", "clip_gguf") else CORE_EXTENSIONS
        names = set()
        for directory in FOLDER_DIRS.get(key, []):
            for name in self.models.get(directory, []):
                if posixpath.splitext(name)[1].lower() in extensions:
                    names.add(name)
        return sorted(names)

    def _model_choices(self, class_type, input_name):
        keys = MODEL_INPUTS.get((class_type, input_name))
        if keys is None:
            return None
        names = sorted({name for key in keys for name in self._folder_files(key)})
        if class_type == "VAELoader":
            names.append("pixel_space")
        return names

    def _node_info(self, class_type):
        """object_info for one class, with the live model and input file lists."""
        info = self._object_info[class_type]
        patched = None
        for category in ("required", "optional"):
            for name, spec in (info.get("input", {}).get(category) or {}).items():
                choices = self._model_choices(class_type, name)
                if class_type == "LoadImage" and name == "image":
                    choices = sorted(k[2] for k in self._files if k[0] == "input" and k[1] == "")
                if choices is None:
                    continue
                if patched is None:
                    patched = copy.deepcopy(info)
                patched["input"][category][name] = [choices, *spec[1:]]
        return patched or info

    async def _get_object_info(self, request):
        out = {name: self._node_info(name) for name in self._object_info}
        return web.json_response(out)

    async def _get_object_info_node(self, request):
        name = request.match_info["node_class"]
        out = {name: self._node_info(name)} if name in self._object_info else {}
        return web.json_response(out)

    async def _get_models(self, request):
        return web.json_response(list(FOLDER_DIRS))

    async def _get_models_folder(self, request):
        folder = request.match_info["folder"]
        if folder not in FOLDER_DIRS:
            return web.Response(status=404)
        return web.json_response(self._folder_files(folder))

    async def _get_prompt(self, request):
        return web.json_response(self._queue_info())

    async def _get_queue(self, request):
        return web.json_response(
            {
                "queue_running": [self._running.as_list()] if self._running else [],
                "queue_pending": [item.as_list() for item in self._pending],  # heap order, like the real server
            }
        )

    async def _post_queue(self, request):
        data = await request.json()
        if data.get("clear"):
            self._pending.clear()
            self._queue_updated()
        for prompt_id in data.get("delete", []):
            kept = [item for item in self._pending if item.prompt_id != prompt_id]
            if len(kept) != len(self._pending):
                self._pending = kept
                heapq.heapify(self._pending)
                self._queue_updated()
        return web.Response(status=200)

    async def _post_interrupt(self, request):
        try:
            data = await request.json()
        except json.JSONDecodeError:
            data = {}
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        if prompt_id:
            if self._running is not None and self._running.prompt_id == prompt_id:
                self._interrupt = True
        else:
            self._interrupt = True
        return web.Response(status=200)

    async def _post_free(self, request):
        data = await request.json()
        for key in ("unload_models", "free_memory"):
            if data.get(key):
                self._flags[key] = data[key]
        return web.Response(status=200)

    async def _get_history(self, request):
        max_items = request.rel_url.query.get("max_items")
        max_items = int(max_items) if max_items is not None else None
        offset = request.rel_url.query.get("offset")
        offset = int(offset) if offset is not None else -1
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        out = {}
        for i, (key, item) in enumerate(self._history.items()):
            if i >= offset:
                out[key] = item
                if max_items is not None and len(out) >= max_items:
                    break
        return web.json_response(out)

    async def _get_history_prompt(self, request):
        prompt_id = request.match_info["prompt_id"]
        if prompt_id in self._history:
            return web.json_response({prompt_id: self._history[prompt_id]})
        return web.json_response({})

    async def _post_history(self, request):
        data = await request.json()
        if data.get("clear"):
            self._history.clear()
        for prompt_id in data.get("delete", []):
            self._history.pop(prompt_id, None)
        return web.Response(status=200)

    # ------------------------------------------------------------------ upload and view

    async def _upload_image(self, request):
        post = await request.post()
        image = post.get("image")
        overwrite = post.get("overwrite")
        upload_type = post.get("type") or "input"
        if upload_type not in DIR_TYPES:
            raise RuntimeError(f"unknown upload type {upload_type!r}")  # the real server fails the same way: 500
        if not isinstance(image, web.FileField):
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        subfolder = post.get("subfolder", "")
        sub = _norm_sub(subfolder)
        if sub is None:
            return web.Response(status=400)
        rel = _norm_sub(posixpath.join(sub, filename))
        if rel is None or rel == "":
            return web.Response(status=400)
        directory, name = posixpath.split(rel)
        data = image.file.read()
        stem, ext = posixpath.splitext(name)
        duplicate = False
        if overwrite not in ("true", "1"):
            i = 1
            while (upload_type, directory, name) in self._files:
                if self._files[(upload_type, directory, name)].data == data:
                    duplicate = True
                    break
                name = f"{stem} ({i}){ext}"
                i += 1
        if not duplicate:
            self._files[(upload_type, directory, name)] = _Blob(data=data)
        # The real server answers with the name relative to the subfolder it was given.
        shown = posixpath.relpath(posixpath.join(directory, name), sub or ".") if sub else posixpath.join(directory, name)
        return web.json_response({"name": shown, "subfolder": subfolder, "type": upload_type})

    def _iter_blob(self, blob: _Blob, start: int, end: int, chunk=CHUNK):
        """Bytes [start, end) of a stored file, in chunks; big outputs are generated on the fly."""
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            if blob.data is not None:
                yield blob.data[pos:pos + n]
            else:
                yield self._virtual_read(pos, n)
            pos += n

    def _virtual_read(self, offset, n):
        return generated_bytes(self._tiny, offset, n)

    async def _view(self, request):
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, dir_type = _annotated(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        if dir_type is None:
            dir_type = query.get("type", "output")
        if dir_type not in DIR_TYPES:
            return web.Response(status=400)
        sub = ""
        if "subfolder" in query:
            sub = _norm_sub(query["subfolder"])
            if sub is None:
                return web.Response(status=403)
        name = posixpath.basename(filename)
        blob = self._files.get((dir_type, sub, name))
        if blob is None:
            return web.Response(status=404)

        size = blob.size
        start, end, status = 0, size, 200
        range_header = request.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type in FORCED_OCTET:
            content_type = "application/octet-stream"
        headers = {
            "Content-Disposition": f'filename="{name}"',
            "Content-Type": content_type,
            "Etag": f'"{int(blob.mtime * 1e9):x}-{size:x}"',
            "Last-Modified": formatdate(blob.mtime, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        rate = self.view_bytes_per_second
        chunk = CHUNK if not rate else max(1, min(CHUNK, int(rate) // 10 or 1))
        try:
            for piece in self._iter_blob(blob, start, end, chunk):
                await response.write(piece)
                self.view_bytes_sent += len(piece)
                delay = self.view_chunk_delay or 0
                if self.view_bytes_per_second:
                    delay += len(piece) / self.view_bytes_per_second
                if delay:
                    await asyncio.sleep(delay)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return response

    # ------------------------------------------------------------------ websocket

    async def _ws(self, request):
        while self.ws_gate is not None and not self.ws_gate.is_set():
            await asyncio.sleep(0.005)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self._sockets.pop(sid, None)  # the old socket is forgotten, not closed
        else:
            sid = uuid.uuid4().hex
        self._sockets[sid] = ws
        self._socket_requests[ws] = request
        self._sent_counts[ws] = 0
        try:
            await self._ws_send(ws, json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}}))
            if self._client_id == sid and self._last_node_id is not None:
                await self._ws_send(ws, json.dumps({"type": "executing", "data": {"node": self._last_node_id}}))
            first = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except json.JSONDecodeError:
                        continue
                    if first and isinstance(data, dict) and data.get("type") == "feature_flags":
                        await self._ws_send(ws, json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True, "max_upload_size": self.max_upload_size}}))
                    first = False
        finally:
            # Like the real server: pops by sid, even if a newer socket took that sid over.
            self._sockets.pop(sid, None)
            self._socket_requests.pop(ws, None)
            self._sent_counts.pop(ws, None)
        return ws

    async def _ws_send(self, ws, text):
        if ws.closed:
            return
        try:
            await ws.send_str(text)
        except Exception:
            return
        self._sent_counts[ws] = self._sent_counts.get(ws, 0) + 1
        limit = self.drop_websocket_after
        if limit is not None and self._sent_counts[ws] >= limit:
            request = self._socket_requests.get(ws)
            if request is not None:
                _abort(request)

    def _emit(self, event, data, sid=None):
        """Queue a JSON message for the socket `sid` (None: every socket), in order."""
        self.emitted.append({"type": event, "data": data, "sid": sid})
        self._outbox.put_nowait((json.dumps({"type": event, "data": data}), sid))

    async def _publisher(self):
        while True:
            text, sid = await self._outbox.get()
            if sid is None:
                targets = list(self._sockets.values())
            else:
                targets = [self._sockets[sid]] if sid in self._sockets else []
            for ws in targets:
                await self._ws_send(ws, text)

    def _queue_updated(self):
        self._emit("status", {"status": self._queue_info()})

    # ------------------------------------------------------------------ POST /prompt and validation

    async def _post_prompt(self, request):
        data = await request.json()  # malformed JSON: aiohttp's 500, like the real server
        if isinstance(data, dict):
            with self._lock:
                self.submitted.append(data)
                if "prompt_id" in data:
                    self.prompt_posts[str(data["prompt_id"])] += 1
                    self.posted_with_socket[str(data["prompt_id"])] = data.get("client_id") in self._sockets

        if "number" in data:
            number = float(data["number"])
        else:
            number = self._number
            if data.get("front"):
                number = -number
            self._number += 1

        if "prompt" not in data:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)

        client_prompt_id = data.get("prompt_id")
        if client_prompt_id is None:
            prompt_id = str(uuid.uuid4())
        else:
            try:
                valid_uuid = isinstance(client_prompt_id, str) and str(uuid.UUID(client_prompt_id)) == client_prompt_id
            except ValueError:
                valid_uuid = False
            if not valid_uuid:
                error = {
                    "type": "invalid_prompt_id",
                    "message": "prompt_id must be a valid UUID",
                    "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
                    "extra_info": {},
                }
                return web.json_response({"error": error, "node_errors": {}}, status=400)
            prompt_id = client_prompt_id

        prompt = data["prompt"]
        if not isinstance(prompt, dict):
            raise TypeError("prompt must be an object")  # the real server crashes the same way: 500
        prompt = copy.deepcopy(prompt)  # validation coerces values in place, as the real server does
        ok, error, outputs, node_errors = self._validate_prompt(prompt, data.get("partial_execution_targets"))
        extra_data = data.get("extra_data", {})
        if "client_id" in data:
            extra_data["client_id"] = data["client_id"]
        if not ok:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        self._seq += 1
        heapq.heappush(self._pending, _Item(number, self._seq, prompt_id, prompt, extra_data, outputs))
        self.max_queued = max(self.max_queued, len(self._pending) + (1 if self._running else 0))
        self._queue_updated()
        self._work.set()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def _validate_prompt(self, prompt, partial_targets):
        outputs = []
        for node_id, node in prompt.items():
            if "class_type" not in node:
                return False, {"type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.", "details": f"Node ID '#{node_id}'", "extra_info": {}}, [], {}
            class_type = node["class_type"]
            info = self._object_info.get(class_type)
            if info is None:
                return False, {"type": "invalid_prompt", "message": f"Cannot execute because node {class_type} does not exist.", "details": f"Node ID '#{node_id}'", "extra_info": {}}, [], {}
            if info.get("output_node") and (partial_targets is None or node_id in partial_targets):
                outputs.append(node_id)
        if not outputs:
            return False, {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, [], {}

        good, errors, node_errors, validated = [], [], {}, {}
        for output_id in outputs:
            try:
                valid, reasons = self._validate_inputs(prompt, output_id, validated)[:2]
            except Exception as ex:
                valid = False
                reasons = [{"type": "exception_during_validation", "message": "Exception when validating node", "details": str(ex),
                            "extra_info": {"exception_type": _full_type_name(type(ex)), "traceback": _fake_traceback()}}]
                validated[output_id] = (False, reasons, output_id)
            if valid is True:
                good.append(output_id)
                continue
            errors.append((output_id, reasons))
            for node_id, (node_valid, node_reasons, _) in validated.items():
                # Downstream nodes of a failing node are invalid without reasons; only the cause is reported.
                if node_valid is not True and node_reasons:
                    if node_id not in node_errors:
                        node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]}
                    node_errors[node_id]["dependent_outputs"].append(output_id)
        if not good:
            details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in errors for r in reasons)
            error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": details, "extra_info": {}}
            return False, error, [], node_errors
        return True, None, good, node_errors

    def _validate_inputs(self, prompt, node_id, validated):
        if node_id in validated:
            return validated[node_id]
        inputs = prompt[node_id]["inputs"]
        class_type = prompt[node_id]["class_type"]
        info = self._object_info[class_type]
        spec_inputs = info.get("input", {})
        custom_validated = {"image"} if class_type in ("LoadImage", "LoadImageMask") else set()
        errors = []
        valid = True
        for category in ("required", "optional"):
            for name, spec in (spec_inputs.get(category) or {}).items():
                input_type = spec[0]
                extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                choices = self._model_choices(class_type, name)
                if choices is not None:
                    input_type = choices
                config = [input_type, extra]
                if name not in inputs:
                    if category == "required":
                        errors.append({"type": "required_input_missing", "message": "Required input is missing", "details": f"{name}", "extra_info": {"input_name": name}})
                    continue
                val = inputs[name]
                if isinstance(val, list):
                    if len(val) != 2:
                        errors.append({"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": f"{name}",
                                       "extra_info": {"input_name": name, "input_config": config, "received_value": val}})
                        continue
                    source_id = val[0]
                    source_class = prompt[source_id]["class_type"]
                    received_type = self._object_info[source_class]["output"][val[1]]
                    if not _types_match(received_type, input_type):
                        errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                                       "details": f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                                       "extra_info": {"input_name": name, "input_config": config, "received_type": received_type, "linked_node": val}})
                        continue
                    try:
                        if self._validate_inputs(prompt, source_id, validated)[0] is False:
                            valid = False
                            continue
                    except Exception as ex:
                        valid = False
                        validated[source_id] = (False, [{"type": "exception_during_inner_validation", "message": "Exception when validating inner node", "details": str(ex),
                                                         "extra_info": {"input_name": name, "input_config": config, "exception_message": str(ex),
                                                                        "exception_type": _full_type_name(type(ex)), "traceback": _fake_traceback(), "linked_node": val}}], source_id)
                        continue
                    continue

                try:
                    if isinstance(val, dict) and "__value__" in val:
                        val = inputs[name] = val["__value__"]
                    converter = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(input_type) if isinstance(input_type, str) else None
                    if converter is not None:
                        val = inputs[name] = converter(val)
                except Exception as ex:
                    errors.append({"type": "invalid_input_type", "message": f"Failed to convert an input value to a {input_type} value", "details": f"{name}, {val}, {ex}",
                                   "extra_info": {"input_name": name, "input_config": config, "received_value": val, "exception_message": str(ex)}})
                    continue
                if name in custom_validated:
                    continue
                if "min" in extra and val < extra["min"]:
                    errors.append({"type": "value_smaller_than_min", "message": "Value {} smaller than min of {}".format(val, extra["min"]), "details": f"{name}",
                                   "extra_info": {"input_name": name, "input_config": config, "received_value": val}})
                    continue
                if "max" in extra and val > extra["max"]:
                    errors.append({"type": "value_bigger_than_max", "message": "Value {} bigger than max of {}".format(val, extra["max"]), "details": f"{name}",
                                   "extra_info": {"input_name": name, "input_config": config, "received_value": val}})
                    continue
                # V1 combos (a list as the type) are checked; 0.3.64 does not check V3 "COMBO" inputs.
                if isinstance(input_type, list) and val not in input_type:
                    if len(input_type) > 20:
                        list_info, input_config = f"(list of length {len(input_type)})", None
                    else:
                        list_info, input_config = str(input_type), config
                    errors.append({"type": "value_not_in_list", "message": "Value not in list", "details": f"{name}: '{val}' not in {list_info}",
                                   "extra_info": {"input_name": name, "input_config": input_config, "received_value": val}})
                    continue

        for name in custom_validated:
            if name in inputs and not isinstance(inputs[name], list) and not self._input_exists(str(inputs[name])):
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": f"{name} - Invalid image file: {inputs[name]}", "extra_info": {"input_name": name}})

        result = (False, errors, node_id) if errors or valid is not True else (True, [], node_id)
        validated[node_id] = result
        return result

    def _input_exists(self, value):
        name, dir_type = _annotated(value)
        sub, base = posixpath.split(name)
        sub = _norm_sub(sub)
        return sub is not None and (dir_type or "input", sub, base) in self._files

    # ------------------------------------------------------------------ execution

    async def _worker(self):
        while True:
            while not self._pending:
                self._work.clear()
                await self._work.wait()
            item = heapq.heappop(self._pending)
            self._running = item
            self._queue_updated()
            try:
                await self._execute(item)
            finally:
                self._running = None
                self._client_id = None
                self._last_node_id = None
                self._held.clear()

    def _signature(self, prompt, node_id, memo):
        if node_id in memo:
            return memo[node_id]
        node = prompt[node_id]
        parts = {}
        for name, val in sorted(node.get("inputs", {}).items()):
            if isinstance(val, list) and len(val) == 2 and val[0] in prompt:
                parts[name] = ["link", self._signature(prompt, val[0], memo), val[1]]
            else:
                parts[name] = val
        if node["class_type"] in ("LoadImage", "LoadImageMask"):
            # IS_CHANGED is the file's hash: new bytes under the same name re-run the node.
            name, dir_type = _annotated(str(node.get("inputs", {}).get("image", "")))
            sub, base = posixpath.split(name)
            blob = self._files.get((dir_type or "input", _norm_sub(sub) or "", base))
            parts["__is_changed__"] = hashlib.sha256(blob.data).hexdigest() if blob and blob.data is not None else None
        raw = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
        memo[node_id] = hashlib.sha256(raw.encode()).hexdigest()
        return memo[node_id]

    def _execution_order(self, prompt, outputs, cached):
        order, seen = [], set()

        def visit(node_id):
            if node_id in seen:
                return
            seen.add(node_id)
            if node_id not in cached:  # a cached node's inputs are not needed
                for val in prompt[node_id].get("inputs", {}).values():
                    if isinstance(val, list) and len(val) == 2 and val[0] in prompt:
                        visit(val[0])
            order.append(node_id)

        for output_id in outputs:
            visit(output_id)
        return order

    def _sampler_steps(self, node):
        inputs = node.get("inputs", {})

        def number(name, default):
            val = inputs.get(name, default)
            return default if isinstance(val, (list, dict)) else int(val)

        steps = number("steps", 20)
        if node["class_type"] == "KSamplerAdvanced":
            return max(0, min(number("end_at_step", 10000), steps) - number("start_at_step", 0))
        return steps

    async def _checkpoint(self):
        """Where the real server checks for interrupts: before a node and at every sampler step."""
        while True:
            hold = self.hold
            if hold is None or hold.is_set() or self._interrupt:
                break
            if self._passes > 0:
                self._passes -= 1
                break
            self._held.set()
            await asyncio.sleep(0.005)
        self._held.clear()
        if self._interrupt:
            self._interrupt = False
            raise _Interrupted()

    async def _sleep_units(self, units, total_units):
        if self.run_seconds and total_units:
            await asyncio.sleep(self.run_seconds * units / total_units)

    async def _execute(self, item):
        prompt_id, prompt = item.prompt_id, item.prompt
        sid = item.extra_data.get("client_id")
        self._client_id = sid
        self._interrupt = False  # execute_async starts by clearing the interrupt flag
        messages, outputs, meta, executed = [], {}, {}, []
        progress_nodes = {}

        def add_message(event, data, broadcast):
            data = {**data, "timestamp": _now_ms()}
            messages.append([event, data])
            if sid is not None or broadcast:
                self._emit(event, data, sid)

        def to_client(event, data):
            if sid is not None:
                self._emit(event, data, sid)

        def progress_state(node_id, value, maximum, state):
            progress_nodes[node_id] = {"value": float(value), "max": float(maximum), "state": state, "node_id": node_id, "prompt_id": prompt_id,
                                       "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}
            self._emit("progress_state", {"prompt_id": prompt_id, "nodes": copy.deepcopy(progress_nodes)}, sid)

        add_message("execution_start", {"prompt_id": prompt_id}, False)
        memo = {}
        signatures = {node_id: self._signature(prompt, node_id, memo) for node_id in prompt}
        live = set(signatures.values())
        self._cache = {sig: ui for sig, ui in self._cache.items() if sig in live}  # CLASSIC cache: keep what this prompt can use
        cached = [node_id for node_id in prompt if signatures[node_id] in self._cache]
        add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id}, False)

        order = self._execution_order(prompt, item.outputs, set(cached))
        to_run = [n for n in order if n not in cached]
        total_units = sum(max(1, self._sampler_steps(prompt[n])) if prompt[n]["class_type"] in SAMPLERS else 1 for n in to_run)
        status_str, completed = "success", True
        current = None
        try:
            for node_id in order:
                current = node_id
                node = prompt[node_id]
                class_type = node["class_type"]
                sig = signatures[node_id]
                if node_id in cached:
                    ui = self._cache[sig]
                    if ui is not None:
                        to_client("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id})
                        outputs[node_id] = ui
                        meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
                    progress_state(node_id, 1, 1, "finished")
                    continue

                progress_state(node_id, 0, 1, "running")
                self._last_node_id = node_id
                to_client("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
                await self._checkpoint()
                if self.fail_node is not None and str(self.fail_node) in (node_id, class_type):
                    raise _NodeFailed(str(self.fail_message), str(self.fail_type))
                if class_type in SAMPLERS:
                    steps = self._sampler_steps(node)
                    for step in range(steps):
                        if self.steps_delay is not None:
                            await asyncio.sleep(self.steps_delay)
                        else:
                            await self._sleep_units(1, total_units)
                        await self._checkpoint()
                        progress_state(node_id, step + 1, steps, "running")
                        self._emit("progress", {"value": step + 1, "max": steps, "prompt_id": prompt_id, "node": node_id}, sid)
                    if steps == 0:
                        await self._sleep_units(1, total_units)
                else:
                    await self._sleep_units(1, total_units)
                ui = self._save_outputs(node)
                self._cache[sig] = ui
                if ui is not None:
                    to_client("executed", {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id})
                    outputs[node_id] = ui
                    meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}
                executed.append(node_id)
                progress_state(node_id, 1, 1, "finished")
            add_message("execution_success", {"prompt_id": prompt_id}, False)
        except _Interrupted:
            status_str, completed = "error", False
            add_message("execution_interrupted", {"prompt_id": prompt_id, "node_id": current, "node_type": prompt[current]["class_type"], "executed": executed}, True)
        except _NodeFailed as failure:
            status_str, completed = "error", False
            node = prompt[current]
            current_inputs = {
                name: [f"<{name} object at 0x7f3a2c1d0e50>" if isinstance(val, list) else val]
                for name, val in node.get("inputs", {}).items()
            }
            add_message(
                "execution_error",
                {
                    "prompt_id": prompt_id,
                    "node_id": current,
                    "node_type": node["class_type"],
                    "executed": executed,
                    "exception_message": f"{failure}\n",
                    "exception_type": failure.exception_type,
                    "traceback": _fake_traceback(),
                    "current_inputs": current_inputs,
                    "current_outputs": executed + cached,
                },
                False,
            )

        self._history[prompt_id] = {
            "prompt": item.as_list(),
            "outputs": outputs,
            "status": {"status_str": status_str, "completed": completed, "messages": messages},
            "meta": meta,
        }
        while len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        self._running = None
        self._queue_updated()
        if sid is not None:
            self._emit("executing", {"node": None, "prompt_id": prompt_id}, sid)

    def _save_outputs(self, node):
        """Write the file an output node saves and return its UI dict (None for other nodes)."""
        class_type, inputs = node["class_type"], node.get("inputs", {})
        if class_type == "SaveVideo":
            fmt, codec = inputs.get("format", "auto"), inputs.get("codec", "auto")
            if fmt not in ("auto", "mp4"):
                raise _NodeFailed(f"'{fmt}' is not a valid VideoContainer", "ValueError")
            if codec not in ("auto", "h264"):
                raise _NodeFailed(f"'{codec}' is not a valid VideoCodec", "ValueError")
            ext, animated, dir_type = "mp4", True, "output"
        elif class_type in SAVE_EXTENSIONS:
            ext, animated, dir_type = SAVE_EXTENSIONS[class_type], True, "output"
        elif class_type == "SaveImage":
            ext, animated, dir_type = "png", False, "output"
        elif class_type == "PreviewImage":
            ext, animated, dir_type = "png", False, "temp"
        else:
            return None
        if dir_type == "temp":
            prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
        else:
            prefix = str(inputs.get("filename_prefix", "ComfyUI"))
        norm = posixpath.normpath(prefix)
        subfolder, base = posixpath.split(norm)
        if prefix.startswith("/") or norm == ".." or norm.startswith("../"):
            raise _NodeFailed("**** ERROR: Saving image outside the output folder is not allowed.", "Exception")
        counter = 1 + max(
            [_counter(name, base) for (kind, sub, name) in self._files if kind == dir_type and sub == subfolder] or [0]
        )
        filename = f"{base}_{counter:05}_.{ext}"
        size = self.output_size
        blob = _Blob(size=size) if size is not None else _Blob(data=self._tiny)
        self._files[(dir_type, subfolder, filename)] = blob
        ui = {"images": [{"filename": filename, "subfolder": subfolder, "type": dir_type}]}
        if animated:
            ui["animated"] = [True]
        return ui


def _counter(filename, base):
    """The counter of '<base>_00007_.mp4' (0 when the name belongs to another prefix)."""
    if filename[: len(base) + 1] != base + "_":
        return 0
    match = re.match(r"(\d+)_", filename[len(base) + 1:])
    return int(match.group(1)) if match else 0


def _types_match(received, expected) -> bool:
    if not received != expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def _parse_range(header, size):
    """A single 'bytes=a-b' range as [start, end); None when it cannot be satisfied."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    else:
        suffix = int(last)
        if suffix == 0:
            return None
        start, end = max(0, size - suffix), size
    if start >= size or start >= end:
        return None
    return start, end


def _fake_traceback():
    return [
        '  File "/workspace/ComfyUI/execution.py", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n',
        '  File "/workspace/ComfyUI/execution.py", line 315, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n',
    ]


def _abort(request):
    """Drop a connection without a close frame, like a process that died or a network cut."""
    transport = request.transport
    if transport is not None:
        transport.abort()
