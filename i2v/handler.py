"""Django's ASGI handler, with each request's thread taken from a pool instead of made for it.

Under ASGI, Django runs a request's sync code (views, signal receivers, the ORM) on a thread of
the request's own: asgiref's ThreadSensitiveContext makes a one-thread executor at the request's
first sync call and, at its end, starts a second thread to join the first. Every request paid for
two new threads, and, since Django's connections are per thread, a new database connection: on
SQLite a file opened, three PRAGMAs and Django's ~30 SQL functions registered, on every
`GET /api/jobs/{id}` a script makes. py-spy on the web server with ten jobs at once: the executor
submit that started each request's thread was 14.5 % of the samples holding the GIL, opening the
SQLite connection 2.6 %; the web server's CPU per job fell from 42 to 30.5 ms with the pool.

Here a request takes a one-thread executor from a pool and gives it back when it ends
(asgiref's `ThreadSensitiveContext(executor=...)`, made for this): each request still has a thread
of its own for as long as it runs, the threads are made once, and a thread's connection lives as
long as CONN_MAX_AGE lets it (Django checks it at each request's start and end, as under WSGI).
"""

import collections
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler as _ASGIHandler

KEEP = 64  # idle threads kept per process; a burst beyond them gets threads that end with it


class RequestThreads:
    """One-thread executors for requests: take() one, give_back() it when the request is over."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self.idle = collections.deque()
        self.made = 0

    def take(self) -> ThreadPoolExecutor:
        try:
            return self.idle.pop()  # the most recently used: its connection is the likeliest alive
        except IndexError:
            self.made += 1
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        # Back in the pool once whatever the request left on it is done: a view whose request was
        # cancelled (the client went away) goes on running in its thread, and the next request
        # must not queue behind it.
        executor.submit(_nothing).add_done_callback(lambda _: self._idle(executor))

    def _idle(self, executor: ThreadPoolExecutor) -> None:
        if len(self.idle) < self.keep:
            self.idle.append(executor)
        else:
            executor.shutdown(wait=False)


def _nothing():
    pass


class ASGIHandler(_ASGIHandler):
    threads = RequestThreads()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)  # Django's own refusal
        executor = self.threads.take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.give_back(executor)
