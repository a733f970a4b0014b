"""The one client for ComfyUI's HTTP + websocket API (ComfyUI 0.3.64's server.py).

Every failure is a ComfyUIError whose str() a person can act on and whose `kind`
code can branch on. The bearer token goes on every request and on the websocket
upgrade, and never into a message or a log line.
"""

import contextlib
import json
import logging
import mimetypes
import re
import socket
import time
from urllib.parse import quote, urlencode, urlsplit, urlunsplit, parse_qsl

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as ws_connect

from gpu import netguard
from i2v.core.http import ACCEPT, ServiceClient, ServiceError, causes, connect_reason, snippet

log = logging.getLogger(__name__)

AUTH_MESSAGE = "Failed to authenticate: the tunnel URL may have expired or the token is wrong"
NOT_READY_MESSAGE = "Instance not ready: ComfyUI is still starting (2-5 min)"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")
ANIMATION_EXTENSIONS = (".gif", ".webp", ".png")
MODEL_INPUT_NAMES = {"unet_name", "lora_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "ckpt_name", "model_name"}
MODEL_EXTENSIONS = (".gguf", ".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
WS_MAX_MESSAGE = 16 * 1024 * 1024


class ComfyUIError(ServiceError):
    """kind: unreachable, timeout, auth, not_ready, validation, bad_response, http, blocked, ws_closed."""

    def __init__(self, message, *, node_errors=None, **kwargs):
        super().__init__(message, **kwargs)
        self.node_errors = node_errors or {}


def _redact_url(url: str) -> str:
    """The URL without credentials: no user:password@ and no token= query value."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(?i)(token=)[^&\s]*", r"\1***", url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = re.sub(r"(?i)(^|&)(token=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _connect_reason(exc) -> str:
    reason = connect_reason(exc)
    return reason + ": nothing is listening on that port (ComfyUI down or wrong port?)" if reason == "connection refused" else reason


def _format_node_error(node_id, entry) -> list[str]:
    class_type = entry.get("class_type") or "?"
    lines = []
    for err in entry.get("errors") or [{}]:
        etype = err.get("type", "")
        message = err.get("message", "")
        details = err.get("details", "")
        extra = err.get("extra_info") or {}
        input_name = extra.get("input_name")
        if etype == "value_not_in_list":
            text = details or message
            received = str(extra.get("received_value", ""))
            if input_name in MODEL_INPUT_NAMES or received.lower().endswith(MODEL_EXTENSIONS):
                text += f" — model file {received} is not on the server"
        elif etype == "required_input_missing":
            text = f"required input '{details or input_name}' is missing"
        elif etype in ("value_bigger_than_max", "value_smaller_than_min"):
            text = f"{input_name or details}: {message}"
        elif etype == "custom_validation_failed" and class_type in ("LoadImage", "LoadImageMask"):
            text = f"{details} — the input image is not on the server (upload it first)"
        else:
            text = f"{message}: {details}" if details else message
        lines.append(f"node {node_id} ({class_type}): {text}")
    return lines


def _validation_message(body: dict) -> str:
    error = body.get("error") or {}
    node_errors = body.get("node_errors") or {}
    lines = []
    for node_id, entry in node_errors.items():
        lines.extend(_format_node_error(node_id, entry))
    if not lines:
        if isinstance(error, dict):
            text = error.get("message") or error.get("type") or "invalid prompt"
            if error.get("details") and error.get("details") != text:
                text += f" ({error['details']})"
            if error.get("type") == "missing_node_type" or (error.get("type") == "invalid_prompt" and "does not exist" in text):
                text += " — the custom node may not be installed on the server"
        else:
            text = str(error)
        lines.append(text)
    return "ComfyUI rejected the workflow: " + "; ".join(lines)


def _execution_error_message(data: dict) -> str:
    node = f"node {data.get('node_id')} ({data.get('node_type')})"
    exc_type = data.get("exception_type") or "error"
    message = (data.get("exception_message") or "").strip()
    first = message.split("\n", 1)[0] if message else ""
    text = f"{node} failed: {exc_type}: {snippet(first, 300)}" if first else f"{node} failed: {exc_type}"
    if "OutOfMemory" in exc_type or "out of memory" in message.lower():
        text += " — the GPU ran out of memory; try fewer frames or a smaller size"
    return text


def find_outputs(history_item: dict, output_node=None) -> list[dict]:
    """The downloadable outputs of a finished prompt, best first.

    Entries of `output_node` come first, then other nodes; within each, real videos
    before animated images. Only `type == "output"` files with a video or animation
    extension count. Each entry is a copy with `node_id` added.
    """
    outputs = (history_item or {}).get("outputs") or {}
    found = []
    for node_id, node_output in outputs.items():
        if not isinstance(node_output, dict):
            continue
        for key in ("images", "gifs", "videos"):
            for entry in node_output.get(key) or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
                    continue
                if entry.get("type", "output") != "output":
                    continue
                name = entry["filename"].lower()
                if name.endswith(VIDEO_EXTENSIONS):
                    rank = 0
                elif name.endswith(ANIMATION_EXTENSIONS):
                    rank = 1
                else:
                    continue
                preferred = 0 if output_node is not None and str(node_id) == str(output_node) else 1
                found.append((preferred, rank, len(found), {**entry, "subfolder": entry.get("subfolder", ""), "type": "output", "node_id": str(node_id)}))
    return [entry for *_, entry in sorted(found, key=lambda t: t[:3])]


def run_outcome(history_item: dict) -> tuple[str, str | None]:
    """("success" | "error" | "interrupted", message) for a history entry."""
    status = (history_item or {}).get("status") or {}
    if status.get("status_str") == "success":
        return "success", None
    for message in status.get("messages") or []:
        if not isinstance(message, (list, tuple)) or len(message) != 2:
            continue
        event, data = message
        data = data if isinstance(data, dict) else {}
        if event == "execution_interrupted":
            return "interrupted", f"Interrupted at node {data.get('node_id')} ({data.get('node_type')})"
        if event == "execution_error":
            return "error", _execution_error_message(data)
    if not status:
        return "error", "ComfyUI's history entry has no status"
    return "error", "ComfyUI reported an error without details"


class EventStream:
    """Parsed JSON events of one websocket; binary preview frames are skipped."""

    def __init__(self, connection, where):
        self._conn = connection
        self._where = where

    def next(self, timeout=None) -> dict | None:
        """The next event, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = self._conn.recv(timeout=remaining)
            except TimeoutError:
                return None
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                how = f"closed by the server (code {code})" if code is not None else "dropped without a close frame"
                raise ComfyUIError(f"ComfyUI websocket at {self._where} {how}", kind="ws_closed", retryable=True) from None
            except OSError as exc:
                raise ComfyUIError(f"ComfyUI websocket at {self._where} failed: {_connect_reason(exc)}", kind="unreachable", retryable=True) from None
            if isinstance(message, bytes):
                continue
            try:
                event = json.loads(message)
            except ValueError:
                log.debug("ignoring a non-JSON websocket message from %s", self._where)
                continue
            if isinstance(event, dict):
                return event

    def __iter__(self):
        while True:
            yield self.next()


class ComfyUIClient(ServiceClient):
    service = "ComfyUI"
    error = ComfyUIError
    guard = netguard
    retry_log_level = logging.INFO  # generation.runner warns once per outage

    def __init__(self, base_url, *, token=None, connect_timeout=5.0, read_timeout=30.0, retries=2, http_client=None, backoff=0.5):
        parts = urlsplit(base_url.strip())
        query = parse_qsl(parts.query, keep_blank_values=True)
        # A pasted "Open" link may carry ?token=; it becomes the bearer token and leaves the URL.
        url_token = next((value for key, value in query if key == "token"), None)
        self._token = token or url_token or None
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        super().__init__(connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries, backoff=backoff,
                         http_client=http_client)

    @property
    def where(self) -> str:
        return _redact_url(self.base_url)

    # ------------------------------------------------------------------ plumbing

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _secrets(self) -> list[str]:
        return [self._token] if self._token else []

    def _retry_delay(self, error, attempt):
        if error.kind == "not_ready":
            return None  # ComfyUI is still starting: minutes, not a retry's worth
        return super()._retry_delay(error, attempt)

    def _guard_error(self, exc) -> ComfyUIError | None:
        """netguard refusals: a host that does not resolve is unreachable, anything else blocked."""
        for cause in causes(exc):
            if isinstance(cause, netguard.BlockedURL):
                if any(isinstance(c, socket.gaierror) for c in causes(cause)):
                    return self._error(f"Cannot reach ComfyUI at {self.where}: DNS lookup failed: the host name does not resolve", kind="unreachable", retryable=True)
                return self._error(str(cause), kind="blocked")
        return None

    def _transport_error(self, exc, method, path, *, unsure=None) -> ComfyUIError:
        guarded = self._guard_error(exc)
        if guarded is not None:
            return guarded
        if isinstance(exc, httpx.ConnectError) and not isinstance(exc, httpx.ConnectTimeout):
            return self._error(f"Cannot reach ComfyUI at {self.where}: {_connect_reason(exc)}", kind="unreachable", retryable=True)
        return super()._transport_error(exc, method, path, unsure=unsure)

    def _status_error(self, resp, method, path, *, read_body=True) -> ComfyUIError | None:
        status = resp.status_code
        if resp.headers.get("X-Portal-Placeholder", "").lower() == "true":
            return self._error(NOT_READY_MESSAGE, kind="not_ready", retryable=True, status=status)
        if status < 300:
            return None
        if status in (401, 403):
            return self._error(AUTH_MESSAGE, kind="auth", status=status)
        if status in (502, 503, 504) and "json" not in resp.headers.get("content-type", ""):
            return self._error(NOT_READY_MESSAGE, kind="not_ready", retryable=True, status=status)
        if status == 530:
            return self._error(
                f"Cannot reach ComfyUI at {self.where}: the tunnel is gone (HTTP 530); the tunnel URL may have expired",
                kind="unreachable", retryable=True, status=status,
            )
        body = snippet(resp.text) if read_body else ""
        message = f"ComfyUI answered HTTP {status} to {method} {path}" + (f": {body}" if body else "")
        return self._error(message, kind="http", status=status, retryable=status >= 500 or status == 429)

    def _request(self, method, path, *, idempotent, parse=None, none_on_404=False, **kwargs):
        """One call, retried with backoff when idempotent; parse(resp) runs inside the retry loop."""
        def check(resp):
            error = self._status_error(resp, method, path)
            if error is not None and none_on_404 and resp.status_code == 404 and error.kind == "http":
                return ACCEPT
            return error

        def parse_or_none(resp):
            if none_on_404 and resp.status_code == 404:
                return None
            return parse(resp) if parse is not None else resp

        return self._call(method, self._url(path), path=path, idempotent=idempotent, check=check, parse=parse_or_none, **kwargs)

    def _json(self, resp, method, path, expect=object):
        try:
            body = resp.json()
        except ValueError:
            kind = resp.headers.get("content-type", "no content type")
            # Retryable: a proxy cutting an answer short is worth another try on a GET.
            raise self._error(
                f"ComfyUI at {self.where} sent a non-JSON answer to {method} {path} ({kind}): {snippet(resp.text, 120)!r}; is this a ComfyUI URL?",
                kind="bad_response", retryable=True, status=resp.status_code,
            ) from None
        if not isinstance(body, expect):
            raise self._error(f"ComfyUI at {self.where} sent an unexpected answer to {method} {path}: {snippet(json.dumps(body), 120)}", kind="bad_response")
        return body

    def _get_json(self, path, params=None, *, expect=dict, none_on_404=False):
        return self._request(
            "GET", path, idempotent=True, params=params, none_on_404=none_on_404,
            parse=lambda resp: self._json(resp, "GET", path, expect),
        )

    # ------------------------------------------------------------------ API

    def system_stats(self) -> dict:
        body = self._get_json("/system_stats")
        if "system" not in body and "devices" not in body:
            raise self._error(f"{self.where} answered /system_stats, but not like ComfyUI", kind="bad_response")
        return body

    def object_info(self, node_class=None) -> dict:
        """GET /object_info, or /object_info/<class> ({class: info}, {} if unknown)."""
        path = "/object_info" if node_class is None else f"/object_info/{quote(node_class, safe='')}"
        return self._get_json(path)

    def models(self, folder) -> list[str] | None:
        """File names ComfyUI has in a model folder key; None when the key is unknown (404)."""
        return self._get_json(f"/models/{quote(folder, safe='')}", expect=list, none_on_404=True)

    def upload_image(self, data, filename, *, subfolder="i2v", overwrite=True) -> str:
        """Upload an input image; returns the value for LoadImage's `image` input."""
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form = {"overwrite": "true" if overwrite else "false", "subfolder": subfolder, "type": "input"}
        path = "/upload/image"
        resp = self._request_post(path, files={"image": (filename, data, content_type)}, data=form)
        body = self._json(resp, "POST", path, dict)
        if not isinstance(body.get("name"), str):
            raise self._error(f"ComfyUI sent an unexpected answer to POST {path}: {snippet(json.dumps(body), 120)}", kind="bad_response")
        sub = body.get("subfolder") or ""
        return f"{sub}/{body['name']}" if sub else body["name"]

    def _request_post(self, path, **kwargs) -> httpx.Response:
        try:
            return self._request("POST", path, idempotent=False, **kwargs)
        except ComfyUIError as exc:
            if exc.status == 413:
                raise self._error("The image is larger than ComfyUI's upload limit (--max-upload-size)", kind="http", status=413) from None
            if exc.status == 400 and path == "/upload/image":
                raise self._error("ComfyUI refused the upload (missing file or a bad file name)", kind="http", status=400) from None
            raise

    def submit(self, graph, *, prompt_id, client_id, output_node=None, extra_data=None) -> dict:
        """POST /prompt; never retried. Returns {"prompt_id", "number", "node_errors"}.

        Validation failures raise kind="validation". A 200 whose node_errors touch
        `output_node` (any node_errors when it is None) is a failure too: the rest
        of the graph was queued, so it is cancelled before raising.
        """
        payload = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data is not None:
            payload["extra_data"] = extra_data
        path = "/prompt"
        try:
            resp = self._http.request("POST", self._url(path), json=payload, headers=self._headers(), timeout=self._timeout)
        except httpx.HTTPError as exc:
            error = self._transport_error(exc, "POST", path)
            if error.kind == "timeout":
                error = self._error(
                    f"ComfyUI did not answer POST /prompt within {self.read_timeout}s; the prompt may or may not be queued (check the queue for {prompt_id})",
                    kind="timeout", retryable=True,
                )
            raise error from None
        if resp.status_code == 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and ("error" in body or "node_errors" in body):
                raise self._error(_validation_message(body), kind="validation", status=400, node_errors=body.get("node_errors") or {})
        error = self._status_error(resp, "POST", path)
        if error is not None:
            raise error
        body = self._json(resp, "POST", path, dict)
        if not isinstance(body.get("prompt_id"), str):
            raise self._error(f"ComfyUI sent an unexpected answer to POST /prompt: {snippet(json.dumps(body), 120)}", kind="bad_response")
        node_errors = body.get("node_errors") or {}
        if node_errors:
            touched = output_node is None or any(
                str(output_node) == str(node_id) or str(output_node) in [str(o) for o in (entry or {}).get("dependent_outputs") or []]
                for node_id, entry in node_errors.items()
            )
            if touched:
                with contextlib.suppress(ComfyUIError):
                    self.cancel(body["prompt_id"])
                raise self._error(_validation_message(body), kind="validation", status=resp.status_code, node_errors=node_errors)
        return body

    def history(self, prompt_id) -> dict | None:
        """The history entry of a finished prompt; None while pending, running or unknown."""
        body = self._get_json(f"/history/{quote(prompt_id, safe='')}")
        item = body.get(prompt_id)
        if item is None:
            if body:
                raise self._error(f"ComfyUI's /history/{prompt_id} answer does not contain that prompt", kind="bad_response")
            return None
        if not isinstance(item, dict):
            raise self._error(f"ComfyUI's /history/{prompt_id} entry is not an object", kind="bad_response")
        return item

    def queue(self) -> tuple[list[str], list[str]]:
        """(running prompt ids, pending prompt ids in the order they will run)."""
        body = self._get_json("/queue")
        running = body.get("queue_running", body.get("running", []))
        pending = body.get("queue_pending", body.get("pending", []))
        try:
            running_ids = [str(item[1]) for item in running]
            pending_sorted = sorted(pending, key=lambda item: float(item[0]))
            pending_ids = [str(item[1]) for item in pending_sorted]
        except (TypeError, IndexError, ValueError):
            raise self._error("ComfyUI sent an unexpected /queue answer", kind="bad_response") from None
        return running_ids, pending_ids

    def cancel(self, prompt_id) -> None:
        """Remove a pending prompt and interrupt it if it is running."""
        self._request("POST", "/queue", idempotent=False, json={"delete": [prompt_id]})
        try:
            running, _ = self.queue()
        except ComfyUIError:
            running = [prompt_id]  # unknown: a targeted interrupt is harmless on current servers
        if prompt_id in running:
            # Servers before 2025-09 ignore the body and interrupt whatever runs; hence the queue check.
            self._request("POST", "/interrupt", idempotent=False, json={"prompt_id": prompt_id})

    @contextlib.contextmanager
    def open_view(self, filename, subfolder, type="output", *, offset=0):
        """A streaming httpx.Response for /view; iterate resp.iter_bytes() inside the block.

        With `offset` > 0 it asks for the rest of the file from there (HTTP Range).
        """
        path = "/view"
        params = {"filename": filename, "subfolder": subfolder or "", "type": type}
        headers = self._headers()
        if offset:
            headers["Range"] = f"bytes={offset}-"

        def check(resp):
            error = self._status_error(resp, "GET", path, read_body=False)
            if error is None and offset and resp.status_code != 206:
                error = self._error(f"ComfyUI ignored the Range request for {filename}", kind="bad_response")
            if error is not None and resp.status_code == 404:
                error = self._error(f"Output file not found on ComfyUI: {subfolder + '/' if subfolder else ''}{filename} ({type})", kind="http", status=404)
            elif error is not None and resp.status_code in (400, 403):
                error = self._error(f"ComfyUI refused to serve {filename!r} from {type}/{subfolder} (HTTP {resp.status_code})", kind="http", status=resp.status_code)
            return error

        where = self._safe(f"{self.where}/view?{urlencode(params)}")
        with self._open_stream(self._url(path), where=where, check=check, headers=headers, params=params) as resp:
            yield resp

    def _ws_url(self, client_id) -> str:
        parts = urlsplit(self.base_url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path + "/ws", urlencode({"clientId": client_id}), ""))

    @contextlib.contextmanager
    def events(self, client_id, *, open_timeout=10):
        """Follow ComfyUI's websocket as `client_id`; yields an EventStream. Connect before submit()."""
        url = self._ws_url(client_id)
        where = f"{self.where}/ws"
        parts = urlsplit(self.base_url)
        try:
            # The socket goes to the address netguard checked; websockets does no lookup of its own
            # and, given a socket, follows no redirect (an unchecked hop).
            sock = netguard.connect_socket(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                           open_timeout)
        except netguard.BlockedURL as exc:
            raise self._guard_error(exc) from None
        except TimeoutError:
            raise self._error(f"Cannot open ComfyUI's websocket at {where}: no answer within {open_timeout}s", kind="unreachable", retryable=True) from None
        except OSError as exc:
            raise self._error(f"Cannot open ComfyUI's websocket at {where}: {_connect_reason(exc)}", kind="unreachable", retryable=True) from None
        try:
            connection = ws_connect(
                url,
                sock=sock,
                additional_headers=self._headers(),
                open_timeout=open_timeout,
                # aiohttp (ComfyUI's server) answers the close frame but leaves the TCP close to
                # the client; a short wait keeps a finished job from idling on the handshake.
                close_timeout=0.2,
                max_size=WS_MAX_MESSAGE,
                compression=None,
                user_agent_header="i2v",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            headers = exc.response.headers
            if (headers.get("X-Portal-Placeholder") or "").lower() == "true" or status in (502, 503, 504):
                raise self._error(NOT_READY_MESSAGE, kind="not_ready", retryable=True, status=status) from None
            if status in (401, 403):
                raise self._error(AUTH_MESSAGE, kind="auth", status=status) from None
            raise self._error(f"ComfyUI refused the websocket at {where} with HTTP {status}", kind="http", status=status, retryable=status >= 500) from None
        except TimeoutError:
            raise self._error(f"Cannot open ComfyUI's websocket at {where}: no answer within {open_timeout}s", kind="unreachable", retryable=True) from None
        except InvalidHandshake as exc:
            raise self._error(f"ComfyUI's websocket at {where} failed the handshake ({type(exc).__name__})", kind="bad_response", retryable=True) from None
        except ValueError:  # a redirect, which websockets does not follow on a given socket
            raise self._error(f"ComfyUI's websocket at {where} answered with a redirect; set the URL it redirects to", kind="bad_response") from None
        except ConnectionClosed:
            # The server closed the socket mid-handshake (restarting, or a proxy whose upstream is gone).
            raise self._error(f"ComfyUI at {where} dropped the connection during the websocket handshake",
                              kind="unreachable", retryable=True) from None
        except OSError as exc:
            raise self._error(f"Cannot open ComfyUI's websocket at {where}: {_connect_reason(exc)}", kind="unreachable", retryable=True) from None
        with connection:
            yield EventStream(connection, where)
