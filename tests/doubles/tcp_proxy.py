"""A TCP proxy on 127.0.0.1 that can play a server restart, for tests that cut a process off
from a real server (PostgreSQL) without touching the server itself.

    with TcpProxy("127.0.0.1", 5432) as proxy:
        ...point one process at 127.0.0.1:{proxy.port}...
        proxy.cut()       # every proxied connection dropped, new ones refused
        proxy.wait_for(lambda p: p.refused >= 2)
        proxy.restore()   # connections accepted again

`cut()` is what clients see while a database restarts: open connections end abruptly (the
server's sockets are gone) and new connections are closed as soon as they are made. The
proxy keeps listening while cut, so it can count those attempts (`refused`): a test can wait
for "the client tried and failed" instead of for a length of time.

Observation: `accepted` (connections proxied in all), `refused` (connections closed at once
while cut), `active` (connections open now), `cut_connections` (connections `cut()` dropped).
"""

import asyncio
import threading

from tests.doubles.base import StreamServer


class TcpProxy(StreamServer):
    def __init__(self, upstream_host, upstream_port, host="127.0.0.1"):
        self.upstream = (upstream_host, int(upstream_port))
        self.host = host
        self.port = None
        self.accepted = 0
        self.refused = 0
        self.cut_connections = 0
        self._down = False
        self._pairs = set()  # (client writer, upstream writer)

    # ------------------------------------------------------------------ test-facing

    @property
    def active(self):
        return self._call(lambda: len(self._pairs))

    def cut(self):
        """Drop every proxied connection now and close new ones at once, until restore()."""

        def do():
            self._down = True
            self.cut_connections += len(self._pairs)
            self._abort_all()

        self._call(do)

    def restore(self):
        """Proxy new connections again."""
        self._call(lambda: setattr(self, "_down", False))

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn, timeout=10):
        done = threading.Event()
        result = []

        def wrapper():
            try:
                result.append(fn())
            finally:
                done.set()

        self._loop.call_soon_threadsafe(wrapper)
        if not done.wait(timeout):
            raise TimeoutError("TcpProxy: the proxy loop did not answer")
        return result[0] if result else None

    def _on_stop(self):
        self._abort_all()

    def _abort_all(self):
        for client, upstream in list(self._pairs):
            for writer in (client, upstream):
                writer.transport.abort()  # a reset, not a clean close: the peer process is gone
        self._pairs.clear()

    async def _handle(self, reader, writer):
        if self._down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        if self._down:  # cut while connecting upstream
            self.refused += 1
            for w in (writer, up_writer):
                w.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    @staticmethod
    async def _pump(reader, writer):
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
            # Half-close politely when the other side ended cleanly; the peer pump ends the pair.
            if not writer.transport.is_closing():
                try:
                    writer.write_eof()
                except (OSError, RuntimeError):
                    writer.transport.abort()
