"""Traces of hours in seconds: the real planner (generation.scheduler.plan) against simulated GPUs.

Renting a vast.ai GPU takes a minute of boot and bills by the second, so a bursty day cannot run
in real time in a benchmark. Here every decision (where each job goes, how many GPUs to rent,
when one is idle long enough to destroy) is the planner's own, called with the simulated clock;
only the GPUs, vast.ai and fal.ai are simulated: a GPU runs its jobs one after another, a rental
is ready `boot` seconds after it is asked for, fal.ai finishes a clip in `fal_run` seconds.
"""

import heapq
import itertools
from dataclasses import dataclass, field
from decimal import Decimal

from generation.models import VideoJob
from generation.scheduler import FAL, Clocks, Estimator, Inputs, SimPlace, WaitingJob, plan
from gpu.models import GpuConfig

KIND = ("wan22-i2v", 832, 480, 81)


@dataclass
class Job:
    id: int
    arrival: float
    run: float  # seconds on a GPU
    deadline: float | None = None
    owner: int = 1
    place: str = ""
    start: float | None = None
    finish: float | None = None


@dataclass
class Gpu:
    key: str
    dph: float
    rented_at: float
    ready_at: float
    vast: bool
    slots: int = 2
    queue: list = field(default_factory=list)  # bound jobs; the first runs
    busy: float = 0.0
    idle_since: float = 0.0
    destroyed_at: float | None = None

    def busy_until(self, now):
        t = max(now, self.ready_at)
        for job in self.queue:
            t = (job.finish if job.start is not None else t + job.run)
        return t


class World:
    def __init__(self, *, own=0, max_vast=0, boot=60.0, dph=0.40, idle=120.0, fal_price=None, fal_run=60.0,
                 policy=GpuConfig.Policy.GPU_ONLY, vast_ready=0):
        self.now = 0.0
        self.boot, self.dph, self.idle, self.max_vast = boot, dph, idle, max_vast
        self.fal_price, self.fal_run, self.policy = fal_price, fal_run, policy
        self.gpus = [Gpu(f"own{i}", 0.0, 0.0, 0.0, vast=False) for i in range(own)]
        self.gpus += [Gpu(f"vast{i}", dph, 0.0, 0.0, vast=True) for i in range(vast_ready)]
        self.counter = itertools.count(len(self.gpus))
        self.fal_cost = 0.0
        self.done: list[Job] = []
        self.clocks = Clocks()

    # -- the GPUs
    def _start_next(self, gpu):
        if gpu.queue and gpu.queue[0].start is None and self.now >= gpu.ready_at:
            job = gpu.queue[0]
            job.start, job.finish = self.now, self.now + job.run

    def advance(self, until):
        """Run every GPU up to `until`, one event at a time."""
        while True:
            nxt = [(g.queue[0].finish, i) for i, g in enumerate(self.gpus) if g.queue and g.queue[0].start is not None]
            if not nxt or min(nxt)[0] > until:
                break
            t, i = min(nxt)
            self.now = t
            gpu = self.gpus[i]
            job = gpu.queue.pop(0)
            gpu.busy += job.run
            gpu.idle_since = t
            self.done.append(job)
            self._start_next(gpu)
        self.now = until
        for gpu in self.gpus:
            if gpu.destroyed_at is None:
                self._start_next(gpu)

    # -- one pass of the planner
    def schedule(self, waiting: list[Job], estimate):
        live = [g for g in self.gpus if g.destroyed_at is None]
        sims = [SimPlace(g.key, g.key if not g.vast else "vast", Decimal(str(g.dph)), max(0, g.slots - len(g.queue)),
                         g.busy_until(self.now), ready_at=g.ready_at if g.ready_at > self.now else None)
                for g in live]
        by_key = {g.key: g for g in live}
        jobs = {j.id: j for j in waiting}
        by_user = {}
        for j in sorted(waiting, key=lambda j: j.arrival):
            by_user.setdefault(j.owner, []).append(
                WaitingJob(j.id, j.owner, j.arrival, VideoJob.Backend.COMFYUI, j.deadline, KIND,
                           fal_price=Decimal(str(self.fal_price or 0))))
        running = {}
        inp = Inputs(now=self.now, policy=self.policy, places=sims, jobs_by_user=by_user, running=running, weights={}, clocks=self.clocks,
                     running_limit={u: 10**6 for u in by_user}, fal_enabled=self.fal_price is not None,
                     fal_room={u: Decimal(10**6) for u in by_user}, estimate=estimate, boot_seconds=self.boot,
                     rental_room=max(0, self.max_vast - sum(1 for g in live if g.vast)), slots_per_instance=2,
                     idle_seconds=self.idle, rent_dph=self.dph if self.max_vast else None)
        result = plan(inp)
        for job_id, key in result.binds:
            job = jobs[job_id]
            job.place = key
            if key == FAL:
                job.start, job.finish = self.now, self.now + self.fal_run
                self.fal_cost += self.fal_price
                self.done.append(job)
            else:
                by_key[key].queue.append(job)
                self._start_next(by_key[key])
        for _ in range(result.rent):
            self.gpus.append(Gpu(f"vast{next(self.counter)}", self.dph, self.now, self.now + self.boot, vast=True,
                                 idle_since=self.now + self.boot))
        planned = {s.key for s in sims if s.planned}
        for gpu in live:  # the scheduler's idle rule: nothing bound, nothing planned, idle long enough
            if gpu.vast and not gpu.queue and gpu.key not in planned and gpu.ready_at <= self.now \
                    and self.now - gpu.idle_since >= self.idle:
                gpu.destroyed_at = self.now
        return [j for j in waiting if not j.place]

    def run(self, trace: list[Job], estimate, tick=5.0):
        arrivals = sorted(trace, key=lambda j: j.arrival)
        waiting: list[Job] = []
        i = 0
        end = max(j.arrival for j in trace) + 24 * 3600
        while self.now < end:
            while i < len(arrivals) and arrivals[i].arrival <= self.now:
                waiting.append(arrivals[i])
                i += 1
            waiting = self.schedule(waiting, estimate)
            live = [g for g in self.gpus if g.destroyed_at is None]
            if i == len(arrivals) and not waiting and not any(g.queue for g in live) and not any(g.vast for g in live):
                break
            nexts = [self.now + tick]
            if i < len(arrivals):
                nexts.append(arrivals[i].arrival)
            nexts += [g.ready_at for g in live if g.ready_at > self.now]
            nexts += [g.queue[0].finish for g in live if g.queue and g.queue[0].start is not None]
            self.advance(max(self.now, min(nexts)))
        for gpu in self.gpus:
            if gpu.destroyed_at is None:
                gpu.destroyed_at = self.now

    # -- what it cost
    def billed(self):
        return sum(g.destroyed_at - g.rented_at for g in self.gpus if g.vast)

    def report(self):
        billed = self.billed()
        busy = sum(g.busy for g in self.gpus if g.vast)
        booting = sum(min(g.ready_at, g.destroyed_at) - g.rented_at for g in self.gpus if g.vast)
        missed = [j for j in self.done if j.deadline is not None and j.finish > j.deadline + 1e-6]
        cost = billed / 3600 * self.dph + self.fal_cost
        return {"billed": billed, "busy": busy, "booting": booting, "idle": billed - busy, "missed": missed,
                "cost": cost, "rentals": sum(1 for g in self.gpus if g.vast), "fal": self.fal_cost}


def exact(trace_run):
    """The planner's estimator, knowing the run time (the benchmark isolates placement from learning)."""
    return Estimator({(*KIND, "vast"): trace_run, (*KIND, FAL): 60.0, **{(*KIND, f"own{i}"): trace_run for i in range(4)}},
                     default=trace_run)


# ---------------------------------------------------------------------- 4. trace


def bursty_trace(run=60.0, deadline=900.0):
    """Six bursts over a working day: 40, 10, 60, 5, 30 and 80 jobs arriving within a minute or two."""
    jobs, n = [], 0
    for start, count in ((0, 40), (2 * 3600, 10), (3 * 3600, 60), (5 * 3600, 5), (6 * 3600, 30), (8 * 3600, 80)):
        for k in range(count):
            arrival = start + k * (90.0 / count)
            jobs.append(Job(n, arrival, run, arrival + deadline, owner=1 + k % 3))
            n += 1
    return jobs


def bench_trace():
    run, boot = 60.0, 60.0
    trace = bursty_trace(run)
    world = World(max_vast=8, boot=boot, dph=0.40, idle=60.0)
    world.run(trace, exact(run))
    r = world.report()
    idle_share = r["idle"] / r["billed"]
    print(f"trace: {len(trace)} jobs of {run:.0f} s in 6 bursts, vast.ai pool (boot {boot:.0f} s, ≤ 8 GPUs, idle 60 s): "
          f"{r['rentals']} rentals, billed {r['billed'] / 3600:.2f} GPU-h, busy {r['busy'] / 3600:.2f} h, idle "
          f"{100 * idle_share:.1f} % of billed (booting {100 * r['booting'] / r['billed']:.1f} %, the rest between jobs "
          f"and the 60 s before destroying) (goal ≤ 15 %: {'met' if idle_share <= 0.15 else 'NOT met'}); deadlines "
          f"(15 min) missed: {len(r['missed'])}; cost ${r['cost']:.2f}")
    return idle_share, len(r["missed"])


# ---------------------------------------------------------------------- 5. price and deadline


def price_trace():
    """Ten jobs of 120 s on the GPU (60 s on fal.ai), some with tight deadlines."""
    spec = [(0, 300), (10, None), (20, 200), (30, 1200), (40, None), (50, 180), (60, 900), (70, 400), (80, None),
            (90, 700)]
    return [Job(i, float(a), 120.0, None if d is None else a + float(d)) for i, (a, d) in enumerate(spec)]


def cost_of_assignment(trace, assignment, *, boot, dph, idle, fal_price, fal_run):
    """(cost, feasible) of running each job where `assignment` says: "own" and "vast" run their jobs
    in arrival order; the vast.ai GPU is rented when its first job arrives and destroyed `idle`
    seconds after its last job (the same rule the simulation follows)."""
    free = {"own": 0.0}
    cost, feasible = 0.0, True
    vast_jobs = [j for j, where in zip(trace, assignment) if where == "vast"]
    if vast_jobs:
        free["vast"] = vast_jobs[0].arrival + boot
    for job, where in zip(trace, assignment):
        if where == "fal":
            finish = job.arrival + fal_run
            cost += fal_price
        else:
            start = max(job.arrival, free[where])
            finish = free[where] = start + job.run
        if job.deadline is not None and finish > job.deadline:
            feasible = False
    if vast_jobs:
        cost += (free["vast"] + idle - vast_jobs[0].arrival) / 3600 * dph
    return cost, feasible


def random_price_trace(seed, n=9):
    """n jobs of 120 s over the first two minutes; about half with a deadline of 2 to 12 minutes."""
    import random

    rnd = random.Random(seed)
    jobs = []
    for i in range(n):
        arrival = float(rnd.randrange(0, 120))
        deadline = arrival + rnd.choice((150, 200, 300, 450, 600, 720)) if rnd.random() < 0.5 else None
        jobs.append(Job(i, arrival, 120.0, deadline))
    jobs.sort(key=lambda j: j.arrival)
    for i, job in enumerate(jobs):
        job.id = i
    return jobs


def compare_price(trace, params):
    best = None
    for assignment in itertools.product(("own", "vast", "fal"), repeat=len(trace)):
        cost, ok = cost_of_assignment(trace, assignment, **params)
        if ok and (best is None or cost < best[0]):
            best = (cost, assignment)
    world = World(own=1, max_vast=1, policy=GpuConfig.Policy.CHEAPEST, **params)
    world.run([Job(j.id, j.arrival, j.run, j.deadline) for j in trace], exact(120.0))
    r = world.report()
    where = {j.id: ("fal" if j.place == FAL else "vast" if j.place.startswith("vast") else "own") for j in world.done}
    return r, where, best


def bench_price(traces=12):
    params = dict(boot=60.0, dph=0.40, idle=60.0, fal_price=0.2025, fal_run=60.0)
    trace = price_trace()
    r, where, best = compare_price(trace, params)
    ratio = r["cost"] / best[0] if best[0] else float("inf")
    print(f"price: {len(trace)} jobs (120 s on a GPU, some with deadlines) on own GPU + vast.ai ($0.40/h, boot 60 s) + "
          f"fal.ai ($0.2025/clip): planner ${r['cost']:.4f} ({''.join(where[j.id][0] for j in trace)}, "
          f"{len(r['missed'])} missed) vs brute force ${best[0]:.4f} ({''.join(a[0] for a in best[1])}) over "
          f"{3 ** len(trace)} assignments → ratio {ratio:.3f} (goal ≤ 1.1: {'met' if ratio <= 1.1 else 'NOT met'})")
    ratios, missed = [], 0
    for seed in range(traces):
        trace = random_price_trace(seed)
        r, _, best = compare_price(trace, params)
        ratios.append(r["cost"] / best[0] if best[0] else (1.0 if not r["cost"] else float("inf")))
        missed += len(r["missed"])
    ratios.sort()
    print(f"price: {traces} random traces of 9 jobs: cost ratio to brute force median {ratios[len(ratios) // 2]:.3f}, "
          f"worst {ratios[-1]:.3f} ({sum(x <= 1.1 for x in ratios)}/{traces} within 1.1), deadlines missed {missed}")
    return ratio
