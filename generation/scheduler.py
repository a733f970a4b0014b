"""The scheduler: the one place that decides where and when every job runs.

Jobs wait in i2v's queue, not in a GPU's. A pass (``run_pass``) takes the waiting jobs in a
fair order (weighted round-robin across users, each user's own jobs oldest first), and binds
a job to a place only when that place has a free slot: a configured ComfyUI URL, a ready
vast.ai instance (``gpu.capacity``), or fal.ai (unbounded, paid per clip). Where a job goes
follows the operator's policy (``GpuConfig.placement_policy``):

- ``gpu_only``: the GPU that finishes it soonest (the cheaper one on a tie); fal.ai only for
  jobs that ask for it (``backend: fal``);
- ``cheapest``: the cheapest GPU already paid for (owned or rented) that finishes the job
  before its deadline, else the cheaper of fal.ai and a new rental that can, else the
  earliest finish;
- ``fastest``: the earliest finish, whatever it costs.

Finish times come from a simulation of every GPU's queue with run times learned from past
runs of the same workflow, resolution and frame count on the same class of GPU (``RunStat``;
the configured default while there is none). The same simulation says how long the waiting
jobs would wait: longer than a new vast.ai instance takes to boot, and the caps allowing it,
the pass asks ``gpu/`` for more instances; instances idle past ``idle_minutes`` with nothing
planned for them are destroyed.

A pass holds one row lock (``SchedulerState``), so passes on several workers and machines
never bind one slot twice; each bind is also a compare-and-set on the job's empty ``place``.
Renting and destroying (slow network calls) happen after the lock is released
(``carry_out``).
"""

import heapq
import logging
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from generation import failures
from generation.models import RunStat, SchedulerState, UserQuota, VideoJob, written
from gpu import capacity
from gpu.lifecycle import ProvisioningError, create_instance, destroy_instance
from gpu.models import GpuConfig, VastInstance
from i2v.core import queue as q_tasks
from i2v.core.sql import columns, convert, execute, fetch, from_row, marks, prebuilt, read_ahead, save_values, write

log = logging.getLogger(__name__)
S = VideoJob.Status

FAL = "fal"
WAITING = (S.QUEUED, S.PROVISIONING)
# A bound job holds its place's slot until ComfyUI is done with it (uploading frees the GPU).
OCCUPYING = (S.QUEUED, S.PROVISIONING, S.SUBMITTED, S.RUNNING)
MAX_BOOT_ATTEMPTS = 3  # failed vast.ai boots while jobs waited before they fail
NO_GPU = (
    "No GPU is configured: set a ComfyUI URL (admin → GPU configuration, or POST /api/gpu/config), "
    "add a ComfyUI server, or choose the vast.ai provider."
)


# ---------------------------------------------------------------------- the plan (pure)


@dataclass
class WaitingJob:
    id: object
    owner_id: int
    created: float  # epoch seconds
    backend: str
    deadline: float | None
    kind: tuple  # (workflow_slug, width, height, frames): what run times are learned by
    fal_price: Decimal = Decimal("0")


@dataclass
class SimPlace:
    key: str
    gpu_class: str
    dph: Decimal
    free: int  # slots that can take a job now
    busy_until: float  # when its GPU has finished what is planned on it
    ready_at: float | None = None  # a booting instance: when it is expected ready
    instance_id: object = None
    planned: int = 0  # jobs the simulation put on it (bound or not)


@dataclass
class Plan:
    binds: list = field(default_factory=list)  # (job_id, place key)
    unplaceable: list = field(default_factory=list)  # jobs no place can take (nothing configured)
    fal_blocked: list = field(default_factory=list)  # fal.ai jobs over their user's daily budget
    late_work: float = 0.0  # seconds of work that would start later than a new instance could
    late_run: float = 0.0  # the longest of those runs
    miss_work: float = 0.0  # seconds of work that would miss a deadline a new instance could meet
    miss_window: float | None = None  # the least time such a new instance has for it
    rent: int = 0


class Estimator:
    """Expected seconds of a run of one kind on one class of GPU."""

    def __init__(self, stats: dict, default: float):
        self.stats = stats
        self.default = default
        seen = defaultdict(list)
        for (*kind, _gpu_class), seconds in stats.items():
            seen[tuple(kind)].append(seconds)
        self.typical = {kind: sum(runs) / len(runs) for kind, runs in seen.items()}

    @staticmethod
    def read() -> tuple[str, list]:
        """load()'s prebuilt SELECT and its parameters (i2v.core.sql.read_ahead)."""
        return prebuilt("runstat.known", lambda q: "SELECT " + ", ".join(
            q(RunStat, f) for f in ("workflow_slug", "width", "height", "frames", "gpu_class", "mean_seconds")
        ) + f" FROM {q(RunStat)} WHERE {q(RunStat, 'runs')} > 0"), []

    @classmethod
    def load(cls, default: float) -> "Estimator":
        # Read by every pass: prebuilt SQL (i2v.core.sql); the values need no conversion.
        return cls({tuple(row[:5]): row[5] for row in fetch(*cls.read())}, default)

    def __call__(self, kind: tuple, gpu_class: str) -> float:
        """A class of GPU that has not run this kind yet is taken for the average of those that
        have (a GPU just added is not assumed to be slow, or every job would queue on the known
        one); with no history at all, the configured default."""
        return self.stats.get((*kind, gpu_class)) or self.typical.get(tuple(kind)) or self.default


def fair_order(jobs_by_user: dict, start: dict, weights: dict):
    """Waiting jobs, round-robin across users weighted by `weights`, each user's jobs in order:
    (job, its turn).

    Fair queuing by turns: a user's i-th waiting job comes at turn start[user] + i / weight,
    where start is the user's own clock (it advances by 1 / weight with every job of theirs
    placed, and never lags the clock of the last placement: waiting earns no credit). So the
    placements go A, B, C, A, B, C… whoever's job freed the slot, and weight 2 gets two turns to
    weight 1's one."""
    heap = []
    for user, jobs in jobs_by_user.items():
        if jobs:
            heapq.heappush(heap, (start.get(user, 0.0), jobs[0].created, user, 0))
    while heap:
        turn, _, user, i = heapq.heappop(heap)
        jobs = jobs_by_user[user]
        yield jobs[i], turn
        if i + 1 < len(jobs):
            w = max(1, weights.get(user, 1))
            heapq.heappush(heap, (turn + 1 / w, jobs[i + 1].created, user, i + 1))


class Clocks:
    """Each user's fair-queuing clock and the clock of the last placement (kept in SchedulerState)."""

    def __init__(self, data: dict | None = None):
        data = data or {}
        self.now = float(data.get("now", 0.0))
        self.users = {int(u): float(t) for u, t in (data.get("users") or {}).items()}

    def start(self, user) -> float:
        """The turn of the user's next job: their clock, caught up with the last placement."""
        return max(self.users.get(user, 0.0), self.now)

    def placed(self, user, turn: float, weight: int) -> None:
        self.now = max(self.now, turn)
        self.users[user] = max(self.users.get(user, 0.0), turn) + 1 / max(1, weight)

    def dump(self, active: set) -> dict:
        # Users with nothing waiting or running fall back to the shared clock anyway: drop them.
        return {"now": self.now, "users": {str(u): t for u, t in self.users.items() if u in active and t > self.now}}


@dataclass
class Inputs:
    now: float
    policy: str
    places: list  # SimPlace, ready or booting
    jobs_by_user: dict
    running: dict  # user -> jobs bound now
    weights: dict
    clocks: Clocks
    running_limit: dict  # user -> max bound at once
    fal_enabled: bool
    fal_room: dict  # user -> $ left today on fal.ai
    estimate: Estimator
    boot_seconds: float
    rental_room: int
    slots_per_instance: int
    idle_seconds: float = 0.0  # how long an idle rental lives before it is destroyed
    rent_dph: float | None = None  # what a new rental would cost per hour (None: renting is off)
    # Past this many jobs in order, with no slot left to fill, the rest only count as waiting work.
    detail: int = 500
    waiting_total: int | None = None  # all waiting jobs, when jobs_by_user holds only the first few


def plan(inp: Inputs) -> Plan:
    """Where each waiting job goes, given the places and what they are planned to do. Pure.

    Each job in fair order is put where the policy says on a simulation of every GPU's queue;
    it is bound when that place has a free slot now. Jobs that would start later than a new
    vast.ai instance could start them add to the work that asks for renting one."""
    out = Plan()
    now = inp.now
    running = dict(inp.running)
    fal_room = {u: float(v) for u, v in inp.fal_room.items()}
    gpus = list(inp.places)
    dph = {p.key: float(p.dph) for p in gpus}
    rentals = 0  # new instances this plan rents for deadlines nothing else meets
    runs = {}  # (kind, gpu class) -> expected seconds

    def run_of(kind, gpu_class):
        key = (kind, gpu_class)
        if key not in runs:
            runs[key] = inp.estimate(kind, gpu_class)
        return runs[key]

    fal_policy = inp.fal_enabled and inp.policy != GpuConfig.Policy.GPU_ONLY
    left = inp.waiting_total if inp.waiting_total is not None else sum(len(j) for j in inp.jobs_by_user.values())
    job = None
    start = {u: inp.clocks.start(u) for u in inp.jobs_by_user}
    for n, (job, turn) in enumerate(fair_order(inp.jobs_by_user, start, inp.weights)):
        if n >= inp.detail and not fal_policy and not any(p.free > 0 and p.ready_at is None for p in gpus):
            # Nothing more can be bound now: what is left only says how much work waits.
            _count_waiting_work(inp, out, job, left, run_of)
            break
        left -= 1
        owner = job.owner_id
        can_run = running.get(owner, 0) < inp.running_limit.get(owner, 1)
        price = float(job.fal_price)
        fal_ok = inp.fal_enabled and (job.backend == FAL or fal_policy)
        if fal_ok and fal_room.get(owner, 0.0) < price:
            fal_ok = False
            if job.backend == FAL:
                out.fal_blocked.append(job)
                continue
        # (finish, cost, place or None for fal.ai, start, whether it is new spending)
        candidates = []
        if fal_ok:
            candidates.append((now + run_of(job.kind, FAL), price, None, now, True))
        if job.backend != FAL:
            for place in gpus:
                start = max(now, place.busy_until, place.ready_at or now)
                run = run_of(job.kind, place.gpu_class)
                candidates.append((start + run, dph[place.key] * run / 3600, place, start, False))
            if (job.deadline is not None and inp.rent_dph is not None and rentals < inp.rental_room
                    and not any(c[0] <= job.deadline for c in candidates if c[2] is not None)):
                # A new rental for a deadline nothing else meets: it bills its boot, the run and its idle tail.
                run = run_of(job.kind, "vast")
                start = now + inp.boot_seconds
                cost = inp.rent_dph * (inp.boot_seconds + run + inp.idle_seconds) / 3600
                candidates.append((start + run, cost, NEW_RENTAL, start, True))
        if not candidates:
            out.unplaceable.append(job)
            continue
        finish, _, place, start, _ = _choose(inp.policy, candidates, job.deadline)
        if place is NEW_RENTAL:
            rentals += 1
            place = SimPlace(f"rental:{rentals}", "vast", Decimal(str(inp.rent_dph)), 0, now, ready_at=start)
            dph[place.key] = inp.rent_dph
            gpus.append(place)
        if place is None:
            if can_run:
                out.binds.append((job.id, FAL))
                inp.clocks.placed(owner, turn, inp.weights.get(owner, 1))
                running[owner] = running.get(owner, 0) + 1
                fal_room[owner] = fal_room.get(owner, 0.0) - price
            continue
        place.busy_until = finish
        place.planned += 1
        if can_run and place.free > 0 and place.ready_at is None:
            out.binds.append((job.id, place.key))
            inp.clocks.placed(owner, turn, inp.weights.get(owner, 1))
            place.free -= 1
            running[owner] = running.get(owner, 0) + 1
        else:
            run = run_of(job.kind, "vast")
            if job.deadline is not None and finish > job.deadline and now + inp.boot_seconds + run <= job.deadline:
                window = job.deadline - now - inp.boot_seconds
                out.miss_work += run
                out.miss_window = window if out.miss_window is None else min(out.miss_window, window)

    else:
        if left > 0 and job is not None:  # jobs not read at all (only each user's first few were)
            _count_waiting_work(inp, out, job, left, run_of)
    # What the GPUs would still be doing once a new instance could be ready.
    ready_by = now + inp.boot_seconds
    out.late_work += sum(max(0.0, p.busy_until - max(ready_by, p.ready_at or 0.0)) for p in gpus)
    have = len(gpus)
    out.rent = min(inp.rental_room, rentals + _instances_wanted(inp, out, have))
    return out


def _count_waiting_work(inp: Inputs, out: Plan, first, left: int, run_of) -> None:
    """The work of the `left` jobs not placed one by one (from `first` on): they come after
    everything planned, so all of it waits past a boot."""
    out.late_work += left * run_of(first.kind, "vast")
    out.late_run = max(out.late_run, run_of(first.kind, "vast"))


NEW_RENTAL = object()  # the candidate "a vast.ai instance rented now"


def _choose(policy: str, candidates: list, deadline: float | None):
    """The candidate (finish, cost, place, start, new spending) the policy picks.

    GPUs that are rented or owned come first when one meets the deadline: under `gpu_only` the
    earliest finish among them, under `cheapest` the cheapest (the dearer ones then idle and are
    destroyed sooner). New spending (fal.ai per clip, or a new rental) is weighed by its cost
    only when none of them meets the deadline."""
    fastest = min(candidates, key=lambda c: (c[0], c[1]))
    if policy == GpuConfig.Policy.FASTEST:
        return fastest
    meeting = [c for c in candidates if deadline is None or c[0] <= deadline]
    paid = [c for c in meeting if not c[4]]
    if paid:
        if policy == GpuConfig.Policy.CHEAPEST:
            return min(paid, key=lambda c: (c[1], c[0]))
        return min(paid, key=lambda c: (c[0], c[1]))
    if meeting:
        return min(meeting, key=lambda c: (c[1], c[0]))
    return fastest


# A rental is worth its boot and its idle tail (idle_minutes before it is destroyed) when it
# works at least this many times as long: they are then at most a seventh of what it bills.
# The `fastest` policy rents as soon as a rental would at least pay for its boot and tail.
AMORTIZE = 6


def _instances_wanted(inp: Inputs, out: Plan, have: int) -> int:
    """How many instances to rent now, within the caps.

    `late_work` is what the GPUs (ready and booting) would still have to do once a new instance
    could be ready; spread over them and the new ones, each new one must get AMORTIZE × (boot +
    idle tail) of it. Beyond that: enough that jobs which would miss their deadline meet it, and
    at least one when jobs have no GPU at all."""
    if inp.rental_room <= 0:
        return 0
    stranded = [job for job in out.unplaceable if job.backend != FAL]
    work = out.late_work + sum(inp.estimate(job.kind, "vast") for job in stranded)
    factor = 1 if inp.policy == GpuConfig.Policy.FASTEST else AMORTIZE
    per_instance = max(factor * (inp.boot_seconds + inp.idle_seconds), out.late_run, 1.0)
    wanted = max(0, int(work / per_instance) - have)
    if out.miss_work:
        window = max(out.miss_window or 0.0, out.late_run, 1.0)
        wanted = max(wanted, -(-int(out.miss_work) // int(window)))
    if stranded:
        wanted = max(1, wanted)  # no GPU at all: one, however little the work
    return min(inp.rental_room, wanted)


# ---------------------------------------------------------------------- reading the world


def _epoch(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


def _sim_places(config, gpu_places, bound, estimate, now) -> list[SimPlace]:
    """SimPlaces for the places that can take work, loaded with the jobs bound to them."""
    sims = []
    for place in gpu_places:
        if place.down:
            continue
        jobs = bound.get(place.key, [])
        busy = now
        for kind, started in jobs:
            run = estimate(kind, place.gpu_class)
            if started is not None:
                # A run past its expected time is assumed to need a tenth more.
                busy += max(run - (now - started), run * 0.1)
            else:
                busy += run
        ready_at = _epoch(place.ready_at)
        sims.append(SimPlace(place.key, place.gpu_class, place.dph, max(0, place.slots - len(jobs)), busy,
                             ready_at=ready_at, instance_id=place.instance_id))
    return sims


def _rent_dph(config) -> float | None:
    """What a new vast.ai rental is expected to cost per hour: the last one's price, else the
    policy's cap. None when renting is off."""
    if capacity.rental_room(config) <= 0:
        return None
    last = VastInstance.objects.exclude(dph_total=0).order_by("-created_at").values_list("dph_total", flat=True).first()
    return float(last or config.max_dph)


def _fal_price(kind) -> Decimal:
    from generation.fal import estimate_cost

    try:
        return estimate_cost(settings.FAL_ENDPOINT, kind[1], kind[2], kind[3])
    except ValueError:
        return Decimal("0")


def _fal_spent_today(user_ids, now) -> dict:
    """$ each user spent (or committed: bound, unfinished jobs at their estimate) on fal.ai today."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    spent = defaultdict(Decimal)
    rows = (VideoJob.objects.filter(owner_id__in=user_ids, place=FAL, created_at__gte=day)
            .values_list("owner_id", "cost_usd", "width", "height", "frames"))
    for owner, cost, w, h, f in rows:
        spent[owner] += cost if cost is not None else _fal_price(("", w, h, f))
    return spent


# ---------------------------------------------------------------------- the pass


@dataclass
class PassResult:
    bound: list = field(default_factory=list)
    placed: dict = field(default_factory=dict)  # job id (text) -> the fields its binding wrote
    claimed_seed: dict = field(default_factory=dict)  # job id (text) -> the seed its claim drew, if it had none
    requeued: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    rent: int = 0
    destroy: list = field(default_factory=list)  # VastInstance pks
    waiting: int = 0
    needs_tick: bool = False  # jobs wait on something only time changes (a down URL, a booting GPU)
    ms: float = 0.0
    skipped: bool = False  # a later pass had done it (run_pass's `seen`)
    rented: int = 0  # what carry_out did
    destroyed: int = 0


AFTER_COMMIT = "after-commit"  # run_pass's `seen` for a change already committed: read only if need be


def _locked_state_read(skip_locked=False) -> tuple[str, list]:
    features = connection.features
    lock = ""
    if features.has_select_for_update:
        lock = " FOR UPDATE SKIP LOCKED" if skip_locked and features.has_select_for_update_skip_locked else " FOR UPDATE"
    return prebuilt(f"schedulerstate.locked{lock}", lambda q: (
        f"SELECT {columns(SchedulerState, q)} FROM {q(SchedulerState)} WHERE {q(SchedulerState, 'id')} = 1{lock}")), []


def _locked_state(skip_locked=False) -> SchedulerState | None:
    """The scheduler's row, locked until the transaction ends (where the database has row locks:
    on SQLite the transaction's write lock serializes passes); None when it does not exist yet, or,
    with `skip_locked`, while another pass holds it. Prebuilt, like select_for_update() would
    build it: every request's pass takes it."""
    rows = fetch(*_locked_state_read(skip_locked))
    return from_row(SchedulerState, rows[0]) if rows else None


def _lock() -> SchedulerState:
    state = _locked_state()
    if state is None:  # the first pass ever (a concurrent one may create the row first)
        SchedulerState.objects.get_or_create(pk=1)
        state = _locked_state()
    return state


_STATE_SAVED = ("last_pass_at", "passes", "pass_ms", "summary")


def _save_state_write(state: SchedulerState) -> tuple[str, list]:
    """What a pass saw, on the row it locked: the UPDATE save(update_fields=…) makes, prebuilt."""
    sql = prebuilt("schedulerstate.save", lambda q: (
        f"UPDATE {q(SchedulerState)} SET {', '.join(f'{q(SchedulerState, name)} = %s' for name in _STATE_SAVED)} "
        f"WHERE {q(SchedulerState, 'id')} = %s"))
    values = save_values(SchedulerState, {name: getattr(state, name) for name in _STATE_SAVED})
    return sql, [*values, state.pk]


_OCCUPYING_COLUMNS = ("id", "place", "owner", "workflow_slug", "width", "height", "frames", "started_at")


def _occupying_read() -> tuple[str, list]:
    return prebuilt("videojob.occupying", lambda q: (
        f"SELECT {', '.join(q(VideoJob, name) for name in _OCCUPYING_COLUMNS)} FROM {q(VideoJob)} "
        f"WHERE {q(VideoJob, 'place')} <> '' AND {q(VideoJob, 'status')} IN ({marks(len(OCCUPYING))})")), list(OCCUPYING)


def _occupying() -> list[list]:
    """(id, place, owner_id, workflow_slug, width, height, frames, started_at) of the jobs holding
    a GPU slot, as values_list() gives them; prebuilt."""
    return [convert(VideoJob, _OCCUPYING_COLUMNS, row) for row in fetch(*_occupying_read())]


def passes_so_far() -> int:
    return SchedulerState.objects.filter(pk=1).values_list("passes", flat=True).first() or 0


def run_pass(now: datetime | None = None, seen: int | str | None = None) -> PassResult:
    """One scheduling pass: requeue jobs whose place is gone, bind waiting jobs to free slots,
    decide scale out and in. Safe to run from any number of workers at once.

    `seen`: passes_so_far() read after the change this pass is for was committed. The pass is
    skipped when, by the time it holds the lock, two more have run: the second of them began
    after the first, which was under way at most when `seen` was read, ended, so after the
    change, and saw it. Ten requests that each ask for a pass at once get one or two, not ten
    in a row.

    `seen` = AFTER_COMMIT: the change is committed already, and `seen` is read only when another
    pass holds the lock. A pass that takes the free lock began after the commit and sees the
    change itself; that saves the caller a query on every job's way to its GPU. (Where the
    database has no SKIP LOCKED, SQLite, `seen` is read first as before.)"""
    started = time.perf_counter()
    result = PassResult()
    with transaction.atomic():
        state = inputs = None
        if seen == AFTER_COMMIT:
            seen = None
            if connection.features.has_select_for_update_skip_locked:
                # The lock and everything the pass reads, in one round trip: the server runs the
                # reads after the lock is taken, so they see what a pass holding it must see.
                when = now or timezone.now()
                with read_ahead(_locked_state_read(skip_locked=True), *_pass_reads(when)):
                    state = _locked_state(skip_locked=True)
                    if state is not None:
                        now, inputs = when, _pass_inputs(when)
            if state is None:  # held by another pass (or not made yet): it may not have seen the change
                seen = passes_so_far()
        if state is None:
            state = _lock()
        if seen is not None and state.passes >= seen + 2:
            result.skipped = True
            return result
        clocks = Clocks(state.summary.get("clocks"))
        now = now or timezone.now()
        if inputs is None:
            with read_ahead(*_pass_reads(now)):
                inputs = _pass_inputs(now)
        config, gpu_places, occupying, estimate, waiting_counts, quota_rows, head = inputs
        requeued = _requeue_orphans(gpu_places, occupying, result)
        if requeued:  # back in the queue: they count among the waiting
            waiting_counts = _waiting_counts()

        bound = defaultdict(list)  # place key -> [(kind, started epoch)]
        running = defaultdict(int)
        for job_id, place, owner, slug, w, h, f, started_at in occupying:
            if job_id in requeued:
                continue  # waiting again: counted below
            bound[place].append(((slug, w, h, f), _epoch(started_at)))
            running[owner] += 1

        counts, with_deadline = {}, 0
        for owner, n, d in waiting_counts:
            counts[owner] = n
            with_deadline += d
        result.waiting = sum(counts.values())
        owners = set(counts) | set(running)
        quotas = _quotas(owners, quota_rows)
        default = UserQuota()
        weights = {u: quotas.get(u, default).weight for u in owners}
        fal_enabled = bool(settings.FAL_KEY)
        # Read with the lock: every waiting job while fewer than HEAD wait (and none came back just
        # now), so most passes read no more.
        everyone = None if requeued else _all_waiting(head)
        if fal_enabled and config.placement_policy != GpuConfig.Policy.GPU_ONLY:
            # Any job may go to fal.ai now: every one is looked at.
            rows = everyone if everyone is not None else _waiting_rows()
        else:
            # Only the first jobs in fair order can be placed now: read just enough of each user's.
            per_user = _needed_per_user(counts, clocks, weights, Inputs.detail + 1)
            rows = _first_per_user(everyone, per_user) if everyone is not None else _waiting_rows(per_user=per_user)
        deadlines = {_hex(jid): _epoch(at) for jid, at in VideoJob.objects.filter(
            place="", status__in=WAITING, cancel_requested=False, deadline_at__isnull=False).values_list("id", "deadline_at")
        } if with_deadline else {}
        jobs_by_user = defaultdict(list)
        for n, (jid, owner, backend, slug, w, h, f) in enumerate(rows):
            jid = _hex(jid)
            # `n` stands for the time it was created (the rows come oldest first): the tie-break.
            jobs_by_user[owner].append(WaitingJob(jid, owner, n, backend, deadlines.get(jid), (slug, w, h, f)))
        fal_room = {}
        if fal_enabled and rows:
            spent = _fal_spent_today(list(jobs_by_user), now)
            prices = {}
            for jobs in jobs_by_user.values():
                for job in jobs:
                    if job.kind not in prices:
                        prices[job.kind] = _fal_price(job.kind)
                    job.fal_price = prices[job.kind]
            fal_room = {u: quotas.get(u, default).fal_limit - spent.get(u, Decimal("0")) for u in jobs_by_user}

        now_s = now.timestamp()
        sims = _sim_places(config, gpu_places, bound, estimate, now_s)
        boot = capacity.expected_boot_seconds(config) if config.gpu_provider == GpuConfig.Provider.VASTAI else 0.0
        inp = Inputs(
            now=now_s, policy=config.placement_policy, places=sims, jobs_by_user=jobs_by_user, running=running,
            weights=weights, waiting_total=result.waiting, clocks=clocks,
            running_limit={u: quotas.get(u, default).running_limit for u in owners},
            fal_enabled=fal_enabled, fal_room=fal_room, estimate=estimate, boot_seconds=boot,
            rental_room=capacity.rental_room(config), slots_per_instance=config.slots_per_gpu,
            idle_seconds=config.idle_minutes * 60.0, rent_dph=_rent_dph(config),
        )
        free_at = sorted(max(s.busy_until, s.ready_at or 0.0) for s in sims)
        the_plan = plan(inp)

        state.last_pass_at = now
        state.passes += 1
        state.summary = {**_summary(sims, free_at, estimate, rows, now_s),
                         "clocks": clocks.dump(set(counts) | set(running))}
        state.pass_ms = (time.perf_counter() - started) * 1000  # up to its writes
        # What the pass saw is written in the same round trip as its bindings.
        _bind(the_plan.binds, gpu_places, result, now, then=[_save_state_write(state)])
        _fail_or_note_waiting(the_plan, gpu_places, config, result, now)
        result.rent = the_plan.rent
        result.destroy = _idle_instances(config, gpu_places, bound, sims, now)
        booting = any(p.ready_at is not None for p in gpu_places)
        down = any(p.down for p in gpu_places)
        result.needs_tick = bool(result.waiting - len(result.bound)) and (booting or down or result.rent > 0)
        result.ms = (time.perf_counter() - started) * 1000
    return result


def _waiting_where(q) -> str:
    """The WHERE of the jobs waiting unplaced (WAITING as parameters), for prebuilt SQL."""
    return (f"{q(VideoJob, 'place')} = '' AND {q(VideoJob, 'status')} IN ({marks(len(WAITING))}) "
            f"AND NOT {q(VideoJob, 'cancel_requested')}")


def _waiting_counts_read() -> tuple[str, list]:
    return prebuilt("videojob.waiting_counts", lambda q: (
        f"SELECT {q(VideoJob, 'owner')}, COUNT(*), COUNT({q(VideoJob, 'deadline_at')}) FROM {q(VideoJob)} "
        f"WHERE {_waiting_where(q)} GROUP BY {q(VideoJob, 'owner')}")), list(WAITING)


def _waiting_counts() -> list[tuple]:
    """(owner_id, waiting jobs, those with a deadline) per user with jobs waiting unplaced."""
    return fetch(*_waiting_counts_read())


QUOTAS_AHEAD = 200  # the pass reads every UserQuota row with its lock while there are no more
HEAD = 64  # the pass reads up to this many waiting jobs with its lock (_pass_reads)


def _quotas_read() -> tuple[str, list]:
    return prebuilt("userquota.first", lambda q: (
        f"SELECT {columns(UserQuota, q)} FROM {q(UserQuota)} ORDER BY {q(UserQuota, 'id')} LIMIT {QUOTAS_AHEAD + 1}")), []


def _waiting_head_read() -> tuple[str, list]:
    """Up to HEAD waiting jobs, each with its creation time last, in no order: with no ORDER BY
    the scan stops at HEAD rows, where sorting 10,000 waiting jobs to keep 64 took milliseconds."""
    return prebuilt("videojob.waiting_head", lambda q: (
        f"SELECT {', '.join(q(VideoJob, f) for f in _WAITING_COLUMNS)}, {q(VideoJob, 'created_at')} FROM {q(VideoJob)} "
        f"WHERE {_waiting_where(q)} LIMIT {HEAD}")), list(WAITING)


def _all_waiting(head) -> list[tuple] | None:
    """_waiting_rows()'s rows from _waiting_head_read()'s, when those are all the waiting jobs (fewer
    than HEAD), else None."""
    if len(head) >= HEAD:
        return None
    return [row[:-1] for row in sorted(head, key=lambda row: row[-1])]


def _pass_reads(now) -> list[tuple[str, list]]:
    """What _pass_inputs() reads, for read_ahead(): one round trip on PostgreSQL, where each costs
    0.3-0.8 ms on a busy two-core machine, more than the queries (and the pass holds its lock
    meanwhile). The quotas and the waiting jobs are read whole while they are few: the rows
    the pass needs of them depend on the counts read in the same trip (with the lock in the same
    trip, three round trips fewer on every job's way to its GPU: a pass took 9.0-9.4 ms in-process
    before, 6.6-8.3 after)."""
    return [GpuConfig.read(), VastInstance.objects.live_read(), capacity.servers_read(), capacity.down_read(now),
            _occupying_read(), Estimator.read(), _waiting_counts_read(), _quotas_read(), _waiting_head_read()]


def _pass_inputs(now) -> tuple:
    config = GpuConfig.get()
    return (config, capacity.places(config, now), _occupying(), Estimator.load(float(config.default_run_seconds)),
            _waiting_counts(), fetch(*_quotas_read()), fetch(*_waiting_head_read()))


def _first_per_user(rows, per_user: int) -> list[tuple]:
    """What _waiting_rows(per_user) reads, taken from `rows`, all the waiting jobs oldest first."""
    taken = defaultdict(int)
    kept = []
    for row in rows:
        owner = row[1]
        if taken[owner] < per_user:
            taken[owner] += 1
            kept.append(row)
    return kept


def _quotas(owners, rows) -> dict:
    """The UserQuota rows of these users, by user id (a user without one has the defaults).
    `rows`: _quotas_read()'s, which are every row while there are no more than QUOTAS_AHEAD."""
    if not owners:
        return {}
    if len(rows) <= QUOTAS_AHEAD:
        quotas = (from_row(UserQuota, row) for row in rows)
        return {quota.user_id: quota for quota in quotas if quota.user_id in owners}
    head = prebuilt("userquota.of", lambda q: f"SELECT {columns(UserQuota, q)} FROM {q(UserQuota)} "
                                              f"WHERE {q(UserQuota, 'user')} IN ")
    quotas = (from_row(UserQuota, row) for row in fetch(f"{head}({marks(len(owners))})", list(owners)))
    return {quota.user_id: quota for quota in quotas}


_WAITING_COLUMNS = ("id", "owner", "backend", "workflow_slug", "width", "height", "frames")


def _waiting_rows(per_user: int | None = None) -> list[tuple]:
    """(id, owner_id, backend, workflow_slug, width, height, frames) of the waiting jobs, oldest
    first; with `per_user`, only each user's oldest that many. A prebuilt SELECT without the
    ORM's per-value converters: a pass may read 10,000 rows, and converting their ids took longer
    than the rest of the pass."""
    def cols(q):
        return ", ".join(q(VideoJob, f) for f in _WAITING_COLUMNS)

    if per_user is None:
        return fetch(prebuilt("videojob.waiting_rows", lambda q: (
            f"SELECT {cols(q)} FROM {q(VideoJob)} WHERE {_waiting_where(q)} ORDER BY {q(VideoJob, 'created_at')}"
        )), list(WAITING))
    return fetch(prebuilt("videojob.waiting_rows_per_user", lambda q: (
        f"SELECT {cols(q)} FROM (SELECT {cols(q)}, {q(VideoJob, 'created_at')}, ROW_NUMBER() OVER "
        f"(PARTITION BY {q(VideoJob, 'owner')} ORDER BY {q(VideoJob, 'created_at')}) AS nth FROM {q(VideoJob)} "
        f"WHERE {_waiting_where(q)}) AS w WHERE nth <= %s ORDER BY {q(VideoJob, 'created_at')}"
    )), [*WAITING, per_user])


def _needed_per_user(counts: dict, clocks: "Clocks", weights: dict, picks: int) -> int:
    """How many of each user's oldest waiting jobs the first `picks` of the fair order take, at most."""
    taken = dict.fromkeys(counts, 0)
    heap = [(clocks.start(u), u) for u, n in counts.items() if n]
    heapq.heapify(heap)
    for _ in range(picks):
        if not heap:
            break
        turn, user = heapq.heappop(heap)
        taken[user] += 1
        if taken[user] < counts[user]:
            heapq.heappush(heap, (turn + 1 / max(1, weights.get(user, 1)), user))
    return max(taken.values(), default=0)


def _hex(job_id) -> str:
    """A job id read without the ORM (SQLite: 32 hex digits; PostgreSQL: a UUID) as its usual text."""
    return str(uuid.UUID(job_id)) if isinstance(job_id, str) else str(job_id)


def claim_fields(url: str, place) -> dict:
    """A run's claim: the URL it is posted to and the ids it is posted with, stored (the writer also
    counting the submit) before anything is posted, so a crash after the POST finds them and does
    not post again. Written by the binding on a ready GPU, else by the worker (runner.claim_ids)."""
    return dict(prompt_id=str(uuid.uuid4()), client_id=uuid.uuid4().hex, comfyui_url=url,
                instance_id=place.instance_id, gpu_class=place.gpu_class)


def new_seed() -> int:
    """The seed of a run that was sent none."""
    return random.randrange(0, 2**53)


def _bind(binds, gpu_places, result, now, then=()):
    """Compare-and-set each job onto its place; the worker is handed each one after commit. `then`:
    further prebuilt writes, made in the same round trip (i2v.core.sql.execute) after the bindings.

    On a place that is ready, the binding also claims the run (what runner.claim_ids does for a job
    bound to a GPU still booting): its prompt and client ids, the URL and the seed are stored here,
    before anything is posted, so the worker's first write is the POST's own record."""
    by_key = {p.key: p for p in gpu_places}
    if binds:
        # Registered before the writes below register their announcements: after the commit the
        # workers get their jobs first, and waiting pages and scripts hear of them next.
        transaction.on_commit(lambda: [q_tasks.async_task("generation.tasks.run_job", str(i), group="jobs")
                                       for i in result.bound])
    binding = []
    for job_id, key in binds:
        fields = {"place": key, "bound_at": now, "queue_position": None, "note": ""}
        seed = None
        place = by_key.get(key)
        if key == FAL:
            fields.update(backend=VideoJob.Backend.FAL)
        elif place is not None:
            if place.instance_id:
                fields.update(instance_id=place.instance_id)
                capacity.touch_instance(place.instance_id, now)
            if place.ready_at is None and place.url:
                seed = new_seed()
                fields.update(claim_fields(place.url, place))
                result.claimed_seed[str(job_id)] = seed
        binding.append((job_id, fields, _bind_update(job_id, fields, seed)))
    won = execute(*(update for _, _, update in binding), *then)
    for (job_id, fields, _), rows in zip(binding, won):
        if rows:
            written([job_id], fields)
            result.bound.append(job_id)
            result.placed[str(job_id)] = fields


def _bind_update(job_id, fields: dict, seed: int | None) -> tuple[str, list]:
    """The binding's compare-and-set: the job gets `fields` only while it waits unplaced and
    unclaimed; with `seed` the run is claimed too (its submit counted, `seed` kept unless the job
    has one). Prebuilt SQL, one per set of fields: the ORM took ~1 ms of CPU to compile it on every
    job's way to its GPU. The caller announces the write (models.written)."""
    names = tuple(fields)

    def build(q):
        sets = [f"{q(VideoJob, name)} = %s" for name in names]
        if seed is not None:
            sets += [f"{q(VideoJob, 'submit_count')} = {q(VideoJob, 'submit_count')} + 1",
                     f"{q(VideoJob, 'seed')} = COALESCE({q(VideoJob, 'seed')}, %s)"]
        return (f"UPDATE {q(VideoJob)} SET {', '.join(sets)} WHERE {q(VideoJob, 'id')} = %s AND {q(VideoJob, 'place')} = '' "
                f"AND {q(VideoJob, 'prompt_id')} = '' AND {q(VideoJob, 'status')} IN ({marks(len(WAITING))})")

    sql = prebuilt(f"videojob.bind:{','.join(names)}:{seed is not None}", build)
    params = save_values(VideoJob, fields)
    params += [seed] if seed is not None else []
    params += [VideoJob._meta.pk.get_db_prep_value(job_id, connection), *WAITING]
    return sql, params


def _fail_or_note_waiting(the_plan, gpu_places, config, result, now):
    """Fail the waiting jobs nothing can ever take, and those whose only GPUs stayed unreachable
    past the grace; say on the others why they wait."""
    bound = set(result.bound)
    ready = [p for p in gpu_places if not p.down and p.ready_at is None]
    booting = [p for p in gpu_places if p.ready_at is not None]
    down = [p for p in gpu_places if p.down]
    grace = timedelta(seconds=settings.I2V_COMFYUI_GRACE)
    stranded = [job.id for job in the_plan.unplaceable]
    if stranded and not booting and not down:
        rentable = capacity.rental_room(config) > 0
        for jid, created in VideoJob.objects.filter(pk__in=stranded).values_list("id", "created_at"):
            if not rentable:
                _fail_waiting(jid, NO_GPU if config.gpu_provider != GpuConfig.Provider.VASTAI else
                              f"No vast.ai GPU can be rented: {capacity.rental_blocker(config)}", result)
            elif (died := boot_failures_exhausted(created)) is not None:
                _fail_waiting(jid, f"No vast.ai GPU could be readied for this job in {MAX_BOOT_ATTEMPTS} attempts; "
                                   f"the last: {died.error}", result)
    if down and not ready and not booting:
        place = down[0]
        since = capacity.down_since(place.url)
        error = _down_error(place.url)
        for jid, unreachable_since in VideoJob.objects.filter(
                place="", status__in=WAITING, unreachable_since__lt=now - grace).values_list("id", "unreachable_since"):
            _fail_waiting(jid, f"ComfyUI at {place.url} has been unreachable since "
                               f"{timezone.localtime(since or unreachable_since):%H:%M:%S} ({error}).",
                          result)
    for job in the_plan.fal_blocked:
        _note(job.id, "Waiting: your fal.ai budget for today is spent (the limit is in your user quota); "
                      "the job starts when it allows.")
    if down and not ready:
        place = down[0]
        since = capacity.down_since(place.url) or now
        _note_all(unreachable_note(place.url, since, failures.short_reason(_down_error(place.url))), exclude=bound)
    elif booting and not ready:
        instance = VastInstance.objects.filter(pk=booting[0].instance_id).first()
        if instance is not None:
            what = f"instance {instance.vast_id}" if instance.vast_id else "renting"
            gpu = f", {instance.gpu_name} at ${instance.dph_total:.3f}/h" if instance.gpu_name else ""
            status = f": {instance.state}" + (f", {instance.status_msg}" if instance.status_msg else "")
            _note_all(f"Waiting for a vast.ai GPU ({what}{gpu}){status}"[:300], exclude=bound, provisioning=True)


def unreachable_note(url: str, since: datetime, reason: str) -> str:
    """What a job that waits for an unreachable ComfyUI says: since when, why, and until when it is retried."""
    until = since + timedelta(seconds=settings.I2V_COMFYUI_GRACE)
    return (f"ComfyUI at {url} unreachable since {timezone.localtime(since):%H:%M:%S} ({reason}); "
            f"retrying until {timezone.localtime(until):%H:%M:%S}.")[:300]


def _down_error(url) -> str:
    from gpu.models import PlaceHealth

    return PlaceHealth.objects.filter(url=url).values_list("error", flat=True).first() or "no answer"


def _note(job_id, note):
    VideoJob.objects.filter(pk=job_id).exclude(note=note).update(note=note[:300])


def _note_all(note, *, exclude=(), provisioning=False):
    """One note on every waiting job (one statement; only rows whose note differs are written)."""
    waiting = VideoJob.objects.filter(place="", status__in=WAITING).exclude(pk__in=list(exclude))
    waiting.exclude(note=note[:300]).update(note=note[:300])
    if provisioning:
        now = timezone.now()
        waiting.filter(status=S.QUEUED).update(status=S.PROVISIONING, provisioning_at=now, status_changed_at=now)


def _fail_waiting(job_id, message, result):
    job = VideoJob.objects.filter(pk=job_id, place="").first()
    # The failure's class and its advice come from the message (generation/failures.py).
    if job is not None and not job.is_terminal and failures.fail_job(job, message, settle=transaction.on_commit):
        result.failed.append(job_id)


def _requeue_orphans(gpu_places, occupying, result) -> set:
    """Jobs bound to a place that no longer exists (an instance destroyed, a server removed) go
    back to the queue. A job ComfyUI had started there is lost with its place: it runs again
    elsewhere, counted against the runs it may have. `occupying`: (id, place, …) of the jobs bound
    to a place and not done with it. The ids of those requeued."""
    known = {p.key for p in gpu_places if p.ready_at is None} | {FAL}
    requeued = set()
    for job_id, key, *_ in occupying:
        if key in known:
            continue
        job = VideoJob.objects.filter(pk=job_id).first()
        if job is not None and requeue(job, "the GPU it was placed on is gone"):
            result.requeued.append(job_id)
            requeued.add(job_id)
    return requeued


def _idle_instances(config, gpu_places, bound, sims, now) -> list:
    """Running vast.ai instances with nothing bound, nothing planned and idle past idle_minutes.
    Adopted instances without auto-destroy are never among them."""
    planned = {s.key for s in sims if s.planned}
    idle_for = timedelta(minutes=config.idle_minutes)
    out = []
    for place in gpu_places:
        if not place.instance_id or place.ready_at is not None or bound.get(place.key) or place.key in planned:
            continue
        instance = VastInstance.objects.reapable().filter(pk=place.instance_id, state=VastInstance.State.RUNNING).first()
        if instance is None or active_jobs_on(instance.pk):
            continue  # gone, or still serving a job (an upload of its video)
        if now - capacity.idle_since(instance) >= idle_for:
            out.append(instance.pk)
    return out


def _summary(sims, free_at, estimate, rows, now_s) -> dict:
    """What the job read needs to estimate a start: when each GPU is next free (with what is
    bound to it now), and the length of a typical waiting run."""
    kinds = {row[3:7] for row in rows[:500]}
    runs = [estimate(kind, s.gpu_class) for kind in kinds for s in sims]
    return {
        "at": now_s,
        "free_at": free_at[:256],
        "run_seconds": sum(runs) / len(runs) if runs else None,
    }


# ---------------------------------------------------------------------- moving jobs


def requeue(job: VideoJob, reason: str) -> bool:
    """Send a bound job back to the queue (its place refused it or is gone); it is placed again.

    A job ComfyUI may already have (POST /prompt attempted) counts as a run: after
    MAX_SUBMITS of them the job fails instead. The one move back to `queued` there is: the job
    never ran to its end anywhere."""
    from generation.runner import MAX_SUBMITS, finish_accounting  # noqa: PLC0415 -- runner imports this module

    if job.is_terminal:
        return False
    if job.posted_at is not None and job.submit_count >= MAX_SUBMITS:
        won = job.transition(S.FAILED, error=f"Lost its GPU {job.submit_count} times ({reason}); giving up. Try again.")
        if won:
            finish_accounting(job)
        return False
    now = timezone.now()
    won = VideoJob.objects.filter(pk=job.pk, place=job.place, status=job.status).update(
        status=S.QUEUED, status_changed_at=now, place="", bound_at=None, posted_at=None, prompt_id="", client_id="",
        comfyui_url="", instance=None, step=0, progress=0.0, node_progress={}, current_node="", queue_position=None,
        node_timings=[], eta_at=None,
        note=f"Back in the queue: {reason}."[:300],
    )
    if won:
        log.info("job %s: back in the queue (%s)", job.pk, reason)
        job.refresh_from_db()
    return bool(won)


def record_run(job: VideoJob, seconds: float | None = None) -> None:
    """Learn from a finished run how long runs of its kind take on its class of GPU: `seconds`
    of execution when the place reports it, else from running to uploading."""
    if not job.gpu_class:
        return
    if seconds is None:
        start, end = job.started_at or job.submitted_at, job.uploading_at or job.finished_at
        if start is None or end is None:
            return
        seconds = (end - start).total_seconds()
    if seconds < 0:
        return
    seconds = max(seconds, 0.001)  # ComfyUI's timestamps are in ms: a trivial run can report 0
    key = dict(workflow_slug=job.workflow_slug, width=job.width, height=job.height, frames=job.frames,
               gpu_class=job.gpu_class)
    if not _learn(key, seconds):  # the first run of its kind (a concurrent first one may make the row first)
        RunStat.objects.get_or_create(**key)
        _learn(key, seconds)


_KIND = ("workflow_slug", "width", "height", "frames", "gpu_class")


def _learn(key: dict, seconds: float) -> int:
    """Add one run to its kind's moving mean over about the last ten runs (GPUs and drivers change),
    computed by the database in the UPDATE itself: one statement, and two workers learning at
    once each add theirs. 0 when the kind has no row yet. Prebuilt: every run's end makes it, and
    the ORM took 1.5 ms of CPU to compile its CASE while the next job was being dispatched."""
    postgresql = connection.vendor == "postgresql"
    least, real = ("LEAST", "double precision") if postgresql else ("MIN", "REAL")  # SQLite's two-argument MIN
    sql = prebuilt("runstat.learn", lambda q: (
        f"UPDATE {q(RunStat)} SET {q(RunStat, 'mean_seconds')} = CASE WHEN {q(RunStat, 'runs')} = 0 THEN %s "
        f"ELSE {q(RunStat, 'mean_seconds')} + (%s - {q(RunStat, 'mean_seconds')}) / "
        f"{least}(CAST({q(RunStat, 'runs')} AS {real}) + 1.0, 10.0) END, "
        f"{q(RunStat, 'runs')} = {q(RunStat, 'runs')} + 1, {q(RunStat, 'updated_at')} = %s "
        f"WHERE {' AND '.join(f'{q(RunStat, name)} = %s' for name in _KIND)}"))
    updated_at = RunStat._meta.get_field("updated_at").get_db_prep_value(timezone.now(), connection)
    return write(sql, [seconds, seconds, updated_at, *(key[name] for name in _KIND)])


# ---------------------------------------------------------------------- after the pass


def carry_out(result: PassResult) -> None:
    """Rent and destroy what the pass decided, outside its lock (each is a slow vast.ai call)."""
    if result.rent:
        live = VastInstance.objects.filter(state__in=VastInstance.LIVE).count()
        target = live + result.rent
        origin = VastInstance.Origin.SCALE_OUT if live else VastInstance.Origin.JOB
        for _ in range(result.rent):
            try:
                # live_below: another pass renting at the same time never passes the target.
                if create_instance(origin=origin, live_below=target) is None:
                    break
                result.rented += 1
            except ProvisioningError as exc:
                _rental_failed(exc)
                break
    for pk in result.destroy:
        instance = VastInstance.objects.filter(pk=pk, state=VastInstance.State.RUNNING).first()
        if instance is None or VideoJob.objects.filter(place=f"vast:{pk}", status__in=OCCUPYING).exists():
            continue
        config = GpuConfig.get()
        try:
            destroy_instance(instance, f"idle for more than {config.idle_minutes} min")
            result.destroyed += 1
        except ProvisioningError as exc:
            log.warning("could not destroy idle instance %s: %s", instance.vast_id, exc)


TRANSIENT_GRACE = 600  # seconds jobs wait through vast.ai's transient refusals before failing


def _rental_failed(exc) -> None:
    """No GPU could be rented. Jobs that have nowhere else to go fail with the reason, unless it
    is transient (vast.ai busy or unreachable) and they have not waited long."""
    gpu_places = capacity.places()
    if any(not p.down for p in gpu_places):
        log.warning("scale-out: %s", exc)
        return
    now = timezone.now()
    waiting = VideoJob.objects.filter(place="", status__in=WAITING).exclude(backend=VideoJob.Backend.FAL)
    if exc.transient:
        waiting = waiting.filter(created_at__lt=now - timedelta(seconds=TRANSIENT_GRACE))
        VideoJob.objects.filter(place="", status__in=WAITING).exclude(backend=VideoJob.Backend.FAL).update(
            note=f"Waiting for a vast.ai GPU: {exc}; retrying."[:300])
    result = PassResult()
    for job_id in waiting.values_list("id", flat=True):
        _fail_waiting(job_id, str(exc), result)


def boot_failures_exhausted(since: datetime) -> VastInstance | None:
    """The last of MAX_BOOT_ATTEMPTS instances that died booting since `since`, if there were that many."""
    failures = list(VastInstance.objects.filter(created_at__gte=since).exclude(error="").order_by("-created_at")
                    [:MAX_BOOT_ATTEMPTS])
    return failures[0] if len(failures) >= MAX_BOOT_ATTEMPTS else None


def place_now(seen: int | None = None) -> PassResult:
    """A pass right here (binding is quick) for what the caller just committed, unless another
    pass saw it meanwhile (`seen`: passes_so_far() read after the commit; run_pass reads it when
    it must, if not given); renting, destroying and waiting on the clock are left to a `schedule`
    task, so a request or a job's worker is not held by them."""
    result = run_pass(seen=AFTER_COMMIT if seen is None else seen)
    if result.rent or result.destroy or result.needs_tick:
        q_tasks.async_task("generation.tasks.schedule", group="jobs")
    return result


def place_waiting() -> PassResult | None:
    """place_now() when a job waits, placed or not (a placed one may be bound to a place that just
    went), else nothing: one indexed look instead of a whole pass on every job's way out. What a
    pass does besides placing (giving back idle GPUs, requeueing running jobs whose place went) is
    time's work, and the watchdog's pass every minute does it."""
    sql = prebuilt("videojob.any_waiting", lambda q: (  # on every job's way out
        f"SELECT 1 FROM {q(VideoJob)} WHERE {q(VideoJob, 'status')} IN ({marks(len(WAITING))}) "
        f"AND NOT {q(VideoJob, 'cancel_requested')} LIMIT 1"))
    if not fetch(sql, list(WAITING)):
        return None
    return place_now()


def slot_freed() -> None:
    """A GPU slot just freed: place the next job at once (a failing pass is left to the next one)."""
    try:
        place_waiting()
    except Exception as exc:  # noqa: BLE001 - the job that freed the slot must go on storing its video
        log.warning("scheduling pass after a freed slot failed: %s", exc)


def on_capacity_changed(sender, **kwargs) -> None:
    """An instance became ready or ended: place the waiting jobs now."""
    q_tasks.async_task("generation.tasks.schedule", group="jobs")


def request_pass(job: VideoJob | None = None) -> None:
    """Place a new job once the current transaction commits: a pass in this process (the job reaches
    a free GPU without waiting for a worker to pick up a task); if that fails, a worker's task.
    `job`, when this pass placed it, gets its binding's fields (the answer shows where it runs,
    without reading the job or its queue again)."""
    def place():
        try:
            result = place_now()
            if job is not None and str(job.pk) in result.placed:
                for name, value in result.placed[str(job.pk)].items():
                    setattr(job, name, value)
                if str(job.pk) in result.claimed_seed:  # the binding claimed the run (_bind)
                    job.submit_count += 1
                    if job.seed is None:
                        job.seed = result.claimed_seed[str(job.pk)]
        except Exception as exc:  # noqa: BLE001 - the job is stored: a worker's pass places it
            log.warning("scheduling pass after a new job failed (%s); a worker will place it", exc)
            q_tasks.async_task("generation.tasks.schedule", group="jobs")

    transaction.on_commit(place)


# ---------------------------------------------------------------------- what a user sees


def active_jobs_on(instance_pk) -> int:
    """Jobs working on a vast.ai instance (what gpu/ shows and reaps by)."""
    return VideoJob.objects.filter(instance_id=instance_pk, status__in=VideoJob.ACTIVE).count()


def gpu_jobs_waiting() -> bool:
    """Whether any job waits for a GPU (a boot that failed is replaced only then)."""
    return VideoJob.objects.filter(place="", status__in=WAITING).exclude(backend=VideoJob.Backend.FAL).exists()


def waiting_count(user_id) -> int:
    return VideoJob.objects.filter(owner_id=user_id, place="", status__in=WAITING).count()


def waiting_and_limit_read(user_id) -> tuple[str, list]:
    """waiting_and_limit()'s prebuilt SELECT and its parameters (i2v.core.sql.read_ahead)."""
    return prebuilt("videojob.waiting_and_limit", lambda q: (
        f"SELECT COUNT(*), (SELECT {q(UserQuota, 'max_waiting')} FROM {q(UserQuota)} WHERE {q(UserQuota, 'user')} = %s) "
        f"FROM {q(VideoJob)} WHERE {q(VideoJob, 'owner')} = %s AND {q(VideoJob, 'place')} = '' "
        f"AND {q(VideoJob, 'status')} IN ({marks(len(WAITING))})")), [user_id, user_id, *WAITING]


def waiting_and_limit(user_id) -> tuple[int, int]:
    """(the user's jobs waiting unplaced, how many they may have waiting), checked on every job's
    request: one prebuilt statement, where the ORM took two round trips and compiled two queries
    (2.9 ms in-process on PostgreSQL, against 0.4 ms)."""
    [(waiting, limit)] = fetch(*waiting_and_limit_read(user_id))
    return waiting, (limit if limit is not None else UserQuota(user_id=user_id).waiting_limit)


def queue_estimate(job: VideoJob, now: datetime | None = None) -> tuple[int | None, datetime | None]:
    """(jobs ahead of this one in the fair order, expected start) for a waiting job; (None, None)
    for any other.

    Computed when asked from per-user counts, so it is exact for the order however long the
    queue, and the start assumes the GPUs' next free times the last pass saw."""
    if job.place or job.status not in WAITING:
        return None, None
    now = now or timezone.now()
    rows = (VideoJob.objects.filter(place="", status__in=WAITING, cancel_requested=False)
            .values("owner_id").annotate(n=Count("id")))
    waiting = {r["owner_id"]: r["n"] for r in rows}
    weights = dict(UserQuota.objects.filter(user_id__in=list(waiting)).values_list("user_id", "weight"))
    mine_before = VideoJob.objects.filter(owner_id=job.owner_id, place="", status__in=WAITING, cancel_requested=False,
                                          created_at__lt=job.created_at).count()
    state = SchedulerState.objects.filter(pk=1).values_list("summary", flat=True).first() or {}
    clocks = Clocks(state.get("clocks"))
    turn = clocks.start(job.owner_id) + mine_before / max(1, weights.get(job.owner_id, 1))
    ahead = mine_before
    for user, n in waiting.items():
        if user == job.owner_id:
            continue
        # Their i-th job comes first when start + i / weight <= this job's turn (ties counted ahead).
        w = max(1, weights.get(user, 1))
        before = turn - clocks.start(user)
        if before >= 0:
            ahead += min(n, int(before * w + 1e-9) + 1)
    free_at = list(state.get("free_at") or [])
    run = float(state.get("run_seconds") or GpuConfig.get().default_run_seconds)
    if not free_at:
        return ahead, None
    base = max(now.timestamp(), state.get("at", now.timestamp()))
    heap = [max(base, t) for t in free_at]
    heapq.heapify(heap)
    # List scheduling of the jobs ahead on the GPUs' next free times; bounded for very long queues.
    for _ in range(min(ahead, 20000)):
        heapq.heappush(heap, heapq.heappop(heap) + run)
    start = heap[0]
    if ahead > 20000:
        start += (ahead - 20000) * run / len(heap)
    return ahead, datetime.fromtimestamp(start, tz=timezone.get_current_timezone())
