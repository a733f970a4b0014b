"""Waiting for a job to change without holding a thread: `GET /api/jobs/{id}?wait=N` and
`POST /api/generate-video` with `Prefer: wait`.

Every job write that a job's answer shows announces the job's id after its transaction commits
(`announce`): on Redis's pub/sub channel with `REDIS_URL`, else with PostgreSQL's NOTIFY, and on
SQLite (one machine) not at all. A waiting request is a coroutine on the web process's event
loop (ASGI): it reads the job, then sleeps on an asyncio.Event that the process's one listener
(`_Hub`) sets when the job's id is announced, or, where nothing announces, when its one query
every SQLITE_POLL seconds for all the jobs waited on sees one change.
A wake-up that gets lost costs at most FALLBACK_POLL seconds, never a wrong answer: every wake
re-reads the job."""

import asyncio
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import psycopg
import redis
import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, connections, transaction

log = logging.getLogger(__name__)
CHANNEL = "i2v_jobs"
FALLBACK_POLL = 1.0  # seconds between re-reads when announcements arrive
SQLITE_POLL = 0.05  # seconds between re-reads when nothing announces (SQLite)
MAX_WAIT = 60
LISTEN_TIMEOUT = 2.0  # seconds a waiter waits for the listener to be subscribed


def _announcer() -> str:
    if settings.REDIS_URL:
        return "redis"
    if connection.vendor == "postgresql":
        return "postgresql"
    return ""


def announcing() -> bool:
    return bool(_announcer())


def _states(job_ids) -> dict:
    """What waiters watch of these jobs, read in one query (the SQLite listener's poll)."""
    from generation.models import VideoJob  # noqa: PLC0415 -- the models import this module

    close_old_connections()  # this thread outlives requests: drop a connection that went bad
    rows = VideoJob.objects.filter(pk__in=job_ids).values_list(
        "id", "status", "step", "steps_total", "progress", "note", "queue_position")
    return {str(row[0]): row[1:] for row in rows}


_publisher = None


def announce(*job_ids) -> None:
    """Tell waiting requests these jobs changed, once the current transaction commits."""
    kind = _announcer()
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
        self.listening = asyncio.Event()
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
            # Nobody waits: the listener stops and closes its connection (the next wait starts one).
            task, self.task = self.task, None
            task.cancel()

    def count(self) -> int:
        return sum(len(events) for events in self.waiters.values())

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
                    await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive a broken connection
                log.warning("job announcements unavailable (%s); waiters poll", exc)
                await asyncio.sleep(FALLBACK_POLL)

    async def _poll(self):
        """Where nothing announces (SQLite, one machine): one query for every watched job."""
        last = {}
        self.listening.set()
        while True:
            ids = list(self.waiters)
            if ids:
                states = await self._in_thread(_states, ids)
                for job_id, state in states.items():
                    if job_id in last and last[job_id] != state:
                        self._wake(job_id)
                last = {job_id: states[job_id] for job_id in ids if job_id in states}
            else:
                last = {}
            await asyncio.sleep(SQLITE_POLL)

    async def _listen_redis(self):
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                self.listening.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake(message["data"].decode())
        finally:
            await client.aclose()

    async def _listen_postgresql(self):
        params = await self._in_thread(connections["default"].get_connection_params)
        async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            async for notify in conn.notifies():
                self._wake(notify.payload)


_hubs = {}


def _hub():
    kind = _announcer() or "poll"
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = _Hub(kind)
    return _hubs[loop]


def waiting_now() -> int:
    """Requests waiting on this process's event loops (for /api/ping)."""
    return sum(hub.count() for hub in _hubs.values())


async def wait_for_change(job_id, read, seen, timeout: float):
    """Return read()'s value as soon as it differs from `seen`, or after `timeout` seconds.
    `read` is a plain (sync) function; it runs in a thread for the moment it takes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(max(timeout, 0.0), MAX_WAIT)
    hub = _hub()
    current = seen
    while True:
        event = await hub.watch(job_id)
        try:
            current = await sync_to_async(read)()
            if current != seen:
                return current
            remaining = deadline - loop.time()
            if remaining <= 0:
                return current
            try:
                await asyncio.wait_for(event.wait(), min(remaining, FALLBACK_POLL))
            except TimeoutError:
                pass
        finally:
            await hub.unwatch(job_id, event)
