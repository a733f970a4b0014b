"""The middleware chain as `make run` serves it (ASGI), where i2v/middleware.py runs Django's hooks
on the event loop: logging in, CSRF, flash messages and the security headers behave as they do
under WSGI. Driven by Django's AsyncClient (the async handler and middleware chain)."""

import asyncio
import re
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from generation.models import VideoJob
from i2v.middleware import on_the_loop


@pytest.fixture(autouse=True)
def _as_served(settings):
    """The middlewares as i2v/asgi.py builds the handler with them."""
    settings.MIDDLEWARE = on_the_loop(settings.MIDDLEWARE)


def test_asgi_runs_every_django_middleware_with_hooks_on_the_loop():
    from i2v import middleware
    from i2v.asgi import application

    django_app = application.application  # behind the static files
    chain, handler = [], django_app._middleware_chain
    while handler is not None:  # each middleware wrapped by Django's exception handler
        chain.append(type(handler))
        handler = getattr(handler, "__wrapped__", None) or getattr(handler, "get_response", None)
    ours = {cls for cls in chain if issubclass(cls, middleware.OnTheLoop)}
    assert ours == set(middleware.ON_THE_LOOP.values())


def call(client, method, path, **kwargs):
    return async_to_sync(getattr(client, method))(path, **kwargs)


def log_in(client):
    page = call(client, "get", "/accounts/login/")
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    return page, call(client, "post", "/accounts/login/", data={"username": "alice", "password": "alice-pass-123",
                                                                  "csrfmiddlewaretoken": token})


def test_logging_in_keeps_the_session_and_answers_carry_the_security_headers(user):
    client = AsyncClient()
    page, done = log_in(client)
    assert "csrftoken" in page.cookies
    assert page["X-Frame-Options"] == "DENY"
    assert page["X-Content-Type-Options"] == "nosniff"
    assert "script-src" in page["Content-Security-Policy"]
    assert done.status_code == 302, done.content[:300]
    assert "sessionid" in done.cookies  # the changed session was saved (on a thread)
    home = call(client, "get", "/")
    assert home.status_code == 200 and b"alice" in home.content


def test_a_form_post_without_the_csrf_token_is_refused(user):
    client = AsyncClient(enforce_csrf_checks=True)
    resp = call(client, "post", "/accounts/login/", data={"username": "alice", "password": "alice-pass-123"})
    assert resp.status_code == 403
    assert "sessionid" not in resp.cookies


def test_a_flash_message_shows_once(user, settings):
    settings.I2V_GPU_PROVIDER = "none"
    job = VideoJob.objects.create(owner=user, input_image="inputs/x.png", prompt="p", workflow_slug="smoke",
                                  width=64, height=64, frames=17, fps=8)
    client = AsyncClient()
    log_in(client)
    page = call(client, "get", f"/jobs/{job.id}/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    resp = call(client, "post", f"/jobs/{job.id}/cancel", data={"csrfmiddlewaretoken": token})
    assert resp.status_code == 302
    shown = call(client, "get", f"/jobs/{job.id}/")
    assert b"The job was cancelled." in shown.content
    again = call(client, "get", f"/jobs/{job.id}/")
    assert b"The job was cancelled." not in again.content


@pytest.mark.parametrize("path", ["/api/ping", "/api/gpu/config"])
def test_an_api_request_by_token_sets_no_cookie(path, token):
    resp = call(AsyncClient(), "get", path, headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    assert not resp.cookies
    assert resp["X-Content-Type-Options"] == "nosniff"


def serve(app, path, token):
    """One GET through the ASGI application as the web server makes it (a coroutine function); its
    status."""
    async def run():
        sent, done = [], asyncio.Event()
        first = True

        async def receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # the client stays until its answer is sent
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                   "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                   "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode())],
                   "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}, receive, send)
        done.set()
        return next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return run


@pytest.fixture
def served(monkeypatch, transactional_db):
    """The web server's Django handler (i2v/asgi.py) with a pool of its own, and for each request that
    ended: its thread and its database connection."""
    from django.core.signals import request_finished
    from django.db import connection, connections

    from i2v.asgi import application
    from i2v.handler import RequestThreads

    handler = application.application
    monkeypatch.setattr(handler, "threads", RequestThreads())
    ended = []

    def record(**kwargs):  # a receiver runs on the request's thread, after Django's connection check
        ended.append((threading.get_ident(), id(connection.connection)))

    request_finished.connect(record)
    yield handler, ended
    request_finished.disconnect(record)
    all_back(handler.threads)
    for executor in handler.threads.idle:  # their connections closed, as a process's end closes them
        executor.submit(connections.close_all).result()
        executor.shutdown()


def all_back(threads):
    """Wait until every thread made is back in the pool (each goes back from its own thread)."""
    deadline = time.monotonic() + 10
    while len(threads.idle) < threads.made:
        assert time.monotonic() < deadline, "a request's thread never went back to the pool"
        time.sleep(0.001)


def test_requests_one_after_another_share_a_thread_and_its_connection_and_at_once_each_has_its_own(served, token):
    handler, ended = served
    for _ in range(3):
        assert asyncio.run(serve(handler, "/api/jobs", token)()) == 200
        all_back(handler.threads)
    assert len(set(ended)) == 1, ended  # one thread, one database connection, made once
    assert handler.threads.made == 1

    async def together():
        return await asyncio.gather(serve(handler, "/api/jobs", token)(), serve(handler, "/api/jobs", token)())

    assert asyncio.run(together()) == [200, 200]
    assert len({thread for thread, _ in ended[3:]}) == 2  # two requests in flight: a thread each
    all_back(handler.threads)
    assert handler.threads.made == 2


def test_a_thread_still_running_a_cancelled_request_is_not_handed_to_the_next():
    from i2v.handler import RequestThreads

    threads = RequestThreads()
    executor = threads.take()
    release = threading.Event()
    running = executor.submit(release.wait)  # a view whose client went away goes on in its thread
    threads.give_back(executor)
    assert threads.take() is not executor  # a new thread for the next request meanwhile
    release.set()
    running.result()
    executor.submit(lambda: None).result()  # the pool takes it back after what it was running
    assert list(threads.idle) == [executor]
    assert threads.take() is executor
