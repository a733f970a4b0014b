"""What every test double shares: an aiohttp app on 127.0.0.1 (a free port) served from a
background thread with its own asyncio loop, started and stopped from the test thread."""

import asyncio
import fnmatch
import random
import socket
import threading
import time
from dataclasses import dataclass, field

PATTERN_LEN = 65521  # prime, so the filler never lines up with power-of-two chunk sizes
_PATTERN = random.Random(20251011).randbytes(PATTERN_LEN) * 2



@dataclass
class RecordedRequest:
    """One request a double received, for tests to assert on."""

    method: str
    path: str
    query: dict
    headers: object  # a case-insensitive multidict
    at: float = field(default_factory=time.monotonic)


def generated_bytes(head: bytes, offset: int, n: int) -> bytes:
    """Bytes [offset, offset+n) of a large output made of `head` (a real small file) followed by
    a deterministic filler: big outputs are generated while streaming, never held in memory."""
    out = bytearray()
    if offset < len(head):
        out += head[offset:offset + n]
        offset += len(out)
        n -= len(out)
    while n > 0:
        p = (offset - len(head)) % PATTERN_LEN
        take = min(n, PATTERN_LEN)
        out += _PATTERN[p:p + take]
        offset += take
        n -= take
    return bytes(out)


class LoopServer:
    """Subclasses implement `async _astart()` (build the app, call `_serve(app)`) and `async _astop()`."""

    name = "double"
    url_suffix = ""  # appended to http://127.0.0.1:PORT by `url`

    _loop = None
    _thread = None
    _runner = None
    _sock = None
    port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.url_suffix}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        started = threading.Event()
        failure = []

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:  # surface startup failures in the test thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._astop())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self):
        if self._loop is None or self._thread is None:
            return
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            self._loop.call_soon_threadsafe(stopping.set)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    async def _serve(self, app, **runner_kwargs):
        from aiohttp import web

        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, **runner_kwargs)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _astart(self):
        raise NotImplementedError

    async def _astop(self):
        await self._runner.cleanup()

    def _take_fail_rule(self, path, method):
        """The next `fail_http` rule matching this request, used up by one; None if none matches.
        Subclasses keep `self._fail_rules` (a list of dicts) under `self._lock`."""
        with self._lock:
            for rule in self._fail_rules:
                if rule["times"] > 0 and fnmatch.fnmatchcase(path, rule["pattern"]) and rule["method"] in (None, method):
                    rule["times"] -= 1
                    return rule
        return None

    def _call(self, fn, timeout=10):
        """Run fn() on the server loop and return its result (thread-safe state access)."""
        if threading.current_thread() is self._thread:
            return fn()

        async def wrapper():
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)


class StreamServer:
    """A raw asyncio stream server on 127.0.0.1 (a free port) run from a background thread: the
    lifecycle the TCP and HTTP fault proxies share. Subclasses define `async _handle(reader,
    writer)` and may override `_on_stop()` (called in the loop as it stops)."""

    host = "127.0.0.1"
    port = None
    _loop = None
    _server = None
    _thread = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        started = threading.Event()
        failure = []

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, 0))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            self._server.close()
            self._on_stop()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name=type(self).__name__, daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self):
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def _on_stop(self):
        pass

    def wait_for(self, predicate, timeout=10.0, interval=0.01):
        """Wait until predicate(self) holds (a condition with a deadline, not a pause)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{type(self).__name__}.wait_for: condition not met")
            time.sleep(interval)
