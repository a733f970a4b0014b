"""The one client for fal.ai's queue REST API (fal's queue API: docs.fal.ai, and fal-client's own source).

Plain httpx rather than the `fal-client` package: the queue API is four calls
(submit, status, result, cancel) plus a download, so the package would add a
dependency (httpx-sse, msgpack, websockets, aiofiles, asyncstdlib) for little; and
calling it ourselves keeps explicit connect/read timeouts, our own bounded retries,
the SSRF guard (gpu.netguard) and a streaming download of the video into storage.

Every failure is a FalError whose str() a person can act on and whose `kind` code
can branch on. The API key goes only to the queue host, never to the CDN that
serves outputs, and never into a message or a log line.
"""

import contextlib
import json
import logging
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import urlsplit

from gpu import netguard
from i2v.core.http import ACCEPT, ServiceClient, ServiceError, retry_after, snippet

log = logging.getLogger(__name__)

WAN_I2V = "fal-ai/wan/v2.2-a14b/image-to-video"
WAN_I2V_TURBO = "fal-ai/wan/v2.2-a14b/image-to-video/turbo"

# providers.md §2.1, from fal's llms.txt pages as stored; fal may have changed them since.
PRICES = {
    WAN_I2V: {"per": "video_second", "fps": 16, "usd": {"720p": Decimal("0.08"), "580p": Decimal("0.06"), "480p": Decimal("0.04")}},
    WAN_I2V_TURBO: {"per": "video", "usd": {"720p": Decimal("0.10"), "580p": Decimal("0.075"), "480p": Decimal("0.05")}},
}
PRICES_TAKEN = "2026-08"

RESOLUTIONS = (("480p", 480), ("580p", 580), ("720p", 720))
DEFAULT_RESOLUTION = "720p"  # fal's default when none is sent
DEFAULT_FRAMES = 81
FRAMES_RANGE = (17, 161)
FPS_RANGE = (4, 60)
ASPECT_RATIOS = (("1:1", 1.0), ("16:9", 16 / 9), ("9:16", 9 / 16))
STATUSES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
CANCEL_ANSWERS = ("OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND")
# Hosts the key may be sent to besides base_url's: fal's queue domains and its fallback.
TRUSTED_SUFFIXES = ("fal.run", "falrun.com", "fal.ai")
AUTH_MESSAGE = "fal.ai rejected the API key (HTTP {status}): check FAL_KEY (key id:secret from fal.ai/dashboard/keys)"


class FalError(ServiceError):
    """kind: auth, invalid, unreachable, timeout, failed, not_found, bad_response, http.

    `fields` names the input fields fal complained about (kind invalid or failed);
    `error_type` is fal's x-fal-error-type when it sent one.
    """

    def __init__(self, message, *, fields=(), error_type=None, **kwargs):
        super().__init__(message, **kwargs)
        self.fields = tuple(fields)
        self.error_type = error_type


# ---------------------------------------------------------------------- inputs and cost


def resolution_for(width, height) -> str:
    """The smallest fal resolution whose height covers the shorter side (720p at most)."""
    if not width or not height:
        return DEFAULT_RESOLUTION
    short = min(int(width), int(height))
    for name, pixels in RESOLUTIONS:
        if short <= pixels:
            return name
    return RESOLUTIONS[-1][0]


def _aspect_ratio(width, height) -> str:
    """fal's aspect_ratio when width:height is one it offers; "auto" keeps the image's own."""
    if not width or not height:
        return "auto"
    ratio = int(width) / int(height)
    for name, value in ASPECT_RATIOS:
        if abs(ratio - value) / value < 0.02:
            return name
    return "auto"


def _price(endpoint) -> dict:
    try:
        return PRICES[endpoint]
    except KeyError:
        raise ValueError(f"No price known for fal endpoint {endpoint!r}; known: {', '.join(PRICES)}") from None


def estimate_cost(endpoint, width, height, frames) -> Decimal:
    """USD for one video, from PRICES (taken PRICES_TAKEN); the base endpoint bills video
    seconds counted at 16 fps whatever fps is asked for, turbo bills per video."""
    price = _price(endpoint)
    rate = price["usd"][resolution_for(width, height)]
    if price["per"] == "video":
        return rate
    seconds = Decimal(frames or DEFAULT_FRAMES) / Decimal(price["fps"])
    return (seconds * rate).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def _check_range(name, value, low, high, what):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FalError(f"fal.ai needs {what} between {low} and {high} (got {value!r})", kind="invalid", fields=(name,))


def build_input(*, image_url, prompt, negative_prompt="", frames=None, fps=None, width=None, height=None, seed=None, endpoint=WAN_I2V) -> dict:
    """The fal input for a job. Values fal would refuse raise FalError(kind="invalid")
    here, because fal charges for requests that fail its validation."""
    if not image_url:
        raise FalError("fal.ai needs an image URL it can download (e.g. a presigned storage URL)", kind="invalid", fields=("image_url",))
    if not prompt:
        raise FalError("fal.ai needs a prompt", kind="invalid", fields=("prompt",))
    _price(endpoint)  # an unknown endpoint is a programming error, not a fal refusal
    arguments = {"image_url": image_url, "prompt": prompt}
    if width and height:
        arguments["resolution"] = resolution_for(width, height)
        arguments["aspect_ratio"] = _aspect_ratio(width, height)
    if seed is not None:
        arguments["seed"] = int(seed)
    if endpoint == WAN_I2V_TURBO:
        return arguments  # turbo takes no negative prompt, frame count or fps
    _check_range("frames", frames, *FRAMES_RANGE, "a frame count")
    _check_range("fps", fps, *FPS_RANGE, "frames per second")
    if negative_prompt:
        arguments["negative_prompt"] = negative_prompt
    if frames is not None:
        arguments["num_frames"] = frames
    if fps is not None:
        arguments["frames_per_second"] = fps
    return arguments


# ---------------------------------------------------------------------- helpers


def _field(item) -> str:
    loc = [str(part) for part in (item.get("loc") or []) if part != "body"]
    return ".".join(loc)


def describe_detail(detail) -> tuple[str, tuple]:
    """fal's {"detail": ...} as one line, plus the field names it mentions."""
    if isinstance(detail, list):
        parts, fields = [], []
        for item in detail:
            if not isinstance(item, dict):
                parts.append(snippet(str(item), 120))
                continue
            name = _field(item)
            msg = item.get("msg") or item.get("type") or "invalid"
            if item.get("type") == "content_policy_violation":
                msg += " [content_policy_violation]"
            parts.append(f"{name}: {msg}" if name else msg)
            if name:
                fields.append(name)
        return "; ".join(parts) or "no details", tuple(dict.fromkeys(fields))
    if isinstance(detail, dict):
        return snippet(json.dumps(detail), 300), ()
    return snippet(str(detail), 300), ()


def _body_detail(resp):
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("detail") if isinstance(body, dict) else None


# ---------------------------------------------------------------------- client


class FalClient(ServiceClient):
    service = "fal.ai"
    error = FalError
    guard = netguard
    hint = "; check the network or FAL_QUEUE_URL"
    # fal-client's own rules for a submit fal did not queue: 408, 409 and 429 mean "try again",
    # up to 10 times, from 0.1 s doubling to at most 30 s, with jitter.
    SUBMIT_RETRY_STATUSES = (408, 409, 429)
    SUBMIT_ATTEMPTS = 10

    def __init__(self, key, base_url="https://queue.fal.run", *, connect_timeout=5.0, read_timeout=30.0, retries=3, backoff=0.5,
                 submit_backoff=0.1):
        if not key:
            raise FalError("fal.ai is not configured: set FAL_KEY to an API key from fal.ai/dashboard/keys", kind="auth")
        self._key = key
        self.base_url = base_url.rstrip("/")
        self.submit_backoff = submit_backoff
        super().__init__(connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries, backoff=backoff)

    @property
    def where(self) -> str:
        return self.base_url

    # ------------------------------------------------------------------ plumbing

    def _headers(self) -> dict:
        return {"Authorization": f"Key {self._key}", "Accept": "application/json"}

    def _secrets(self) -> list[str]:
        return [self._key, *self._key.split(":")]

    def _check_queue_url(self, url, what) -> str:
        """Only send the key to the queue host (or fal's own domains); the URL may come from a database row."""
        try:
            parts = urlsplit(url)
        except (ValueError, TypeError):
            parts = None
        base = urlsplit(self.base_url)
        host = (parts.hostname or "") if parts else ""
        same = parts is not None and (parts.scheme, parts.netloc) == (base.scheme, base.netloc)
        fal = parts is not None and parts.scheme == "https" and any(host == s or host.endswith("." + s) for s in TRUSTED_SUFFIXES)
        if not (same or fal):
            raise self._error(f"Refusing to send the fal.ai key to {what} {snippet(str(url), 120)!r}: not a fal.ai queue URL", kind="bad_response")
        return url

    def _status_error(self, resp, method, where) -> FalError | None:
        status = resp.status_code
        if status < 300:
            return None
        detail = _body_detail(resp)
        text, fields = describe_detail(detail) if detail is not None else (snippet(resp.text), ())
        if status in (401, 403):
            return self._error(AUTH_MESSAGE.format(status=status) + (f": {text}" if text else ""), kind="auth", status=status)
        if status == 404:
            return self._error(f"fal.ai has nothing at {method} {where} (HTTP 404){': ' + text if text else ''}", kind="not_found", status=404)
        if status == 429:
            return self._error("fal.ai is rate limiting this key (HTTP 429); try again shortly", kind="http", status=429, retryable=True,
                               retry_after=retry_after(resp.headers))
        message = f"fal.ai answered HTTP {status} to {method} {where}" + (f": {text}" if text else "")
        return self._error(message, kind="http", status=status, retryable=status >= 500, fields=fields)

    def _request(self, method, url, *, check=None, parse=None, **kwargs):
        """An idempotent call, retried with backoff on timeouts, dropped connections and 5xx/429."""
        return self._call(method, url, path=urlsplit(url).path, check=check, parse=parse, **kwargs)

    def _json(self, resp, what, *, retryable=True) -> dict:
        try:
            body = resp.json()
        except ValueError:
            # Retryable: a proxy cutting an answer short is worth another try on a GET.
            raise self._error(
                f"fal.ai sent a non-JSON answer to {what}: {snippet(resp.text, 120)!r}; is FAL_QUEUE_URL a fal.ai queue URL?",
                kind="bad_response", status=resp.status_code, retryable=retryable,
            ) from None
        if not isinstance(body, dict):
            raise self._error(f"fal.ai sent an unexpected answer to {what}: {snippet(json.dumps(body), 120)}", kind="bad_response")
        return body

    # ------------------------------------------------------------------ API

    def submit(self, endpoint, arguments, *, webhook_url=None, start_timeout: int | None = None) -> dict:
        """Queue a request. Tried again only when fal says it did not queue it (408, 409, 429, as
        fal-client does) or the connection was never made: any other retry could pay twice.

        `start_timeout`: seconds fal may keep the request queued before giving up on it (as
        fal-client's start_timeout), so inputs given by a URL can be made to outlive it.
        Returns {"request_id", "status_url", "response_url", "cancel_url"}: store the
        URLs and use them as they are; they drop the endpoint's sub-path.
        """
        endpoint = endpoint.strip("/")
        headers = {}
        if start_timeout:
            headers = {"X-Fal-Request-Timeout": str(int(start_timeout)), "X-Fal-Request-Timeout-Type": "user"}
        url = f"{self.base_url}/{endpoint}"
        where = f"/{endpoint}"
        params = {"fal_webhook": webhook_url} if webhook_url else None

        def check(resp):
            status = resp.status_code
            if status == 422:
                text, fields = describe_detail(_body_detail(resp))
                return self._error(f"fal.ai rejected the input for {endpoint}: {text}", kind="invalid", status=422, fields=fields)
            if status == 404:
                return self._error(f"fal.ai has no endpoint {endpoint!r} (HTTP 404): check the endpoint id", kind="not_found", status=404)
            error = self._status_error(resp, "POST", where)
            if error is not None:
                error.retryable = status in self.SUBMIT_RETRY_STATUSES  # not queued; anything else may have been
                if error.retryable and status != 429:
                    error.message = f"fal.ai did not queue the request (HTTP {status}); try again shortly"
            return error

        resp = self._call(
            "POST", url, path=where, idempotent=False, json=arguments, params=params, check=check, headers=headers,
            unsure="it may or may not be queued (check fal.ai/dashboard/requests before submitting again)",
            attempts=self.SUBMIT_ATTEMPTS,
            retry_delay=lambda error, attempt: self._retry_delay(error, attempt, backoff=self.submit_backoff, max_backoff=30.0),
        )
        body = self._json(resp, f"POST {where}", retryable=False)  # it may have been queued
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise self._error(f"fal.ai's answer to POST {where} has no request_id: {snippet(json.dumps(body), 120)}", kind="bad_response")
        # Status, result and cancel live under {owner}/{alias} only; built only if fal left one out.
        fallback = f"{self.base_url}/{'/'.join(endpoint.split('/')[:2])}/requests/{request_id}"
        out = {"request_id": request_id}
        for name, default in (("status_url", fallback + "/status"), ("response_url", fallback), ("cancel_url", fallback + "/cancel")):
            value = body.get(name)
            out[name] = value if isinstance(value, str) and value else default
        return out

    def status(self, status_url) -> dict:
        """{"status": IN_QUEUE | IN_PROGRESS | COMPLETED, "queue_position", "logs", "metrics",
        "error", "error_type", ...} as fal sent it; a COMPLETED one may carry an error."""
        self._check_queue_url(status_url, "status URL")
        body = self._request("GET", status_url, params={"logs": "1"}, parse=lambda resp: self._json(resp, "the status request"))
        if body.get("status") not in STATUSES:
            raise self._error(f"fal.ai sent an unknown request status: {snippet(json.dumps(body), 120)}", kind="bad_response")
        return body

    def result(self, response_url) -> dict:
        """The model output, e.g. {"video": {"url", "content_type", "file_name", "file_size"}, "seed", "prompt"}.

        A request that failed raises kind="failed" with fal's message.
        """
        self._check_queue_url(response_url, "result URL")

        def check(resp):
            status = resp.status_code
            if status < 300 or status in (401, 403, 404, 429) or (status >= 500 and "x-fal-error-type" not in resp.headers):
                return None  # the generic handling (5xx without an error type is the gateway: retried)
            detail = _body_detail(resp)
            if status == 400 and isinstance(detail, str) and "in progress" in detail.lower():
                return self._error("The fal.ai result is not ready yet: poll status() until it is COMPLETED", kind="http", status=400)
            text, fields = describe_detail(detail) if detail is not None else (snippet(resp.text), ())
            error_type = resp.headers.get("x-fal-error-type")
            message = f"fal.ai could not generate the video: {text}" + (f" [{error_type}]" if error_type else "")
            return self._error(message, kind="failed", status=status, fields=fields, error_type=error_type)

        return self._request("GET", response_url, check=check, parse=lambda resp: self._json(resp, "the result request"))

    def cancel(self, cancel_url) -> str:
        """Ask fal to cancel; returns CANCELLATION_REQUESTED, ALREADY_COMPLETED, NOT_FOUND or OK."""
        self._check_queue_url(cancel_url, "cancel URL")

        def check(resp):
            body = self._maybe_json(resp)
            # ALREADY_COMPLETED (400) and NOT_FOUND (404) are answers, not failures.
            if resp.status_code in (400, 404) and isinstance(body, dict) and body.get("status") in CANCEL_ANSWERS:
                return ACCEPT
            return None

        resp = self._request("PUT", cancel_url, check=check)
        body = self._maybe_json(resp)
        answer = body.get("status") if isinstance(body, dict) else None
        if answer not in CANCEL_ANSWERS:
            raise self._error(f"fal.ai sent an unexpected answer to the cancel request: {snippet(resp.text, 120)!r}", kind="bad_response", status=resp.status_code)
        return answer

    @staticmethod
    def _maybe_json(resp):
        try:
            return resp.json()
        except ValueError:
            return None

    @contextlib.contextmanager
    def open_download(self, url):
        """A streaming httpx.Response for an output file; iterate resp.iter_bytes() inside the block.

        Sent without the API key (outputs are public CDN URLs), through the SSRF guard,
        and retried until the body starts arriving.
        """
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]  # never log credentials embedded in a URL
        where = f"{parts.scheme}://{host}{parts.path}"
        def check(resp):
            status = resp.status_code
            if status < 300:
                return None
            if status in (403, 404, 410):
                return self._error(f"The fal.ai video at {where} is gone (HTTP {status}); outputs expire, so copy them promptly", kind="not_found", status=status)
            return self._error(f"Downloading the fal.ai video from {where} failed with HTTP {status}", kind="http", status=status, retryable=status >= 500 or status == 429)

        with self._open_stream(url, where=where, check=check, follow_redirects=True) as resp:
            yield resp

