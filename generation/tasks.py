"""django-q2 entry points: thin, idempotent, take primitive ids."""

import logging
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.db.models import Q
from django.utils import timezone

from generation import runner, scheduler
from generation.models import SchedulerState, VideoJob, Workflow, set_if
from gpu import capacity, netguard
from gpu.capacity import Place
from gpu.models import VastInstance
from i2v.core.sql import columns, fetch, from_row, marks, prebuilt, read_ahead, write

log = logging.getLogger(__name__)


def enqueue(func, *args):
    from i2v.core.queue import async_task

    async_task(func, *args, group="jobs")


DATABASE_DOWN = (OperationalError, InterfaceError)


def warm_worker(sender=None, **kwargs):
    """django-q2's post_spawn: a new worker process gets ready before its first task, instead of
    that job paying ~50 ms for it: the TLS context (loading the CA bundle), the database
    connection (kept between tasks, CONN_MAX_AGE) and the reads a job starts with."""
    netguard.warm()
    try:
        connection.ensure_connection()
        if connection.vendor == "postgresql":
            now = timezone.now()
            lease_and_read(uuid.UUID(int=0), "", now, now)  # matches no job: builds and prepares its statements
        runner.warm()
    except Exception as exc:  # noqa: BLE001 - only a head start: the first task does it all itself
        log.warning("worker start: could not get ready ahead of the first task (%s)", exc)


def with_database(fn, until):
    """fn(), tried again while the database cannot be reached (PostgreSQL restarting, a
    dropped connection) until the monotonic time `until`, then the error is raised. Each
    failure closes the broken connection, so the next try connects afresh."""
    pause = 0.2
    while True:
        try:
            return fn()
        except DATABASE_DOWN as exc:
            close_old_connections()
            if time.monotonic() + pause >= until:
                raise
            log.warning("database unavailable (%s); retrying", exc)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def run_job(job_id):
    """Advance one job for at most one slice, then hand it back to the queue if unfinished.

    A lease on the row makes a duplicate delivery (broker redelivery, the watchdog) a no-op
    while another worker holds the job.

    The database going away (a PostgreSQL restart) does not end the chain: the slice stops,
    and releasing the lease and re-enqueueing wait for the database for as long as the task
    may live. (A task that raised would hand the job to nobody: the broker acknowledges it,
    and only the watchdog would find the job again, minutes later.)
    """
    started = time.monotonic()
    slice_seconds = settings.I2V_FOLLOW_SLICE
    # Leave django-q2's alarm (at `timeout`) a margin: a task it kills can't hand the job on.
    until = started + max(slice_seconds, settings.Q_CLUSTER["timeout"] - 1.0)
    token = uuid.uuid4().hex

    def take_lease():
        now = timezone.now()
        # The lease lasts as long as django-q2 lets a task live (`timeout` < `retry`), so a task
        # redelivered after a worker died always finds the dead worker's lease expired.
        lease_until = now + timedelta(seconds=settings.Q_CLUSTER["timeout"])
        return lease_and_read(job_id, token, lease_until, now)

    # A dead connection fails the lease, which with_database retries on a new one: the health
    # check Django would make first (CONN_HEALTH_CHECKS, a SELECT 1 round trip on every task) adds
    # nothing here.
    connection.health_check_done = True
    # The job and its place, read with the lease (None, None: no lease taken).
    leased, place = with_database(take_lease, until)
    if not leased:
        if VideoJob.objects.filter(pk=job_id, place="", status__in=VideoJob.ACTIVE).exists():
            # Not placed yet (a redelivery, the watchdog): placing is the scheduler's.
            place_now()
            return "waiting"
        return "busy-or-finished"
    done = False
    try:
        done = runner.advance(job_id, deadline=started + slice_seconds, job=leased, place=place)
    except DATABASE_DOWN as exc:
        # Every step is keyed by what is stored on the job: the next slice resumes it.
        log.warning("job %s: database unavailable during the slice (%s); continuing later", job_id, exc)
    finally:
        # Released before re-enqueueing: the next task must not find this lease and give up.
        with_database(lambda: set_if(job_id, "lease_token", token, {"lease_token": "", "lease_until": None}), until)
    if not done:
        # The ORM broker enqueues into the database too.
        with_database(lambda: enqueue("generation.tasks.run_job", str(job_id)), until)
        return "continued"
    # The job ended, went back to the queue or freed its GPU slot: place the next one now.
    with_database(scheduler.place_waiting, until)
    return "done"


place_now = scheduler.place_now


def lease_and_read(job_id, token: str, lease_until, now) -> tuple[VideoJob | None, Place | None]:
    """Take the lease and read the job with its workflow and instance (what runner.advance reads
    first), and resolve its place; (None, None) when it took no lease. The same compare-and-set
    as the ORM's update elsewhere, prebuilt: the ORM compiled the lease's filter (an OR) and the
    read's joins anew on every job's way to its GPU.

    PostgreSQL: one statement, the UPDATE's RETURNING joined in a CTE, and what resolving the
    place reads (the GPU configuration, the live instances, the servers) rides in the same round
    trip (read_ahead): one round trip and two compiled queries fewer (2.0 ms for the ORM's read
    alone, in-process), and two round trips fewer again, 1-2 ms on a busy machine. SQLite (whose
    UPDATE cannot feed a join): the UPDATE, then the joined SELECT."""
    def joined(q, source):
        return (f"SELECT {columns(VideoJob, q, 'leased')}, {columns(Workflow, q, 'w')}, {columns(VastInstance, q, 'i')} "
                f"FROM {source} LEFT JOIN {q(Workflow)} w ON w.{q(Workflow, 'id')} = leased.{q(VideoJob, 'workflow')} "
                f"LEFT JOIN {q(VastInstance)} i ON i.{q(VastInstance, 'id')} = leased.{q(VideoJob, 'instance')}")

    def lease(q):
        return (f"UPDATE {q(VideoJob)} SET {q(VideoJob, 'lease_token')} = %s, {q(VideoJob, 'lease_until')} = %s "
                f"WHERE {q(VideoJob, 'id')} = %s AND ({q(VideoJob, 'lease_until')} IS NULL OR {q(VideoJob, 'lease_until')} < %s) "
                f"AND {q(VideoJob, 'status')} IN ({marks(len(VideoJob.ACTIVE))}) AND {q(VideoJob, 'place')} <> ''")

    if connection.vendor == "postgresql":
        sql = prebuilt("videojob.lease_and_read", lambda q: f"WITH leased AS ({lease(q)} RETURNING *) {joined(q, 'leased')}")
        params = [token, lease_until, uuid.UUID(str(job_id)), now, *VideoJob.ACTIVE]
        with read_ahead((sql, params), *capacity.resolve_reads()):
            rows = fetch(sql, params)
            return _leased(rows[0]) if rows else (None, None)
    stamp = VideoJob._meta.get_field("lease_until")
    pk = VideoJob._meta.pk.get_db_prep_value(job_id, connection)
    if not write(prebuilt("videojob.lease", lease), [token, stamp.get_db_prep_save(lease_until, connection), pk,
                                                      stamp.get_db_prep_save(now, connection), *VideoJob.ACTIVE]):
        return None, None
    rows = fetch(prebuilt("videojob.read_leased", lambda q: (
        f"{joined(q, f'{q(VideoJob)} leased')} WHERE leased.{q(VideoJob, 'id')} = %s")), [pk])
    return _leased(rows[0]) if rows else (None, None)


def _leased(row) -> tuple[VideoJob, Place | None]:
    """The job of a lease_and_read row, with its workflow and instance as select_related() leaves
    them, and its place resolved."""
    n_job, n_workflow = len(VideoJob._meta.concrete_fields), len(Workflow._meta.concrete_fields)
    job = from_row(VideoJob, row[:n_job])
    for name, related in (("workflow", from_row(Workflow, row[n_job:n_job + n_workflow])),
                          ("instance", from_row(VastInstance, row[n_job + n_workflow:]))):
        VideoJob._meta.get_field(name).set_cached_value(job, related)
    return job, capacity.resolve(job.place)


def watchdog():
    """Schedule (every minute): re-enqueue placed jobs nobody is working on (a worker died, a
    task was lost), and run a scheduling pass."""
    stale = timezone.now() - timedelta(seconds=settings.Q_CLUSTER["retry"])
    ids = list(
        VideoJob.objects.filter(status__in=VideoJob.ACTIVE, status_changed_at__lt=stale).exclude(place="")
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=timezone.now()))
        .values_list("id", flat=True)[:100]
    )
    for job_id in ids:
        enqueue("generation.tasks.run_job", str(job_id))
    place_now()
    return len(ids)


TICK_SECONDS = 2.0  # how often passes run while jobs wait on time alone (a GPU booting, a URL down)


def schedule(seen: int | None = None):
    """A scheduling pass, then what it decided (renting, destroying). With `seen` (the pass count
    read after the change it is for), skipped when later passes saw that change (run_pass). While
    jobs wait on something only time changes, one worker keeps passing every TICK_SECONDS for a
    slice. (A task queued by an older version carries a time instead: it just passes.)"""
    result = scheduler.run_pass(seen=seen if isinstance(seen, int) else None)
    if result.skipped:
        return "already done"
    scheduler.carry_out(result)
    if result.needs_tick and _take_ticker():
        until = time.monotonic() + settings.I2V_FOLLOW_SLICE
        try:
            while result.needs_tick and time.monotonic() + TICK_SECONDS < until:
                time.sleep(TICK_SECONDS)
                result = scheduler.run_pass()
                scheduler.carry_out(result)
        finally:
            SchedulerState.objects.filter(pk=1).update(ticker_until=None)
        if result.needs_tick:
            enqueue("generation.tasks.schedule")
    return (f"bound {len(result.bound)}, waiting {result.waiting - len(result.bound)}, rented {result.rented}, "
            f"destroyed {result.destroyed}")


def _take_ticker() -> bool:
    now = timezone.now()
    lease = now + timedelta(seconds=settings.Q_CLUSTER["timeout"])
    return bool(SchedulerState.objects.filter(Q(ticker_until__isnull=True) | Q(ticker_until__lt=now), pk=1)
                .update(ticker_until=lease))


def deliver_webhook(job_id, attempt=1):
    from generation import webhooks

    webhooks.deliver(job_id, int(attempt))
