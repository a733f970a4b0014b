"""An HTTP/1.1-aware TCP proxy on 127.0.0.1 that injects faults into the requests it forwards to
a real HTTP server (moto's S3 server), for tests of what a client does when that server fails.

    with FaultyHttpProxy(s3_url) as proxy:
        proxy.cut("PUT", "/videos/videos/*", after=1 << 20)            # once: reset mid-body
        proxy.fail("PUT", "/videos/*", status=503, times=None,          # every time
                   query={"partNumber": "2"})
        ...point the client at proxy.url...
        proxy.wait_for(lambda p: len(p.seen("PUT")) >= 2)

Faults (each rule is used by `times` matching requests, forever with `times=None`; the first
rule that matches a request applies):

- ``cut(method, pattern, after=N)``: forward the request head and the first N bytes of its
  body to the server, then reset both connections (the client sees "connection reset" while
  sending, the server an incomplete body): a network drop or a server crash mid-upload.
- ``fail(method, pattern, status=500)``: answer the request with that status and an S3 error
  document (``InternalError`` / ``ServiceUnavailable``) without forwarding it, then close the
  connection. A request sent with ``Expect: 100-continue`` is answered before its body is sent,
  as a real server refusing a request does.

``pattern`` is an fnmatch pattern on the path (without the query string); ``query`` is a dict
of query parameters the request must carry (a value of None matches any value).

Requests are parsed one at a time on each client connection (``Content-Length`` bodies;
HTTP/1.1 keep-alive works), and the server's answers are relayed byte for byte.

Observation: ``requests`` (every request: ``Seen(method, path, query, fault)``, fault being
None, ``"cut"`` or the status answered), ``seen(method=None, pattern="*", fault=...)``,
``wait_for(predicate)``.
"""

import asyncio
import fnmatch
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from tests.doubles.base import StreamServer

ERROR_CODES = {500: ("InternalError", "We encountered an internal error. Please try again."),
               502: ("BadGateway", "Bad Gateway"),
               503: ("ServiceUnavailable", "Please reduce your request rate."),
               504: ("GatewayTimeout", "Gateway Timeout")}
REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
ANY = object()  # `fault=ANY` in seen(): every request, faulted or not


@dataclass
class Rule:
    method: str | None
    pattern: str
    query: dict | None
    action: str  # "cut" | "fail"
    after: int = 0
    status: int = 500
    times: int | None = 1
    hits: int = 0

    def matches(self, method, path, query) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in (None, method) or not fnmatch.fnmatchcase(path, self.pattern):
            return False
        for key, value in (self.query or {}).items():
            if key not in query or (value is not None and query[key] != str(value)):
                return False
        return True


@dataclass
class Seen:
    method: str
    path: str
    query: dict
    fault: object = None  # None, "cut", or the status answered
    at: float = field(default_factory=time.monotonic)


class FaultyHttpProxy(StreamServer):
    def __init__(self, upstream_url, host="127.0.0.1"):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port or 80)
        self.host = host
        self.port = None
        self.requests: list[Seen] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ test-facing

    def cut(self, method, pattern, *, after, times=1, query=None) -> Rule:
        """Reset the connection after `after` bytes of the body of the next `times` matching requests."""
        return self._add(Rule(method, pattern, query, "cut", after=int(after), times=times))

    def fail(self, method, pattern, *, status=500, times=1, query=None) -> Rule:
        """Answer the next `times` matching requests with `status` (an S3 error document)."""
        return self._add(Rule(method, pattern, query, "fail", status=int(status), times=times))

    def clear(self):
        """Forget every rule: requests pass untouched from now on."""
        with self._lock:
            self._rules.clear()

    def seen(self, method=None, pattern="*", fault=ANY, query=None) -> list[Seen]:
        with self._lock:
            requests = list(self.requests)
        probe = Rule(method, pattern, query, "observe", times=None)
        return [r for r in requests if probe.matches(r.method, r.path, r.query) and (fault is ANY or r.fault == fault)]

    # ------------------------------------------------------------------ plumbing

    def _add(self, rule):
        with self._lock:
            self._rules.append(rule)
        return rule

    def _take(self, method, path, query):
        """The rule applying to this request (used up by one), recorded with the request."""
        with self._lock:
            rule = next((r for r in self._rules if r.matches(method, path, query)), None)
            if rule is not None:
                rule.hits += 1
            fault = None if rule is None else ("cut" if rule.action == "cut" else rule.status)
            self.requests.append(Seen(method, path, query, fault))
        return rule

    async def _handle(self, reader, writer):
        up_writer = None
        pump = None
        graceful = False
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return  # the client closed its connection (or sent garbage)
                method, target, headers = _parse_head(head)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    raise NotImplementedError("FaultyHttpProxy: chunked request bodies are not supported")
                length = int(headers.get("content-length", "0") or 0)
                parts = urlsplit(target)
                rule = self._take(method, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)))
                if rule is not None and rule.action == "fail":
                    if headers.get("expect", "").lower() != "100-continue":
                        await reader.readexactly(length)
                    writer.write(_error_response(rule.status, parts.path))
                    await writer.drain()
                    graceful = True
                    return
                if up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(*self.upstream)
                    pump = asyncio.ensure_future(self._pump(up_reader, writer))
                up_writer.write(head)
                todo = min(length, rule.after) if rule is not None else length
                while todo > 0:
                    chunk = await reader.read(min(65536, todo))
                    if not chunk:
                        return
                    up_writer.write(chunk)
                    await up_writer.drain()
                    todo -= len(chunk)
                await up_writer.drain()
                if rule is not None:  # a cut: both sides see a reset mid-body
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if pump is not None:
                pump.cancel()
            if up_writer is not None:
                up_writer.transport.abort()
            if graceful:
                writer.close()  # flushes the error answer, then FIN
            else:
                writer.transport.abort()

    @staticmethod
    async def _pump(reader, writer):
        """Relay the server's answers to the client; the server closing closes the client's side."""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()


def _parse_head(head: bytes):
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _error_response(status: int, path: str) -> bytes:
    code, message = ERROR_CODES.get(status, ("InternalError", "Injected failure"))
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
        "<RequestId>faulty-proxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body
