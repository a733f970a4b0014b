"""PostgreSQL restarts under a real django-q2 worker (qcluster), and the jobs it runs continue.

The real server is shared with the test process (and with CI), so it is not restarted: the
worker reaches PostgreSQL through a TCP proxy on 127.0.0.1 (only the worker's DATABASE_URL
points at it; the test process talks to PostgreSQL directly). A restart is played by the
proxy: every connection of the worker dropped, new ones closed at once until the test has
seen the worker try again, then accepted again. The worker runs with the short timings of
test_worker_faults (8 s task timeout, 2 s slices), and nothing here enqueues the watchdog:
the jobs must continue on their own.

PostgreSQL only: with SQLite there is no server to lose."""

import threading
from urllib.parse import quote

import pytest
from django.db import connection

from tests.doubles.comfyui import ComfyUIDouble
from tests.doubles.tcp_proxy import TcpProxy
from tests.reliability.test_worker_faults import (  # noqa: F401 (fixtures)
    assert_completed_once_each,
    configured,
    no_schedules,
    submit_jobs,
    wait_terminal,
    workers,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow_start]


@pytest.fixture
def db_proxy():
    if connection.vendor != "postgresql":
        pytest.skip(f"PostgreSQL only (this run uses {connection.vendor}): set DATABASE_URL=postgres://...")
    s = connection.settings_dict
    with TcpProxy(s["HOST"] or "127.0.0.1", s["PORT"] or 5432) as proxy:
        yield proxy


def proxied_database_url(proxy):
    s = connection.settings_dict
    user = quote(s["USER"] or "", safe="")
    password = f":{quote(s['PASSWORD'], safe='')}" if s.get("PASSWORD") else ""
    return f"postgres://{user}{password}@127.0.0.1:{proxy.port}/{quote(str(s['NAME']), safe='')}"


def restart_database(proxy):
    """Drop the worker's connections and refuse it until it has tried to reconnect twice."""
    proxy.cut()
    proxy.wait_for(lambda p: p.refused >= 2, timeout=30)
    proxy.restore()


def test_postgres_restart_mid_run(api, workers, configured, no_schedules, db_proxy):
    """Two jobs on the GPU (one running, one queued on ComfyUI) when PostgreSQL restarts: both
    complete, each posted once, and the worker process is still up."""
    hold = threading.Event()
    with ComfyUIDouble(hold=hold) as comfy:
        configured(comfy)
        worker = workers.start(DATABASE_URL=proxied_database_url(db_proxy))
        ids = submit_jobs(api, 2)
        comfy.wait_held(timeout=30)
        comfy.wait_for(lambda c: sum(c.prompt_posts.values()) == 2, timeout=30)
        assert db_proxy.active > 0
        restart_database(db_proxy)
        hold.set()
        rows = wait_terminal(ids, 60)
        assert_completed_once_each(comfy, ids, rows)
        assert db_proxy.cut_connections > 0
        assert worker.poll() is None, "qcluster exited when PostgreSQL went away"


def test_postgres_restart_while_the_video_is_saved(api, workers, configured, no_schedules, db_proxy):
    """PostgreSQL restarts while the worker streams the video from ComfyUI into storage: the
    job is not lost half-saved; it completes with the whole video, posted once."""
    size = 4 * 1024 * 1024
    # 64 KiB chunks 40 ms apart: the download takes ~2.5 s; the restart lands inside it.
    with ComfyUIDouble(output_size=size, view_chunk_delay=0.04) as comfy:
        configured(comfy)
        worker = workers.start(DATABASE_URL=proxied_database_url(db_proxy))
        [job_id] = submit_jobs(api, 1)
        comfy.wait_for(lambda c: c.count("GET", "/view") >= 1, timeout=30)
        restart_database(db_proxy)
        rows = wait_terminal([job_id], 60)
        assert_completed_once_each(comfy, [job_id], rows)
        assert rows[job_id].video_size == size
        assert worker.poll() is None, "qcluster exited when PostgreSQL went away"
