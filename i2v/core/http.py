"""The plumbing the ComfyUI, vast.ai and fal.ai clients share: one place for timeouts, retries
with backoff and jitter, which failures are worth another try, the mapping of transport
failures to the service's own error type, and failures part-way through a download.

Each client (gpu/comfyui.py, gpu/vastai.py, generation/fal.py) subclasses ServiceClient and
keeps only what is its own: paths, bodies, how the service words its errors, and its
rate-limit rules. Connections go through the outbound-connection guard each client names in
`guard` (gpu.netguard): i2v.core imports no app, so the guard is handed in, not imported.
"""

import contextlib
import email.utils
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Iterator

import httpx

ACCEPT = object()  # from a check(): this non-2xx answer is a valid one


class ServiceError(Exception):
    """A failed call, worded for a person; `kind` is for code to branch on.

    `retryable`: another try may succeed; `retry_after`: seconds the service asked us to wait."""

    def __init__(self, message: str, *, kind: str = "error", status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


def snippet(text, limit: int = 200) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit] + "…"


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def connect_reason(exc: BaseException) -> str:
    """Why a connection could not be made, in words: refused, DNS, TLS or timeout."""
    for cause in causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(cause, socket.gaierror):
            return "DNS lookup failed: the host name does not resolve"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, (TimeoutError, socket.timeout, httpx.TimeoutException)):
            return "connection timed out"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by the server"
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text or "name resolution" in text:
        return "DNS lookup failed: the host name does not resolve"
    if "ssl" in text or "certificate" in text or "tls" in text:
        return "TLS handshake failed"
    if "timed out" in text:
        return "connection timed out"
    return f"connection failed ({type(exc).__name__})"


def retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


class ServiceClient:
    """One service's HTTP client: subclasses set `service`, `error`, `guard` and `hint`, and may
    override `_headers`, `_secrets`, `_status_error`, `_before_request` and `_retry_delay`.

    `guard` is the outbound-connection guard: a module (gpu.netguard) with http_client(**kwargs),
    blocked_reason(exc) and StreamErrors(stream, make_error)."""

    service = "the service"
    guard = None  # as messages name it: "vast.ai", "fal.ai", "ComfyUI"
    error: type[ServiceError] = ServiceError
    hint = ""  # appended to "cannot connect" messages, e.g. " (check VASTAI_API_URL)"
    max_backoff = 8.0
    # A retried call's log level: WARNING, unless the caller logs the outage itself (ComfyUI's runner
    # warns once per outage, not on every try).
    retry_log_level = logging.WARNING

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 max_retry_wait: float = 30.0, http_client: httpx.Client | None = None):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        # A wait longer than this (a long Retry-After) is not sat out inside a call: the error says how long.
        self.max_retry_wait = max_retry_wait
        self._timeout = self.timeout(read_timeout)
        self._owns_http = http_client is None
        # Redirects are never followed by default: they would carry the credentials elsewhere.
        self._http = http_client if http_client is not None else self.guard.http_client(timeout=self._timeout, follow_redirects=False)
        self._sleep = time.sleep  # tests may replace it to observe waits

    def timeout(self, read: float) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_timeout, read=read, write=read, pool=self.connect_timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._owns_http:
            self._http.close()

    @property
    def where(self) -> str:
        return ""

    def __repr__(self):
        return f"<{type(self).__name__} {self.where}>"

    # ------------------------------------------------------------------ to override

    def _headers(self) -> dict:
        return {}

    def _secrets(self) -> list[str]:
        """Values that must never reach a message (API keys, tokens)."""
        return []

    def _status_error(self, resp: httpx.Response, method: str, path: str) -> ServiceError | None:
        if resp.status_code < 300:
            return None
        status = resp.status_code
        return self._error(f"{self.service} answered HTTP {status} to {method} {path}: {snippet(resp.text)}", kind="http",
                           status=status, retryable=status >= 500 or status == 429)

    def _before_request(self, method: str, path: str) -> None:
        """Called before every attempt (vast.ai spaces its calls here)."""

    def _retry_delay(self, error: ServiceError, attempt: int, *, backoff: float | None = None,
                     max_backoff: float | None = None) -> float | None:
        """Seconds before the next try: exponential backoff with jitter, at least what the service asked
        for; None when that is longer than max_retry_wait."""
        delay = min((backoff or self.backoff) * (2**attempt), max_backoff or self.max_backoff) * random.uniform(0.5, 1.5)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return None if delay > self.max_retry_wait else delay

    # ------------------------------------------------------------------ shared

    def _safe(self, text: str) -> str:
        for secret in self._secrets():
            if secret and len(secret) >= 4 and secret in text:
                text = text.replace(secret, "***")
        return text

    def _error(self, message: str, **kwargs) -> ServiceError:
        return self.error(self._safe(message), **kwargs)

    def _transport_error(self, exc: httpx.HTTPError, method: str, path: str, *, unsure: str | None = None) -> ServiceError:
        """A connection failure as the service's error. `unsure` (for calls that are not idempotent) is
        what to say when the request may have arrived: such a failure is never retryable."""
        reason = self.guard.blocked_reason(exc)
        if reason is not None:
            return self._error(f"Cannot reach {self.service} at {self.where}: {reason}{self.hint}", kind="unreachable")
        if isinstance(exc, httpx.ConnectTimeout):
            return self._error(f"Cannot reach {self.service} at {self.where}: connection timed out after {self.connect_timeout}s",
                               kind="unreachable", retryable=True)
        if isinstance(exc, httpx.ConnectError):
            return self._error(f"Cannot reach {self.service} at {self.where}: {connect_reason(exc)}{self.hint}",
                               kind="unreachable", retryable=True)
        timed_out = isinstance(exc, httpx.TimeoutException)
        read_timeout = self._read_timeout_of(exc)
        if unsure is not None:
            what = f"did not answer within {read_timeout}s" if timed_out else f"dropped the connection ({type(exc).__name__})"
            return self._error(f"{self.service} {what} during {method} {path}; {unsure}", kind="timeout" if timed_out else "unreachable")
        if timed_out:
            return self._error(f"{self.service} did not answer {method} {path} within {read_timeout}s", kind="timeout",
                               retryable=True)
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return self._error(f"{self.service} at {self.where} dropped the connection during {method} {path}",
                               kind="unreachable", retryable=True)
        return self._error(f"Cannot talk to {self.service} at {self.where}: {type(exc).__name__}", kind="unreachable", retryable=True)

    def _read_timeout_of(self, exc: httpx.HTTPError) -> float:
        """The read timeout the failed request had (a call may have its own, e.g. vast.ai's create)."""
        try:
            return exc.request.extensions["timeout"]["read"]
        except (RuntimeError, KeyError, TypeError):
            return self.read_timeout

    def _call(self, method: str, url: str, *, path: str, idempotent: bool = True, check=None, parse=None, unsure: str | None = None,
              timeout: httpx.Timeout | None = None, headers: dict | None = None, attempts: int | None = None, retry_delay=None,
              **kwargs):
        """One call, tried again after a retryable failure when `idempotent`.

        check(resp) may return an error for a non-2xx answer it understands better, or ACCEPT
        for a non-2xx answer that is a valid one. parse(resp) runs inside the retry loop, so a
        cut-short answer to an idempotent call is tried again. A call that is not idempotent is
        tried again only after an error that says it was not acted on (e.g. a refused connection),
        up to `attempts` times, waiting retry_delay(error, attempt) seconds.
        """
        attempts = attempts or 1 + (self.retries if idempotent else 0)
        retry_delay = retry_delay or self._retry_delay
        for attempt in range(attempts):
            self._before_request(method, path)
            try:
                resp = self._http.request(method, url, headers={**self._headers(), **(headers or {})},
                                          timeout=timeout or self._timeout, **kwargs)
            except httpx.HTTPError as exc:
                error = self._transport_error(exc, method, path, unsure=None if idempotent else unsure)
            else:
                error = check(resp) if check else None
                if error is None:
                    error = self._status_error(resp, method, path)
                if error is None or error is ACCEPT:
                    if parse is None:
                        return resp
                    try:
                        return parse(resp)
                    except ServiceError as exc:
                        error = exc
            if not error.retryable or attempt == attempts - 1:
                raise error
            delay = retry_delay(error, attempt)
            if delay is None:
                raise error
            logging.getLogger(type(self).__module__).log(self.retry_log_level, "%s %s %s failed (%s); retry %d/%d in %.2fs", self.service, method, path, error, attempt + 1,
                        attempts - 1, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _open_stream(self, url: str, *, where: str, check, follow_redirects: bool = False, headers: dict | None = None,
                     params: dict | None = None):
        """A streaming response (iterate resp.iter_bytes() inside the block), retried until the body starts.

        check(resp) returns the error for an answer that is not the file (the response is then closed).
        A failure part-way through the body becomes the service's error (kind timeout or unreachable)."""
        attempts = 1 + self.retries
        for attempt in range(attempts):
            resp = None
            try:
                request = self._http.build_request("GET", url, params=params, headers=headers, timeout=self._timeout)
                resp = self._http.send(request, stream=True, follow_redirects=follow_redirects)
            except httpx.HTTPError as exc:
                error = self._transport_error(exc, "GET", where)
            else:
                error = check(resp)
                if error is not None:
                    resp.close()
            if error is None:
                break
            delay = self._retry_delay(error, attempt) if error.retryable and attempt < attempts - 1 else None
            if delay is None:
                raise error
            logging.getLogger(type(self).__module__).log(self.retry_log_level, "%s download %s failed (%s), retrying", self.service, where, error)
            self._sleep(delay)

        def mid_download_error(what, exc):
            if what == "stalled":
                return self._error(f"Download from {where} stalled: no data for {self.read_timeout}s", kind="timeout", retryable=True)
            return self._error(f"Download from {where} was interrupted ({snippet(str(exc), 120) or type(exc).__name__})",
                               kind="unreachable", retryable=True)

        resp.stream = self.guard.StreamErrors(resp.stream, mid_download_error)
        try:
            yield resp
        finally:
            resp.close()
