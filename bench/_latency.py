"""A TCP proxy on 127.0.0.1 that delays what it forwards by a fixed time each way: a GPU that far
away (a vast.ai tunnel is tens of milliseconds off), for the benchmarks that drive ComfyUI.

Hand-written: the maintained tools for this (tc's netem, toxiproxy) are a kernel module this
machine's kernel lacks and a separate Go server; this is the one thing needed of them, a delay."""

import asyncio
import socket
import threading


class DelayProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, each chunk `delay` seconds late in
    each direction (a round trip `2 × delay` longer), in order; `url` is its http:// address."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # asyncio keeps only weak references to tasks: a connection's tasks are held here until done.
        self.tasks = set()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    def _keep(self, task):
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _handle(self, client_reader, client_writer):
        self._keep(asyncio.current_task())
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._keep(asyncio.ensure_future(self._pipe(client_reader, server_writer))),
                             self._keep(asyncio.ensure_future(self._pipe(server_reader, client_writer))),
                             return_exceptions=True)
        for writer in (client_writer, server_writer):
            writer.close()

    async def _pipe(self, reader, writer):
        """Reads as it comes, writes each chunk `delay` after it came (a chunk read later never
        overtakes one read before): a delay without limiting the bandwidth."""
        chunks = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await chunks.get()
                if (wait := due - self.loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:  # the other side went away: what is left is dropped
                    return

        delivering = self._keep(asyncio.ensure_future(deliver()))
        try:
            while data := await reader.read(65536):
                chunks.put_nowait((self.loop.time() + self.delay, data))
        except OSError:
            pass
        chunks.put_nowait((self.loop.time() + self.delay, b""))
        await delivering
