"""The scheduler: the one place that decides where and when every job runs.

Jobs wait in i2v's queue, not in a GPU's. A pass (``run_pass``) takes the waiting jobs in a
fair order (weighted round-robin across users, each user's own jobs oldest first), and binds
a job to a place only when that place has a free slot: a configured ComfyUI URL, a ready
vast.ai instance (``gpu.capacity``), or fal.ai (unbounded, paid per clip). Where a job goes
follows the operator's policy (``GpuConfig.placement_policy``):

- ``gpu_only``: the GPU that finishes it soonest (the cheaper one on a tie); fal.ai only for
  jobs that ask for it (``backend: fal``);
- ``cheapest``: a GPU when one can finish the job before its deadline (GPUs are paid for by
  the hour whether they work or not), else fal.ai when it can, else the earliest finish;
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
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone
import django_q.tasks as q_tasks

from generation.models import RunStat, SchedulerState, UserQuota, VideoJob
from gpu import capacity
from gpu.lifecycle import ProvisioningError, create_instance, destroy_instance
from gpu.models import GpuConfig, VastInstance

log = logging.getLogger(__name__)
S = VideoJob.Status

FAL = "fal"
WAITING = (S.QUEUED, S.PROVISIONING)
# A bound job holds its place's slot until ComfyUI is done with it (uploading frees the GPU).
OCCUPYING = (S.QUEUED, S.PROVISIONING, S.SUBMITTED, S.RUNNING)
MAX_BOOT_ATTEMPTS = 3  # failed vast.ai boots while jobs waited before they fail
TROUBLESHOOTING = (
    "Check that ComfyUI is running and reachable at the configured URL (Test connection in the admin "
    "or POST /api/gpu/test-connection); a vast.ai tunnel URL changes when the instance restarts."
)
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
    starts: dict = field(default_factory=dict)  # job_id -> expected start (epoch) of the first jobs in order
    order: list = field(default_factory=list)  # job ids in fair order (the first few thousand)
    late: list = field(default_factory=list)  # (job, start) of jobs a new instance would serve sooner
    unplaceable: list = field(default_factory=list)  # jobs no place can take (nothing configured)
    rent: int = 0
    idle_instances: list = field(default_factory=list)
    fal_blocked: list = field(default_factory=list)  # fal.ai jobs over their user's daily budget


class Estimator:
    """Expected seconds of a run of one kind on one class of GPU."""

    def __init__(self, stats: dict, default: float):
        self.stats = stats
        self.default = default

    @classmethod
    def load(cls, default: float) -> "Estimator":
        stats = {(r.workflow_slug, r.width, r.height, r.frames, r.gpu_class): r.mean_seconds
                 for r in RunStat.objects.filter(runs__gt=0)}
        return cls(stats, default)

    def __call__(self, kind: tuple, gpu_class: str) -> float:
        return self.stats.get((*kind, gpu_class)) or self.default


def fair_order(jobs_by_user: dict, running: dict, weights: dict):
    """Waiting jobs, round-robin across users weighted by `weights`, each user's jobs in order.

    A user's i-th waiting job comes at virtual time (jobs they already run + i + 1) / weight, so
    a user who holds GPUs now waits behind those who hold none, and weight 2 gets two turns to
    weight 1's one."""
    heap = []
    for user, jobs in jobs_by_user.items():
        if jobs:
            w = max(1, weights.get(user, 1))
            heapq.heappush(heap, ((running.get(user, 0) + 1) / w, jobs[0].created, user, 0))
    while heap:
        _, _, user, i = heapq.heappop(heap)
        jobs = jobs_by_user[user]
        yield jobs[i]
        if i + 1 < len(jobs):
            w = max(1, weights.get(user, 1))
            heapq.heappush(heap, ((running.get(user, 0) + i + 2) / w, jobs[i + 1].created, user, i + 1))


@dataclass
class Inputs:
    now: float
    policy: str
    places: list  # SimPlace, ready or booting
    jobs_by_user: dict
    running: dict  # user -> jobs bound now
    weights: dict
    running_limit: dict  # user -> max bound at once
    fal_enabled: bool
    fal_room: dict  # user -> $ left today on fal.ai
    estimate: Estimator
    boot_seconds: float
    rental_room: int
    slots_per_instance: int
    detail: int = 2000  # jobs whose expected start is recorded


def plan(inp: Inputs) -> Plan:
    """Where each waiting job goes, given the places and what they are planned to do. Pure."""
    out = Plan()
    now = inp.now
    running = dict(inp.running)
    fal_room = dict(inp.fal_room)
    gpus = inp.places
    for n, job in enumerate(fair_order(inp.jobs_by_user, inp.running, inp.weights)):
        can_run = running.get(job.owner_id, 0) < inp.running_limit.get(job.owner_id, 1)
        best = None  # (finish, cost, place or None for fal, start)
        fal_ok = inp.fal_enabled and (job.backend == FAL or inp.policy != GpuConfig.Policy.GPU_ONLY)
        if fal_ok and fal_room.get(job.owner_id, Decimal("0")) < job.fal_price:
            fal_ok = False
            if job.backend == FAL:
                out.fal_blocked.append(job)
                continue
        candidates = []
        if fal_ok:
            candidates.append((now + inp.estimate(job.kind, FAL), job.fal_price, None, now))
        if job.backend != FAL:
            for place in gpus:
                start = max(now, place.busy_until, place.ready_at or now)
                run = inp.estimate(job.kind, place.gpu_class)
                candidates.append((start + run, place.dph * Decimal(run) / 3600, place, start))
        if not candidates:
            out.unplaceable.append(job)
            continue
        best = _choose(inp.policy, candidates, job.deadline)
        finish, cost, place, start = best
        if n < inp.detail:
            out.order.append(job.id)
            out.starts[job.id] = start
        if place is None:
            if can_run:
                out.binds.append((job.id, FAL))
                running[job.owner_id] = running.get(job.owner_id, 0) + 1
                fal_room[job.owner_id] = fal_room.get(job.owner_id, Decimal("0")) - job.fal_price
            continue
        place.busy_until = finish
        place.planned += 1
        if can_run and place.free > 0 and place.ready_at is None:
            out.binds.append((job.id, place.key))
            place.free -= 1
            running[job.owner_id] = running.get(job.owner_id, 0) + 1
        elif start - now > inp.boot_seconds or (job.deadline is not None and finish > job.deadline
                                                 and now + inp.boot_seconds + inp.estimate(job.kind, "vast") <= job.deadline):
            out.late.append((job, start))
    out.rent = _instances_wanted(inp, out.late, out.unplaceable)
    return out


def _choose(policy: str, candidates: list, deadline: float | None):
    """The candidate (finish, cost, place or None for fal, start) the policy picks.

    GPUs that are rented or owned are paid for whether they work or not, so among them the
    earliest finish wins; what a place costs decides between those GPUs and fal.ai, which is
    paid per clip."""
    fastest = min(candidates, key=lambda c: (c[0], c[1]))
    if policy == GpuConfig.Policy.FASTEST:
        return fastest
    meeting = [c for c in candidates if deadline is None or c[0] <= deadline]
    gpus = [c for c in meeting if c[2] is not None]
    if gpus:
        return min(gpus, key=lambda c: (c[0], c[1]))
    if meeting:
        return min(meeting, key=lambda c: (c[1], c[0]))
    return fastest


def _instances_wanted(inp: Inputs, late: list, unplaceable: list) -> int:
    """One new instance per boot time's worth of work that would otherwise wait longer than a
    boot, within the caps (an instance with less to do than its boot is not worth renting);
    at least one when jobs have no GPU at all."""
    stranded = [job for job in unplaceable if job.backend != FAL]
    needy = [job for job, _ in late] + stranded
    if not needy or inp.rental_room <= 0:
        return 0
    work = sum(inp.estimate(job.kind, "vast") for job in needy)
    per_instance = max(inp.boot_seconds, max(inp.estimate(job.kind, "vast") for job in needy), 1.0)
    wanted = int(work / per_instance + 0.5)
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
    requeued: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    rent: int = 0
    destroy: list = field(default_factory=list)  # VastInstance pks
    waiting: int = 0
    needs_tick: bool = False  # jobs wait on something only time changes (a down URL, a booting GPU)
    ms: float = 0.0
    rented: int = 0  # what carry_out did
    destroyed: int = 0


def _lock() -> SchedulerState:
    SchedulerState.objects.get_or_create(pk=1)
    return SchedulerState.objects.select_for_update().get(pk=1)


def run_pass(now: datetime | None = None) -> PassResult:
    """One scheduling pass: requeue jobs whose place is gone, bind waiting jobs to free slots,
    decide scale out and in. Safe to run from any number of workers at once."""
    started = time.perf_counter()
    result = PassResult()
    with transaction.atomic():
        state = _lock()
        now = now or timezone.now()
        config = GpuConfig.get()
        gpu_places = capacity.places(config, now)
        _requeue_orphans(gpu_places, result)
        estimate = Estimator.load(float(config.default_run_seconds))

        bound = defaultdict(list)  # place key -> [(kind, started epoch)]
        running = defaultdict(int)
        for place, owner, slug, w, h, f, started_at in (
            VideoJob.objects.exclude(place="").filter(status__in=OCCUPYING)
            .values_list("place", "owner_id", "workflow_slug", "width", "height", "frames", "started_at")
        ):
            bound[place].append(((slug, w, h, f), _epoch(started_at)))
            running[owner] += 1

        rows = list(
            VideoJob.objects.filter(place="", status__in=WAITING, cancel_requested=False).order_by("created_at")
            .values_list("id", "owner_id", "created_at", "backend", "deadline_at", "workflow_slug", "width", "height",
                         "frames", "unreachable_since")
        )
        result.waiting = len(rows)
        jobs_by_user = defaultdict(list)
        for jid, owner, created, backend, deadline, slug, w, h, f, _ in rows:
            jobs_by_user[owner].append(WaitingJob(jid, owner, created.timestamp(), backend, _epoch(deadline), (slug, w, h, f)))
        owners = set(jobs_by_user) | set(running)
        quotas = {q.user_id: q for q in UserQuota.objects.filter(user_id__in=owners)}
        default = UserQuota()
        fal_enabled = bool(settings.FAL_KEY)
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
            weights={u: quotas.get(u, default).weight for u in owners},
            running_limit={u: quotas.get(u, default).running_limit for u in owners},
            fal_enabled=fal_enabled, fal_room=fal_room, estimate=estimate, boot_seconds=boot,
            rental_room=capacity.rental_room(config), slots_per_instance=config.slots_per_gpu,
        )
        free_at = sorted(max(s.busy_until, s.ready_at or 0.0) for s in sims)
        the_plan = plan(inp)

        _bind(the_plan.binds, gpu_places, result, now)
        _fail_or_note_waiting(rows, the_plan, gpu_places, config, result, now)
        result.rent = the_plan.rent
        result.destroy = _idle_instances(config, gpu_places, bound, sims, now)
        booting = any(p.ready_at is not None for p in gpu_places)
        down = any(p.down for p in gpu_places)
        result.needs_tick = bool(result.waiting - len(result.bound)) and (booting or down or result.rent > 0)
        result.ms = (time.perf_counter() - started) * 1000
        state.last_pass_at = now
        state.pass_ms = result.ms
        state.summary = _summary(sims, free_at, estimate, rows, now_s)
        state.save(update_fields=["last_pass_at", "pass_ms", "summary"])
    return result


def _bind(binds, gpu_places, result, now):
    """Compare-and-set each job onto its place; the worker is handed each one after commit."""
    by_key = {p.key: p for p in gpu_places}
    for job_id, key in binds:
        fields = {"place": key, "bound_at": now, "queue_position": None, "note": ""}
        place = by_key.get(key)
        if key == FAL:
            fields.update(backend=VideoJob.Backend.FAL)
        elif place is not None and place.instance_id:
            fields.update(instance_id=place.instance_id)
            capacity.touch_instance(place.instance_id, now)
        won = VideoJob.objects.filter(pk=job_id, place="", status__in=WAITING).update(**fields)
        if won:
            result.bound.append(job_id)
    if result.bound:
        ids = [str(i) for i in result.bound]
        transaction.on_commit(lambda: [q_tasks.async_task("generation.tasks.run_job", i, group="jobs") for i in ids])


def _fail_or_note_waiting(rows, the_plan, gpu_places, config, result, now):
    """Fail the waiting jobs nothing can ever take, and those whose only GPUs stayed unreachable
    past the grace; say on the others why they wait."""
    unplaceable = {job.id for job in the_plan.unplaceable}
    bound = set(result.bound)
    ready = [p for p in gpu_places if not p.down and p.ready_at is None]
    booting = [p for p in gpu_places if p.ready_at is not None]
    down = [p for p in gpu_places if p.down]
    grace = timedelta(seconds=settings.I2V_COMFYUI_GRACE)
    rentable = capacity.rental_room(config) > 0
    for jid, _, created, backend, _, _, _, _, _, unreachable_since in rows:
        if jid in bound:
            continue
        if jid in unplaceable and not booting and not down:
            if not rentable:
                _fail_waiting(jid, NO_GPU if config.gpu_provider != GpuConfig.Provider.VASTAI else
                              f"No vast.ai GPU can be rented: {capacity.rental_blocker(config)}", result)
            elif (died := boot_failures_exhausted(created)) is not None:
                _fail_waiting(jid, f"No vast.ai GPU could be readied for this job in {MAX_BOOT_ATTEMPTS} attempts; "
                                   f"the last: {died.error}", result)
        elif (unreachable_since is not None and not ready and not booting and down
              and now - unreachable_since > grace):
            place = down[0]
            since = capacity.down_since(place.url)
            error = _down_error(place.url)
            _fail_waiting(jid, f"ComfyUI at {place.url} has been unreachable since "
                               f"{timezone.localtime(since or unreachable_since):%H:%M:%S} ({error}). {TROUBLESHOOTING}",
                          result)
    for job in the_plan.fal_blocked:
        _note(job.id, "Waiting: your fal.ai budget for today is spent (the limit is in your user quota); "
                      "the job starts when it allows.")
    if down and not ready:
        place = down[0]
        since = capacity.down_since(place.url) or now
        until = since + grace
        _note_all(f"ComfyUI at {place.url} unreachable since {timezone.localtime(since):%H:%M:%S} "
                  f"({_down_error(place.url)}); retrying until {timezone.localtime(until):%H:%M:%S}.", exclude=bound)
    elif booting and not ready:
        instance = VastInstance.objects.filter(pk=booting[0].instance_id).first()
        if instance is not None:
            what = f"instance {instance.vast_id}" if instance.vast_id else "renting"
            gpu = f", {instance.gpu_name} at ${instance.dph_total:.3f}/h" if instance.gpu_name else ""
            status = f": {instance.state}" + (f", {instance.status_msg}" if instance.status_msg else "")
            _note_all(f"Waiting for a vast.ai GPU ({what}{gpu}){status}"[:300], exclude=bound, provisioning=True)


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
    from generation.runner import finish_accounting  # noqa: PLC0415 -- runner imports this module

    job = VideoJob.objects.filter(pk=job_id, place="").first()
    if job is not None and not job.is_terminal and job.transition(S.FAILED, error=message[:4000]):
        result.failed.append(job_id)
        transaction.on_commit(lambda: finish_accounting(job))


def _requeue_orphans(gpu_places, result):
    """Jobs bound to a place that no longer exists (an instance destroyed, a server removed) go
    back to the queue. A job ComfyUI had started there is lost with its place: it runs again
    elsewhere, counted against the runs it may have."""
    known = {p.key for p in gpu_places if p.ready_at is None} | {FAL}
    stale = (VideoJob.objects.exclude(place="").exclude(place__in=known).filter(status__in=OCCUPYING)
             .values_list("id", "place"))
    for job_id, key in stale:
        job = VideoJob.objects.filter(pk=job_id).first()
        if job is not None and requeue(job, "the GPU it was placed on is gone"):
            result.requeued.append(job_id)


def _idle_instances(config, gpu_places, bound, sims, now) -> list:
    """Running vast.ai instances with nothing bound, nothing planned and idle past idle_minutes.
    Adopted instances without auto-destroy are never among them."""
    planned = {s.key for s in sims if s.planned}
    idle_for = timedelta(minutes=config.idle_minutes)
    out = []
    for place in gpu_places:
        if not place.instance_id or place.ready_at is not None or bound.get(place.key) or place.key in planned:
            continue
        instance = VastInstance.objects.filter(pk=place.instance_id, state=VastInstance.State.RUNNING).first()
        if instance is None or active_jobs_on(instance.pk):
            continue  # gone, or still serving a job (an upload of its video)
        if now - capacity.idle_since(instance) >= idle_for:
            out.append(instance.pk)
    return out


def _summary(sims, free_at, estimate, rows, now_s) -> dict:
    """What the job read needs to estimate a start: when each GPU is next free (with what is
    bound to it now), and the length of a typical waiting run."""
    kinds = {(row[5], row[6], row[7], row[8]) for row in rows[:500]}
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
    with transaction.atomic():
        stat, _ = RunStat.objects.select_for_update().get_or_create(**key)
        # A moving mean over about the last ten runs: GPUs and drivers change.
        weight = 1.0 / min(stat.runs + 1, 10)
        stat.mean_seconds = seconds if stat.runs == 0 else stat.mean_seconds + weight * (seconds - stat.mean_seconds)
        stat.runs += 1
        stat.save(update_fields=["mean_seconds", "runs", "updated_at"])


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


def on_capacity_changed(sender, **kwargs) -> None:
    """An instance became ready or ended: place the waiting jobs now."""
    q_tasks.async_task("generation.tasks.schedule", group="jobs")


def request_pass() -> None:
    """Ask a worker for a scheduling pass once the current transaction commits (a new job)."""
    requested = timezone.now().isoformat()
    transaction.on_commit(lambda: q_tasks.async_task("generation.tasks.schedule", requested, group="jobs"))


# ---------------------------------------------------------------------- what a user sees


def active_jobs_on(instance_pk) -> int:
    """Jobs working on a vast.ai instance (what gpu/ shows and reaps by)."""
    return VideoJob.objects.filter(instance_id=instance_pk, status__in=VideoJob.ACTIVE).count()


def gpu_jobs_waiting() -> bool:
    """Whether any job waits for a GPU (a boot that failed is replaced only then)."""
    return VideoJob.objects.filter(place="", status__in=WAITING).exclude(backend=VideoJob.Backend.FAL).exists()


def waiting_count(user_id) -> int:
    return VideoJob.objects.filter(owner_id=user_id, place="", status__in=WAITING).count()


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
    running = dict(VideoJob.objects.exclude(place="").filter(status__in=OCCUPYING)
                   .values("owner_id").annotate(n=Count("id")).values_list("owner_id", "n"))
    weights = dict(UserQuota.objects.filter(user_id__in=list(waiting)).values_list("user_id", "weight"))
    mine_before = VideoJob.objects.filter(owner_id=job.owner_id, place="", status__in=WAITING, cancel_requested=False,
                                          created_at__lt=job.created_at).count()
    w = max(1, weights.get(job.owner_id, 1))
    key = (running.get(job.owner_id, 0) + mine_before + 1) / w
    ahead = mine_before
    for user, n in waiting.items():
        if user == job.owner_id:
            continue
        wu = max(1, weights.get(user, 1))
        # Their i-th job (0-based) comes first when (r + i + 1) / wu <= key; ties are counted ahead.
        count = int(key * wu - running.get(user, 0) + 1e-9)
        ahead += max(0, min(n, count))
    state = SchedulerState.objects.filter(pk=1).values_list("summary", flat=True).first() or {}
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
