"""A fal.ai queue API test double: a real aiohttp HTTP server on 127.0.0.1.

It speaks fal's queue REST API (as fal-client 1.0 calls it) for the Wan 2.2
image-to-video endpoints. ``url`` stands in for
``https://queue.fal.run`` and also serves the output files (fal's CDN):

    with FalDouble(queue_polls=1, progress_polls=1) as fal:
        client = FalClient(fal.key, fal.url)

Routes:

- ``POST /{owner}/{alias}[/{path...}]`` (e.g. ``/fal-ai/wan/v2.2-a14b/image-to-video``
  and ``.../turbo``), optional ``?fal_webhook=<url>``: validates the input like fal
  (pydantic-style ``422 {"detail": [{"loc", "msg", "type"}]}``) and answers
  ``{"request_id", "response_url", "status_url", "cancel_url", "gateway_request_id"}``.
  The three URLs use only ``{owner}/{alias}``, dropping the endpoint sub-path.
- ``GET /{owner}/{alias}/requests/{id}/status[?logs=1]``: ``IN_QUEUE`` (with
  ``queue_position``), ``IN_PROGRESS`` (with ``logs``), ``COMPLETED`` (``metrics``,
  ``error``, ``error_type``).
- ``GET /{owner}/{alias}/requests/{id}``: the output once completed, else
  ``400 {"detail": "Request is still in progress"}``; a failed request answers its
  error status with ``{"detail": ...}`` and the ``x-fal-error-type`` header.
- ``PUT /{owner}/{alias}/requests/{id}/cancel``: ``202 CANCELLATION_REQUESTED``,
  ``400 ALREADY_COMPLETED`` or ``404 NOT_FOUND``.
- ``GET /files/{request_id}.mp4`` (no auth, like the CDN): the video bytes.

Any queue route called with the endpoint sub-path in it (``.../image-to-video/requests/...``)
is a 404: clients must use the URLs they were given. Every route but ``/files`` needs
``Authorization: Key <key>``, else ``401 {"detail": ...}``.

Knobs (constructor keyword arguments and attributes; change them at any time from
the test thread):

- ``key``: the accepted API key.
- ``queue_polls`` / ``progress_polls``: how many status polls a request spends
  ``IN_QUEUE`` and then ``IN_PROGRESS``; the next poll finds it ``COMPLETED``.
  ``queue_polls=None`` keeps requests queued until ``advance()``.
- ``queue_seconds`` / ``run_seconds``: with ``run_seconds`` set, requests move by wall
  time instead of by polls, so a webhook arrives without anyone polling.
- ``advance(request_id, state)``: move a request by hand (``"IN_QUEUE"``,
  ``"IN_PROGRESS"``, ``"COMPLETED"``); it then stops moving on its own.
- ``fail_message`` (None = success), ``fail_type`` (``x-fal-error-type``),
  ``fail_status``: requests completing while set fail like a model error.
- ``validate_on_submit`` (default True): validation errors are a 422 on submit.
  When False the request is queued and the 422 arrives as its result (and in the
  webhook), which is how a runner-side validation failure looks.
- ``check_image_url``: fetch ``image_url`` when it is http(s) on a loopback host and
  fail the request with fal's ``file_download_error`` when that is not a 200. Other
  hosts are never fetched (they fail the same way); ``data:`` URIs are accepted.
- ``output_size``: the video becomes N bytes (``tests/fixtures/tiny.mp4`` followed by
  a deterministic pseudo-random pattern), generated while streaming, never held in
  memory whole. ``download_chunk_delay``: seconds between 64 KiB chunks.
- ``fail_download``: an HTTP status for every ``/files`` request, or ``"truncate"``
  (announce the full length, send half, drop the connection).
- ``hang_paths``: fnmatch patterns of paths that are never answered (until
  ``release_hangs()``).
- ``fail_http(pattern, times=1, status=500, body=..., method=None)``: answer the next
  ``times`` matching requests with that status and body; ``fail_submit(...)`` does
  it for POSTs (5xx on submit).
- ``deliver_webhooks``: POST webhooks (only to loopback hosts; others are recorded
  as skipped).
- ``unserialisable_payload``: successful webhooks carry ``"payload": null`` and a
  ``payload_error``, as fal sends when it cannot serialise the output (the result URL
  still serves it).
- ``fail_submit(times=2, status=429, body='{"detail": "Rate limit exceeded"}')``: fal did not
  queue the next two submissions (408, 409 and 429 mean "try again").

Observation: ``requests`` (method, path, query, headers), ``submissions``
(request_id -> input JSON), ``webhook_deliveries``, ``count(method, pattern)``,
``state(request_id)``, ``output_bytes()``, ``output_sha256()``, ``wait_for(predicate)``.
"""

import asyncio
import base64
import fnmatch
import hashlib
import ipaddress
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from tests.doubles.base import LoopServer, RecordedRequest, generated_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MP4 = REPO_ROOT / "tests/fixtures/tiny.mp4"

WAN_I2V = "fal-ai/wan/v2.2-a14b/image-to-video"
WAN_I2V_TURBO = "fal-ai/wan/v2.2-a14b/image-to-video/turbo"
# endpoint id -> the schema its input is checked against (providers.md 2.1).
DEFAULT_ENDPOINTS = {WAN_I2V: "full", WAN_I2V_TURBO: "turbo", WAN_I2V + "/lora": "full"}

ENUMS = {
    "resolution": ("480p", "580p", "720p"),
    "aspect_ratio": ("auto", "16:9", "9:16", "1:1"),
    "acceleration": ("none", "regular"),
    "video_quality": ("low", "medium", "high", "maximum"),
    "video_write_mode": ("fast", "balanced", "small"),
    "interpolator_model": ("none", "film", "rife"),
}
TURBO_ENUMS = ("resolution", "aspect_ratio", "acceleration", "video_quality", "video_write_mode")
RANGES = {"num_frames": (17, 161), "frames_per_second": (4, 60), "shift": (1, 10), "num_interpolated_frames": (0, 4)}
INTS = ("num_frames", "frames_per_second", "num_inference_steps", "num_interpolated_frames", "seed")
BOOLS = ("enable_safety_checker", "enable_output_safety_checker", "enable_prompt_expansion", "reverse_video", "adjust_fps_for_interpolation")

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"
STATES = (IN_QUEUE, IN_PROGRESS, COMPLETED)
CHUNK = 64 * 1024
REQUEST_RE = re.compile(r"^/(?P<owner>[^/]+)/(?P<alias>[^/]+)/requests/(?P<id>[^/]+)(?P<action>/status|/cancel)?/?$")
DOWNLOAD_ERROR = "Failed to download the file. Please check if the URL is accessible."


@dataclass
class _Request:
    id: str
    gateway_id: str
    owner: str
    alias: str
    endpoint: str
    input: object
    webhook: str | None
    submitted: float = field(default_factory=time.monotonic)
    state: str = IN_QUEUE
    polls: int = 0
    manual: bool = False
    cancelled: bool = False
    invalid: list | None = None  # validation errors delivered as the result (validate_on_submit=False)
    outcome: dict | None = None  # set on completion: {"ok", "payload" | "status", "detail", "error_type"}
    logs: list = field(default_factory=list)
    image_check: asyncio.Task | None = None
    driver: asyncio.Task | None = None


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _missing(name):
    return {"loc": ["body", name], "msg": "field required", "type": "value_error.missing"}


def _validate(schema: str, data) -> list[dict]:
    """Pydantic-v1-style errors for the Wan 2.2 I2V input (providers.md 2.1)."""
    if not isinstance(data, dict):
        return [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
    errors = []
    for name in ("image_url", "prompt"):
        if data.get(name) is None:
            errors.append(_missing(name))
        elif not isinstance(data[name], str):
            errors.append({"loc": ["body", name], "msg": "str type expected", "type": "type_error.str"})
    ints = ("seed",) if schema == "turbo" else INTS
    for name in ints:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append({"loc": ["body", name], "msg": "value is not a valid integer", "type": "type_error.integer"})
    if schema == "full":
        for name, (low, high) in RANGES.items():
            value = data.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if value < low:
                errors.append({"loc": ["body", name], "msg": f"ensure this value is greater than or equal to {low}",
                               "type": "value_error.number.not_ge", "ctx": {"limit_value": low}})
            elif value > high:
                errors.append({"loc": ["body", name], "msg": f"ensure this value is less than or equal to {high}",
                               "type": "value_error.number.not_le", "ctx": {"limit_value": high}})
    for name in BOOLS:
        if name in data and not isinstance(data[name], bool):
            errors.append({"loc": ["body", name], "msg": "value could not be parsed to a boolean", "type": "type_error.bool"})
    for name in TURBO_ENUMS if schema == "turbo" else ENUMS:
        if name in data and data[name] not in ENUMS[name]:
            permitted = ", ".join(f"'{v}'" for v in ENUMS[name])
            errors.append({"loc": ["body", name], "msg": f"unexpected value; permitted: {permitted}",
                           "type": "value_error.const", "ctx": {"given": data[name], "permitted": list(ENUMS[name])}})
    return errors


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _abort(request):
    """Drop a connection without finishing the response."""
    transport = request.transport
    if transport is not None:
        transport.abort()


class FalDouble(LoopServer):
    name = "fal-double"

    def __init__(
        self,
        *,
        key="fal-test-key-id:fal-test-key-secret",
        endpoints=None,
        queue_polls=1,
        progress_polls=1,
        queue_seconds=0.0,
        run_seconds=None,
        fail_message=None,
        fail_type="internal_server_error",
        fail_status=500,
        validate_on_submit=True,
        check_image_url=False,
        output_size=None,
        download_chunk_delay=0.0,
        fail_download=None,
        hang_paths=(),
        deliver_webhooks=True,
        inference_time=2.5,
        unserialisable_payload=False,
    ):
        self.key = key
        self.endpoints = dict(DEFAULT_ENDPOINTS if endpoints is None else endpoints)
        self.queue_polls = queue_polls
        self.progress_polls = progress_polls
        self.queue_seconds = queue_seconds
        self.run_seconds = run_seconds
        self.fail_message = fail_message
        self.fail_type = fail_type
        self.fail_status = fail_status
        self.validate_on_submit = validate_on_submit
        self.check_image_url = check_image_url
        self.output_size = output_size
        self.download_chunk_delay = download_chunk_delay
        self.fail_download = fail_download
        self.hang_paths = set(hang_paths)
        self.deliver_webhooks = deliver_webhooks
        self.inference_time = inference_time
        self.unserialisable_payload = unserialisable_payload

        self._tiny = TINY_MP4.read_bytes()

        self._lock = threading.Lock()  # guards the observation lists and fail_http rules
        self.requests: list[RecordedRequest] = []
        self.submissions: dict[str, object] = {}
        self.webhook_deliveries: list[dict] = []
        self._fail_rules: list[dict] = []

        self._requests: dict[str, _Request] = {}  # touched only on the server loop

    # ------------------------------------------------------------------ lifecycle

    async def _astart(self):
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        await self._serve(app)

    async def _astop(self):
        self._stopping.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._runner.cleanup()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def fail_http(self, pattern, *, times=1, status=500, body='{"detail": "Internal Server Error"}', content_type="application/json", method=None):
        """Answer the next `times` requests whose path matches `pattern` (fnmatch) with status and body."""
        with self._lock:
            self._fail_rules.append({"pattern": pattern, "times": times, "status": status, "body": body, "content_type": content_type, "method": method})

    def fail_submit(self, *, times=1, status=503, body='{"detail": "Service Unavailable"}', content_type="application/json"):
        """5xx (or any status) on the next `times` submissions."""
        self.fail_http("*", times=times, status=status, body=body, content_type=content_type, method="POST")

    def release_hangs(self):
        """Let requests stuck on hang_paths finish (they answer 503)."""
        self.hang_paths = set()

    def advance(self, request_id, state):
        """Put a request into `state` by hand; it no longer moves on polls or time."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}")

        async def do():
            req = self._requests[request_id]
            req.manual = True
            if req.state == COMPLETED:
                raise ValueError(f"request {request_id} has already completed")
            await self._set_state(req, state)

        self._call(do)

    def state(self, request_id) -> str | None:
        return self._call(lambda: self._requests[request_id].state if request_id in self._requests else None)

    def count(self, method, pattern) -> int:
        """How many requests hit a path matching `pattern` (fnmatch) with `method`."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and fnmatch.fnmatchcase(r.path, pattern))

    def wait_for(self, predicate, timeout=5.0, interval=0.005):
        """Wait until predicate(self) is true (e.g. a webhook delivery arrived)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("FalDouble.wait_for: condition not met")
            time.sleep(interval)

    def output_size_bytes(self) -> int:
        return self.output_size if self.output_size is not None else len(self._tiny)

    def output_bytes(self) -> bytes:
        return b"".join(self._iter_output(0, self.output_size_bytes()))

    def output_sha256(self) -> str:
        h = hashlib.sha256()
        for chunk in self._iter_output(0, self.output_size_bytes()):
            h.update(chunk)
        return h.hexdigest()

    # ------------------------------------------------------------------ plumbing

    def _hangs(self, path):
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in list(self.hang_paths))

    @web.middleware
    async def _middleware(self, request, handler):
        with self._lock:
            self.requests.append(RecordedRequest(request.method, request.path, dict(request.rel_url.query), CIMultiDict(request.headers)))
        path = request.path
        if self._hangs(path):
            while self._hangs(path) and not self._stopping.is_set():
                await asyncio.sleep(0.02)
            return web.Response(status=503)
        rule = self._take_fail_rule(path, request.method)
        if rule is not None:
            body = rule["body"].encode() if isinstance(rule["body"], str) else rule["body"]
            return web.Response(status=rule["status"], body=body, content_type=rule["content_type"])
        if not path.startswith("/files/"):
            auth = request.headers.get("Authorization")
            if not auth:
                return web.json_response({"detail": "Missing authorization header"}, status=401)
            if auth != f"Key {self.key}":
                return web.json_response({"detail": "No user found for Key ID and Secret"}, status=401)
        return await handler(request)

    async def _dispatch(self, request):
        path = request.path
        method = request.method
        if path.startswith("/files/"):
            if method in ("GET", "HEAD"):
                return await self._file(request, path[len("/files/"):])
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        match = REQUEST_RE.match(path)
        if match:
            req = self._requests.get(match["id"])
            if req is not None and (req.owner, req.alias) != (match["owner"], match["alias"]):
                req = None  # another app's request is not visible under this one
            action = match["action"]
            if action == "/status" and method == "GET":
                return await self._status(request, req, match["id"])
            if action == "/cancel" and method == "PUT":
                return await self._cancel(req)
            if action is None and method == "GET":
                return await self._result(req)
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        if method == "POST":
            return await self._submit(request)
        return web.json_response({"detail": "Not Found"}, status=404)

    def _urls(self, req: _Request) -> dict:
        base = f"{self.url}/{req.owner}/{req.alias}/requests/{req.id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    # ------------------------------------------------------------------ submit

    async def _submit(self, request):
        endpoint = request.path.strip("/")
        schema = self.endpoints.get(endpoint)
        if schema is None:
            return web.json_response({"detail": f"Application '{endpoint}' not found"}, status=404)
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"detail": [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]}, status=422)
        errors = _validate(schema, data)
        if errors and self.validate_on_submit:
            return web.json_response({"detail": errors}, status=422)
        owner, alias = endpoint.split("/")[:2]
        req = _Request(
            id=str(uuid.uuid4()), gateway_id=str(uuid.uuid4()), owner=owner, alias=alias, endpoint=endpoint,
            input=data, webhook=request.rel_url.query.get("fal_webhook") or None, invalid=errors or None,
        )
        self._requests[req.id] = req
        with self._lock:
            self.submissions[req.id] = data
        if self.check_image_url and not errors:
            req.image_check = self._spawn(self._check_image(data.get("image_url")))
        if self.run_seconds is not None:
            req.driver = self._spawn(self._drive(req))
        return web.json_response({"request_id": req.id, **self._urls(req), "gateway_request_id": req.gateway_id})

    async def _check_image(self, url) -> bool:
        """Whether the runner could download image_url; only data: URIs and loopback hosts are tried."""
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            if ";base64" not in head:
                return True
            try:
                base64.b64decode(payload, validate=True)
            except ValueError:
                return False
            return True
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not _is_loopback(parts.hostname or ""):
            return False  # the double fetches nothing from outside
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url) as resp:
                    await resp.read()
                    return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    # ------------------------------------------------------------------ progression

    async def _drive(self, req: _Request):
        """Time-driven mode: queue_seconds in the queue, run_seconds running, then done."""
        await asyncio.sleep(self.queue_seconds or 0)
        if req.manual or req.state == COMPLETED:
            return
        await self._set_state(req, IN_PROGRESS)
        await asyncio.sleep(self.run_seconds or 0)
        if req.manual or req.state == COMPLETED:
            return
        await self._set_state(req, COMPLETED)

    async def _set_state(self, req: _Request, state):
        if state == req.state or req.state == COMPLETED:
            return
        req.state = state
        if state in (IN_PROGRESS, COMPLETED) and not req.logs:
            req.logs.append({"message": "Loading Wan 2.2 A14B", "level": "INFO", "source": "user", "timestamp": _now_iso()})
        if state == COMPLETED:
            await self._complete(req)

    async def _complete(self, req: _Request):
        if req.cancelled:
            req.outcome = {"ok": False, "status": 400, "detail": "Request was cancelled", "error_type": "request_cancelled"}
        elif req.invalid:
            req.outcome = {"ok": False, "status": 422, "detail": req.invalid, "error_type": None}
        else:
            image_ok = True
            if req.image_check is not None:
                image_ok = await req.image_check
            if not image_ok:
                url = req.input.get("image_url")
                detail = [{"loc": ["body", "image_url"], "msg": DOWNLOAD_ERROR, "type": "file_download_error", "input": url}]
                req.outcome = {"ok": False, "status": 422, "detail": detail, "error_type": "file_download_error"}
            elif self.fail_message is not None:
                req.outcome = {"ok": False, "status": self.fail_status, "detail": self.fail_message, "error_type": self.fail_type}
            else:
                name = f"{req.id}.mp4"
                seed = req.input.get("seed")
                payload = {
                    "video": {"url": f"{self.url}/files/{name}", "content_type": "video/mp4", "file_name": name, "file_size": self.output_size_bytes()},
                    "seed": seed if isinstance(seed, int) else random.randrange(2**31),
                    "prompt": req.input.get("prompt"),
                }
                req.outcome = {"ok": True, "payload": payload}
        req.logs.append({"message": "Done" if req.outcome["ok"] else "Request failed", "level": "INFO" if req.outcome["ok"] else "ERROR",
                         "source": "user", "timestamp": _now_iso()})
        if req.webhook:
            self._spawn(self._deliver_webhook(req))

    def _error_text(self, outcome) -> str:
        if outcome["status"] == 422:
            return "Invalid status code: 422"
        detail = outcome["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)

    async def _deliver_webhook(self, req: _Request):
        outcome = req.outcome
        if outcome["ok"] and self.unserialisable_payload:
            body = {"request_id": req.id, "gateway_request_id": req.gateway_id, "status": "OK", "payload": None,
                    "payload_error": "Response payload could not be serialized to JSON"}
        elif outcome["ok"]:
            body = {"request_id": req.id, "gateway_request_id": req.gateway_id, "status": "OK", "payload": outcome["payload"]}
        else:
            body = {"request_id": req.id, "gateway_request_id": req.gateway_id, "status": "ERROR",
                    "error": f"Invalid status code: {outcome['status']}", "payload": {"detail": outcome["detail"]}}
        record = {"url": req.webhook, "request_id": req.id, "body": body, "status": None, "error": None}
        host = urlsplit(req.webhook).hostname or ""
        if not self.deliver_webhooks:
            record["error"] = "webhooks disabled"
        elif not _is_loopback(host):
            record["error"] = "skipped: not a loopback host"
        else:
            try:
                timeout = aiohttp.ClientTimeout(total=5)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async with session.post(req.webhook, json=body, headers={"X-Fal-Webhook-Request-Id": req.id}) as resp:
                        record["status"] = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.webhook_deliveries.append(record)

    # ------------------------------------------------------------------ status, result, cancel

    async def _status(self, request, req, request_id):
        if req is None:
            return web.json_response({"detail": f"Request {request_id} not found"}, status=404)
        if not req.manual and self.run_seconds is None and req.state != COMPLETED:
            poll = req.polls
            queued = self.queue_polls
            if queued is not None:
                if poll < queued:
                    state = IN_QUEUE
                elif poll < queued + (self.progress_polls or 0):
                    state = IN_PROGRESS
                else:
                    state = COMPLETED
                await self._set_state(req, state)
        req.polls += 1
        with_logs = request.rel_url.query.get("logs") in ("1", "true")
        body = {"status": req.state, "request_id": req.id, **self._urls(req)}
        if req.state == IN_QUEUE:
            ahead = max(0, self.queue_polls - req.polls) if (self.queue_polls is not None and not req.manual and self.run_seconds is None) else 0
            body["queue_position"] = ahead
            body["logs"] = None
        elif req.state == IN_PROGRESS:
            body["logs"] = list(req.logs) if with_logs else None
        else:
            body["logs"] = list(req.logs) if with_logs else None
            body["metrics"] = {"inference_time": self.inference_time} if req.outcome["ok"] else {}
            body["error"] = None if req.outcome["ok"] else self._error_text(req.outcome)
            body["error_type"] = None if req.outcome["ok"] else req.outcome["error_type"]
        return web.json_response(body, status=200 if req.state == COMPLETED else 202)

    async def _result(self, req):
        if req is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        if req.state != COMPLETED:
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        outcome = req.outcome
        if outcome["ok"]:
            return web.json_response(outcome["payload"], headers={"x-fal-request-id": req.id})
        headers = {"x-fal-request-id": req.id}
        if outcome["error_type"]:
            headers["x-fal-error-type"] = outcome["error_type"]
        return web.json_response({"detail": outcome["detail"]}, status=outcome["status"], headers=headers)

    async def _cancel(self, req):
        if req is None:
            return web.json_response({"status": "NOT_FOUND"}, status=404)
        if req.state == COMPLETED:
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        req.cancelled = True
        req.manual = True
        await self._set_state(req, COMPLETED)
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    # ------------------------------------------------------------------ files

    def _iter_output(self, start, end, chunk=CHUNK):
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            yield self._virtual_read(pos, n)
            pos += n

    def _virtual_read(self, offset, n):
        return generated_bytes(self._tiny, offset, n)

    async def _file(self, request, name):
        req = self._requests.get(name.removesuffix(".mp4"))
        if req is None or not name.endswith(".mp4") or req.outcome is None or not req.outcome["ok"]:
            return web.Response(status=404, text="Not Found")
        failure = self.fail_download
        if isinstance(failure, int):
            return web.Response(status=failure, text=f"HTTP {failure}")
        size = self.output_size_bytes()
        response = web.StreamResponse(status=200, headers={"Content-Type": "video/mp4", "Content-Disposition": f'inline; filename="{name}"'})
        response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        end = size // 2 if failure == "truncate" else size
        try:
            for piece in self._iter_output(0, end):
                await response.write(piece)
                if self.download_chunk_delay:
                    await asyncio.sleep(self.download_chunk_delay)
            if failure == "truncate":
                _abort(request)
                return response
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return response
