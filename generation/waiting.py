"""Waiting for a job to change without holding a thread: `GET /api/jobs/{id}?wait=N` and
`POST /api/generate-video` with `Prefer: wait`.

Every job write that a job's answer shows announces the job's id after its transaction commits
(`announce`): on Redis's pub/sub channel with `REDIS_URL`, else with PostgreSQL's NOTIFY, and on
SQLite (one machine by design) with a datagram to each web process's local socket, saying only
that some job changed. A waiting request is a coroutine on the web process's event loop (ASGI):
it reads the job, then sleeps on an asyncio.Event that the process's one listener (`_Hub`) sets
when the job's id is announced, or, on SQLite, when the one query it makes on each datagram for
all the jobs waited on sees that job change (where local sockets are unavailable, that query runs
every SQLITE_POLL seconds instead).
A wake-up that gets lost costs at most FALLBACK_POLL seconds, never a wrong answer: every wake
re-reads the job."""

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import psycopg
import redis
import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, connections, transaction

from i2v.core.sql import convert, fetch, marks, prebuilt

log = logging.getLogger(__name__)
CHANNEL = "i2v_jobs"
FALLBACK_POLL = 1.0  # seconds between re-reads when announcements arrive
SQLITE_POLL = 0.05  # seconds between re-reads when nothing announces (SQLite)
MAX_WAIT = 60
LISTEN_TIMEOUT = 2.0  # seconds a waiter waits for the listener to be subscribed
LINGER = 10.0  # seconds the listener stays subscribed after its last waiter left


def _announcer() -> str:
    if settings.REDIS_URL:
        return "redis"
    if connection.vendor == "postgresql":
        return "postgresql"
    if hasattr(socket, "AF_UNIX"):
        return "local"
    return ""


def announcing() -> bool:
    return bool(_announcer())


def announces_ids() -> bool:
    """Whether announcements name the jobs (the local datagram says only that some job changed)."""
    return _announcer() in ("redis", "postgresql")


class _LocalWake:
    """SQLite's announcements. Each web process's listener binds an abstract-namespace datagram
    socket (gone with its process) and lists its name in a folder of the data dir; a job write
    sends every listed socket a byte after it commits. Hand-written: the processes share nothing
    else (no Redis, no PostgreSQL), and a local socket is the one wake-up they all can reach."""

    _names = itertools.count()

    @staticmethod
    def _key() -> str:
        return hashlib.sha256(str(connection.settings_dict.get("NAME")).encode()).hexdigest()[:16]

    @classmethod
    def folder(cls):
        return settings.DATA_DIR / "waiters" / cls._key()

    @classmethod
    def _address(cls, name: str) -> str:
        return f"\0i2v-w-{cls._key()}-{name}"

    @classmethod
    def bind(cls):
        """(socket, its entry in the folder), or None where abstract sockets do not exist (not Linux)."""
        name = f"{os.getpid()}-{next(cls._names)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(cls._address(name))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        folder = cls.folder()
        folder.mkdir(parents=True, exist_ok=True)
        entry = folder / name
        entry.touch()
        return sock, entry

    @classmethod
    def send(cls) -> None:
        try:
            names = os.listdir(cls.folder())
        except OSError:
            return  # no web process listens
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for name in names:
                try:
                    sock.sendto(b"1", cls._address(name))
                except ConnectionRefusedError:  # its process is gone
                    try:
                        os.unlink(cls.folder() / name)
                    except OSError:
                        pass
                except OSError:  # its queue is full: it has a wake-up pending already
                    pass


_STATE_FIELDS = ("id", "status", "step", "steps_total", "progress", "note", "queue_position")
PREBUILT_STATES = 32  # up to this many jobs waited on, _states() reads them with prebuilt SQL


def _states(job_ids) -> dict:
    """What waiters watch of these jobs, read in one query (the SQLite listener's poll). Prebuilt
    for up to PREBUILT_STATES jobs (one statement per count): every job write makes each web process
    run it, and the ORM compiled it anew each time (py-spy, jobs in a row on SQLite: 5.7% of a web
    process's CPU samples were in this query, most of them in the ORM)."""
    from generation.models import VideoJob  # noqa: PLC0415 -- the models import this module

    close_old_connections()  # this thread outlives requests: drop a connection that went bad
    if len(job_ids) > PREBUILT_STATES:
        rows = VideoJob.objects.filter(pk__in=job_ids).values_list(*_STATE_FIELDS)
    else:
        sql = prebuilt(f"videojob.states:{len(job_ids)}", lambda q: (
            f"SELECT {', '.join(q(VideoJob, name) for name in _STATE_FIELDS)} FROM {q(VideoJob)} "
            f"WHERE {q(VideoJob, 'id')} IN ({marks(len(job_ids))})"))
        pk = VideoJob._meta.pk
        rows = [convert(VideoJob, _STATE_FIELDS, row)
                for row in fetch(sql, [pk.get_db_prep_value(job_id, connection) for job_id in job_ids])]
    return {str(row[0]): tuple(row[1:]) for row in rows}


_publisher = None


def warm() -> None:
    """Connect the announcer now (a worker process about to start, not its first job, pays)."""
    global _publisher
    if _announcer() == "redis" and _publisher is None:
        try:
            _publisher = redis.Redis.from_url(settings.REDIS_URL)
            _publisher.ping()
        except redis.RedisError as exc:
            log.warning("could not reach Redis for job announcements: %s", exc)


def announce(*job_ids) -> None:
    """Tell waiting requests these jobs changed, once the current transaction commits."""
    kind = _announcer()
    if kind == "local":
        transaction.on_commit(_LocalWake.send)
        return
    if not kind or not job_ids:
        return
    ids = [str(i) for i in job_ids]
    # A few ids to a message (PostgreSQL's NOTIFY payload is at most 8,000 bytes).
    messages = [",".join(ids[i:i + 200]) for i in range(0, len(ids), 200)]
    if kind == "postgresql":
        with connection.cursor() as cursor:  # NOTIFY is delivered when the transaction commits
            for message in messages:
                cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, message])
        return

    def publish():
        global _publisher
        try:
            if _publisher is None:
                _publisher = redis.Redis.from_url(settings.REDIS_URL)
            for message in messages:
                _publisher.publish(CHANNEL, message)
        except redis.RedisError as exc:  # waiters fall back to their poll
            log.warning("could not announce a job change: %s", exc)

    transaction.on_commit(publish)


class _Hub:
    """One listener per event loop; wakes every waiter of an announced job."""

    def __init__(self, kind):
        self.kind = kind
        self.waiters = defaultdict(set)
        self.task = None
        self.linger = None
        self.listening = asyncio.Event()
        self.heard = 0  # announcements of any job the listener received so far (heard())
        self.hearing = False  # whether the listener receives announcements now (not only polls)
        # The listener's own thread for the database: not a request's (a request's thread goes
        # away with the request, and the listener outlives any one of them).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="i2v-waiting")

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def watch(self, job_id) -> asyncio.Event:
        """An event set when the job is announced; once this returns the listener is listening,
        so a change made after the caller's next read of the job cannot go unannounced."""
        if self.task is None or self.task.done():
            self.listening = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._listen())
        event = asyncio.Event()
        self.waiters[str(job_id)].add(event)
        try:
            await asyncio.wait_for(self.listening.wait(), LISTEN_TIMEOUT)
        except TimeoutError:
            pass  # no listener for now: the waiter re-reads every FALLBACK_POLL
        return event

    async def unwatch(self, job_id, event) -> None:
        key = str(job_id)
        self.waiters[key].discard(event)
        if not self.waiters[key]:
            del self.waiters[key]
        if not self.waiters and self.task is not None:
            # Nobody waits: the listener stops and closes its connection after LINGER seconds
            # unless a wait comes first (a script's next ?wait= usually does, at once).
            if self.linger is not None:
                self.linger.cancel()
            self.linger = asyncio.get_running_loop().call_later(LINGER, self._stop_if_idle)

    def _stop_if_idle(self):
        if not self.waiters and self.task is not None:
            task, self.task = self.task, None
            task.cancel()

    def count(self) -> int:
        return sum(len(events) for events in self.waiters.values())

    def _set_hearing(self, hearing: bool) -> None:
        """The listener starts or stops receiving announcements. Either way heard() moves on: what
        was announced while it did not listen is unknown, so a read from before must be redone."""
        self.hearing = hearing
        self.heard += 1

    def _wake(self, message: str) -> None:
        for job_id in message.split(","):
            for event in self.waiters.get(job_id, ()):
                event.set()

    async def _listen(self):
        while True:
            try:
                if self.kind == "redis":
                    await self._listen_redis()
                elif self.kind == "postgresql":
                    await self._listen_postgresql()
                else:
                    await self._poll(_LocalWake.bind() if self.kind == "local" else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive a broken connection
                log.warning("job announcements unavailable (%s); waiters poll", exc)
                await asyncio.sleep(FALLBACK_POLL)

    async def _poll(self, bound=None):
        """SQLite: one query for every watched job on each local datagram (`bound`: the socket and
        its folder entry), else every SQLITE_POLL seconds. A job first seen here wakes its waiters
        (they re-read it once): the change may be what brought the datagram."""
        last = {}
        loop = asyncio.get_running_loop()
        self.listening.set()
        self._set_hearing(bound is not None)
        try:
            while True:
                ids = list(self.waiters)
                if ids:
                    states = await self._in_thread(_states, ids)
                    for job_id, state in states.items():
                        if last.get(job_id) != state:
                            self._wake(job_id)
                    if len(last) > 10_000:  # forget jobs nobody waits for now
                        last = {job_id: last[job_id] for job_id in self.waiters if job_id in last}
                    last.update(states)
                if bound is None:
                    await asyncio.sleep(SQLITE_POLL)
                    continue
                try:
                    await asyncio.wait_for(loop.sock_recv(bound[0], 64), FALLBACK_POLL)
                    self.heard += 1
                    while bound[0].recv(64):  # drain: one query serves every datagram so far
                        pass
                except (TimeoutError, BlockingIOError):
                    pass
        finally:
            self._set_hearing(False)
            if bound is not None:
                bound[0].close()
                bound[1].unlink(missing_ok=True)

    async def _listen_redis(self):
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                self.listening.set()
                self._set_hearing(True)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.heard += 1
                        self._wake(message["data"].decode())
        finally:
            self._set_hearing(False)
            await client.aclose()

    async def _listen_postgresql(self):
        params = await self._in_thread(connections["default"].get_connection_params)
        # Django's cursor class is a sync one: this connection is async, and keeps psycopg's own.
        params.pop("cursor_factory", None)
        try:
            async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                self._set_hearing(True)
                async for notify in conn.notifies():
                    self.heard += 1
                    self._wake(notify.payload)
        finally:
            self._set_hearing(False)


_hubs = {}


def _hub():
    kind = _announcer() or "poll"
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        for closed in [other for other in _hubs if other.is_closed()]:  # e.g. async_to_sync's loops
            _hubs.pop(closed).executor.shutdown(wait=False)
        _hubs[loop] = _Hub(kind)
    return _hubs[loop]


def waiting_now() -> int:
    """Requests waiting on this process's event loops (for /api/ping)."""
    return sum(hub.count() for hub in _hubs.values())


def read_and_release(read):
    """read(), then, when connections come from a pool (make run's web server on PostgreSQL),
    the request's connection back to it: a request waiting a minute must not hold one meanwhile,
    or a few waiting scripts would leave every other request waiting for a connection."""
    try:
        return read()
    finally:
        if getattr(connection, "pool", None) is not None:
            connection.close()


def heard() -> int | None:
    """How many announcements this event loop's listener has heard, or None while none listens. The
    same number before a read of a job and after watching() began means no change of any job was
    announced in between, so the read still stands."""
    hub = _hubs.get(asyncio.get_running_loop())
    return hub.heard if hub is not None and hub.hearing else None


@contextlib.asynccontextmanager
async def watching(job_id):
    """The job's announcements from here on (a _Watching). Registered before the caller first reads
    the job, inside the block: a change made after that read cannot go unheard, and nothing needs
    reading twice."""
    hub = _hub()
    event = await hub.watch(job_id)
    try:
        yield _Watching(event)
    finally:
        await hub.unwatch(job_id, event)


class _Watching:
    def __init__(self, event):
        self.event = event

    async def read(self, read):
        """read() (a plain sync function) in a thread for the moment it takes; a change announced
        from here on wakes the next changed()."""
        self.event.clear()
        return await sync_to_async(read_and_release)(read)

    async def changed(self, read, seen, timeout: float):
        """read()'s value as soon as it differs from `seen` (what read() gave inside this block),
        or `seen` after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout, 0.0), MAX_WAIT)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return seen
            try:
                await asyncio.wait_for(self.event.wait(), min(remaining, FALLBACK_POLL))
            except TimeoutError:
                pass  # no word (the listener down?): read anyway
            current = await self.read(read)
            if current != seen:
                return current
