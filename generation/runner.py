"""Running a VideoJob on ComfyUI: submit once, follow, store the video.

The work is split into slices (`advance`): each slice does what it can within a
deadline and returns; the task re-enqueues the job until it is terminal. Every
step is keyed by what is stored on the job, so a slice that dies anywhere is
resumed by the next one without a second `POST /prompt`:

- the `prompt_id` is stored before it is posted; a retry that finds it asks
  ComfyUI (queue, history) whether it was received before posting it;
- a run that ComfyUI lost (it restarted) is resubmitted once, then the job fails.
"""

import contextlib
import io
import logging
import mimetypes
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from http.cookiejar import CookieJar, DefaultCookiePolicy

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage, default_storage
from django.db.models import F
from django.utils import timezone

from generation import failures, jobcache, progress as progress_model, scheduler, waiting
from generation.models import VideoJob, set_if
from generation.workflow_schema import fill
from gpu import capacity, netguard
from gpu.comfyui import ComfyUIClient, ComfyUIError, find_outputs, run_outcome
from gpu.tunnel import follow_tunnel

log = logging.getLogger(__name__)
S = VideoJob.Status

MAX_SUBMITS = 2  # the first submission, plus one resubmission if ComfyUI lost the run
POLL_EVERY = 2.0  # seconds between /history checks while the websocket is quiet
FIRST_LOOK = 0.5  # seconds a prompt just posted may take to start before its place in the queue is asked
# Progress is written at most this often: every write is also a wake-up for each page and script
# waiting on the job. A short workflow sends its node events milliseconds apart; a held-back write
# goes out when its time comes, whether or not another event arrives.
SAVE_EVERY = 0.25
UNREACHABLE_GRACE = settings.I2V_COMFYUI_GRACE  # seconds ComfyUI may stay unreachable before the job fails
UNREACHABLE_PAUSE = 2.0  # seconds between tries while ComfyUI is unreachable (not a tight loop through the queue)
STORAGE_GRACE = 120  # seconds the storage (R2) may keep refusing a finished video before the job fails


class JobFailed(Exception):
    """The job cannot go on; `failure` is its class when the cause is known (else read from the text)."""

    def __init__(self, message, failure: "failures.Failure | None" = None):
        super().__init__(message)
        self.failure = failure


class StorageFailed(Exception):
    """The storage (R2) did not take the video, after botocore's own retries."""


class NotPlaced(Exception):
    """The job has no place (the scheduler has not bound it, or its place is gone): it waits in
    the queue."""


def target_for(job, place=None):
    """(base_url, token, place) where this job runs. Raises NotPlaced when it is not bound to a
    place that exists (see generation.scheduler). `place`: capacity.resolve(job.place) when the
    caller has just read it."""
    if not job.place or job.place == scheduler.FAL:
        raise NotPlaced("the job is not placed on a GPU")
    place = place or capacity.resolve(job.place)
    if place is None:
        raise NotPlaced("the GPU it was placed on is gone")
    # A claimed run stays where it was posted, even if the configured URL changes meanwhile.
    return (job.comfyui_url or place.url), place.token, place


def comfyui_timeout() -> float:
    """Seconds to wait for one ComfyUI answer: 30, or less when the task timeout is short.

    A slice can overrun its deadline by a websocket handshake plus one GET with its retries
    (3 tries and 1.5 s of backoff) when ComfyUI accepts connections but stops answering. That
    must still end inside the task's `timeout`: a task django-q kills neither hands the job
    back to the queue nor counts the hang toward UNREACHABLE_GRACE, so the job would stay
    running with nobody following it."""
    budget = settings.Q_CLUSTER["timeout"] - settings.I2V_FOLLOW_SLICE - 2.0
    return max(0.5, min(30.0, budget / 5))


def warm() -> None:
    """Read what a job's first steps read (nothing is written), so that a new worker process has
    Django's model metadata and query paths ready before its first job."""
    VideoJob.objects.select_related("workflow", "instance").filter(pk=uuid.UUID(int=0)).first()
    capacity.resolve(capacity.CONFIG)
    jobcache.get(uuid.UUID(int=0))  # the shared cache's connection (Redis), when it is on
    waiting.warm()
    mimetypes.init()  # the upload names the image's type: reading the system's type lists takes ms


_openers = {}


def _opener() -> ThreadPoolExecutor:
    """The worker process's threads that open jobs' websockets (open_events_soon). Keyed by the
    process: a fork leaves the parent's threads behind."""
    pid = os.getpid()
    if pid not in _openers:
        _openers[pid] = ThreadPoolExecutor(4, thread_name_prefix="i2v-ws-open")
    return _openers[pid]


_shared_http = {}


def shared_http():
    """The worker process's one HTTP client for its jobs' ComfyUI calls: the keep-alive connection
    a job leaves behind carries the next job's upload, without a new TCP connection and a new
    pass through the address guard (1.0-1.4 ms a job in-process). Every call sets its own timeouts;
    a connection lives 5 s idle (httpx's default). Keyed by the process, which a fork changes, and
    by the guard's setting: a connection opened while private addresses were allowed is not reused
    once they are refused."""
    key = (os.getpid(), settings.I2V_BLOCK_PRIVATE_NETWORKS)
    http = _shared_http.get(key)
    if http is None or http.is_closed:
        # It keeps no cookies: one a ComfyUI (or the proxy in front of it) sets must not ride along
        # on later jobs' calls, as it could not when each job had a client of its own.
        no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
        http = _shared_http[key] = netguard.http_client(follow_redirects=False, cookies=no_cookies)
    return http


def client_for(job, target=None) -> ComfyUIClient:
    """A client for the job's ComfyUI; `target`: target_for(job) when the caller has it."""
    url, token, _ = target or target_for(job)
    timeout = comfyui_timeout()
    return ComfyUIClient(url, token=token or None, connect_timeout=min(5.0, timeout), read_timeout=timeout,
                         http_client=shared_http())


def _expected_steps(graph) -> int:
    """Sampler steps the graph will report through `progress`, or 0 when it has no sampler."""
    total = 0
    for node in graph.values():
        inputs = node.get("inputs", {})
        if node.get("class_type") == "KSamplerAdvanced":
            steps = int(inputs.get("steps", 0))
            end = min(int(inputs.get("end_at_step", steps)), steps)
            total += max(0, end - int(inputs.get("start_at_step", 0)))
        elif node.get("class_type") in ("KSampler", "SamplerCustom", "SamplerCustomAdvanced"):
            total += int(inputs.get("steps", 0))
    return total


def build_graph(job, image_name: str) -> dict:
    workflow = job.workflow
    if workflow is None:
        raise JobFailed(f"The workflow {job.workflow_slug!r} no longer exists.")
    params = {
        "image": image_name,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or None,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "frames": job.frames,
        "fps": job.fps,
        "steps": job.steps,
        # A per-job prefix: ComfyUI's cache can never hand back an older job's file.
        "filename_prefix": f"i2v/{job.id}",
    }
    return fill(workflow.graph, workflow.bindings, params)


def _fail(job, message, failure=None):
    failures.fail_job(job, message, failure)


def advance(job_id, deadline: float, job=None, place=None) -> bool:
    """Move the job forward until `deadline` (monotonic). Returns True once it is terminal, or
    when it went back to the queue (the scheduler hands it out again). `job`: the job as the
    lease just read it, with its workflow and instance (tasks.lease_and_read), else it is read;
    `place`: its place as resolved with the lease, else it is resolved here."""
    if job is None:
        job = VideoJob.objects.select_related("workflow", "instance").filter(pk=job_id).first()
    if job is None or job.is_terminal:
        return True
    if job.place == scheduler.FAL or job.backend == VideoJob.Backend.FAL:
        from generation import fal_runner  # noqa: PLC0415 -- fal_runner imports this module

        return fal_runner.advance(job_id, deadline)
    conn = target = None
    try:
        if job.status in (S.QUEUED, S.PROVISIONING):
            if job.cancel_requested:
                job.transition(S.CANCELLED, error="Cancelled by the user.")
                return True
            target = claim_ids(job, place)
        if target is None and place is not None:
            target = target_for(job, place)
        conn = Connection(job, target)
        posted = False
        if job.status in (S.QUEUED, S.PROVISIONING):
            posted = submit(job, conn)
        if job.status in (S.SUBMITTED, S.RUNNING):
            follow(job, deadline, conn, posted)
        if job.status == S.UPLOADING and time.monotonic() < deadline:
            # Started only with time left in the slice; otherwise the next task uploads.
            store_output(job, conn.client)
    except NotPlaced as exc:
        job.refresh_from_db()
        if job.place and not job.is_terminal:
            scheduler.requeue(job, str(exc))
        return True
    except JobFailed as exc:
        _fail(job, str(exc), exc.failure)
    except StorageFailed as exc:
        # The video is still on ComfyUI: an R2 outage is waited out for a while, not fatal at once.
        if storage_retry(job, exc, _fail):
            return False
    except ComfyUIError as exc:
        if exc.kind in ("unreachable", "timeout", "not_ready") and follow_moved_tunnel(job):
            return False
        # A retryable answer (a 5xx, a 429, a non-JSON body: ComfyUI restarting or a proxy's
        # hiccup) counts like an unreachable server.
        if exc.kind in ("unreachable", "timeout", "not_ready") or exc.retryable:
            return _unreachable(job, exc, deadline)
        failure = None
        if exc.kind == "auth":  # a tunnel URL that expired, or a wrong token
            failure = failures.Failure(VideoJob.ErrorClass.COMFYUI_UNREACHABLE, {"url": job.comfyui_url})
        _fail(job, str(exc), failure)
    else:
        _reachable(job)
    finally:
        if conn is not None:
            conn.close()
    if hasattr(job, "learn_run"):  # the run ended on the GPU in this slice (_conclude)
        scheduler.record_run(job, *job.learn_run)
    if not job.is_terminal:  # (a terminal status in hand is this worker's own compare-and-set: final)
        job.refresh_from_db()
    return job.is_terminal


def _unreachable(job, exc, deadline: float) -> bool:
    """ComfyUI did not answer. A job it cannot have received (nothing posted yet) goes back to
    the queue at once, and the place rests for a while: the scheduler places the job elsewhere,
    or on a corrected URL. A posted run is waited for within the grace, then requeued. Either
    way the job says at once why it waits and until when."""
    url = job.comfyui_url or ""
    reason = failures.short_reason(f"{exc.kind}: {exc}")
    if url and capacity.mark_down(url, f"{exc.kind}: {exc}"[:300]):
        log.warning("ComfyUI at %s unreachable (%s); jobs wait for it or go elsewhere", url, reason)
    now = timezone.now()
    job.refresh_from_db()
    if job.comfyui_url != url or job.is_terminal:
        return job.is_terminal  # moved meanwhile (its tunnel was followed) or ended: nothing to say
    if job.unreachable_since is None:
        VideoJob.objects.filter(pk=job.pk, unreachable_since=None).update(unreachable_since=now)
        job.unreachable_since = now
    note = scheduler.unreachable_note(url, capacity.down_since(url) or job.unreachable_since, reason)
    if job.posted_at is None:
        scheduler.requeue(job, f"ComfyUI at {url} did not answer ({exc.kind})")
        VideoJob.objects.filter(pk=job.pk, place="", status__in=VideoJob.ACTIVE).update(note=note)
        return True
    if _within_grace(job):
        # Only while the job is still on that URL: another worker may have just followed its tunnel
        # and said so in the note, which must not be overwritten by this stale one.
        VideoJob.objects.filter(pk=job.pk, comfyui_url=url).exclude(note=note).update(note=note)
        # Not a tight loop through the queue while it stays down.
        time.sleep(max(0.0, min(UNREACHABLE_PAUSE, deadline - time.monotonic())))
        return False
    scheduler.requeue(job, f"ComfyUI at {url} stayed unreachable for more than {UNREACHABLE_GRACE} s")
    job.refresh_from_db()
    return job.is_terminal or not job.place


def _reachable(job):
    if job.comfyui_url and capacity.mark_up(job.comfyui_url):
        log.warning("ComfyUI at %s answers again", job.comfyui_url)
    if job.unreachable_since is not None:
        VideoJob.objects.filter(pk=job.pk).update(unreachable_since=None)
        # The "unreachable since … retrying until …" note no longer holds (whichever URL it names:
        # the job may have moved to a followed tunnel meanwhile).
        VideoJob.objects.filter(pk=job.pk, note__startswith="ComfyUI at ", note__contains=" unreachable since ").update(note="")


class Connection:
    """A job's ComfyUI client and its websocket, opened before anything is posted: ComfyUI
    drops (does not buffer) the events of a client that is not connected."""

    def __init__(self, job, target=None):
        self.client = client_for(job, target)
        self.events = None
        self._cm = None
        self._opening = None  # open_events_soon()'s handshake under way
        self.run_ended = False

    def open_events_soon(self, client_id):
        """Start opening the websocket on a helper thread, while this one reads and uploads the
        image: the handshake (a TCP connect, the upgrade, websockets' reader thread) and the upload
        wait on ComfyUI side by side, not one after the other. open_events() waits for it."""
        if self.events is None and self._opening is None:
            self._opening = _opener().submit(self._open, client_id)

    def wait_opened(self):
        """Wait for the handshake open_events_soon() started, if one is under way; it tried once,
        as open_events() would (a ComfyUIError left `events` None; anything else raises here)."""
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.result()

    def open_events(self, client_id):
        """The websocket, open once this returns (or None: followed by polling)."""
        self.wait_opened()
        if self.events is None:
            self._open(client_id)

    def _open(self, client_id):
        try:
            self._cm = self.client.events(client_id, open_timeout=self.client.read_timeout)
            self.events = self._cm.__enter__()
        except ComfyUIError as exc:
            log.info("websocket unavailable (%s); following by polling", exc)
            self._cm = self.events = None

    def drop_events(self, wait=True):
        """Close the websocket; with wait=False the close handshake runs in the background."""
        # A handshake under way ends first: its socket is closed too (one that failed opened nothing).
        with contextlib.suppress(Exception):
            self.wait_opened()
        cm, self._cm, self.events = self._cm, None, None
        if cm is None:
            return

        def close():
            try:
                cm.__exit__(None, None, None)
            except Exception:  # already broken: nothing to close cleanly
                pass

        if wait:
            close()
        else:
            threading.Thread(target=close, daemon=True).start()

    def close(self):
        # Once the run ended nobody opens this client id's websocket again: its close handshake
        # need not hold the worker. Before, it must be over before a next slice opens one (ComfyUI
        # forgets a client id's socket when its old socket closes, even after a new one opened).
        self.drop_events(wait=not self.run_ended)
        self.client.close()


TUNNEL_NOTE = "The tunnel URL changed; i2v switched to the new one."


def follow_moved_tunnel(job) -> bool:
    """ComfyUI stopped answering at the job's URL: when it is a vast.ai instance's tunnel that moved,
    move this job and every other unfinished one on that URL to the new URL (the next slice goes on
    there). True when it moved."""
    old = job.comfyui_url
    new = follow_tunnel(old) if old else None
    if not new:
        return False
    VideoJob.objects.filter(comfyui_url=old).exclude(status__in=VideoJob.TERMINAL).update(
        comfyui_url=new, note=TUNNEL_NOTE, unreachable_since=None)
    log.warning("job %s: the tunnel URL changed; switched to %s", job.id, new)
    return True


def _within_grace(job) -> bool:
    """Whether an unreachable ComfyUI is still worth retrying for this job: for
    UNREACHABLE_GRACE seconds since it was first found unreachable (a tunnel hiccup
    must not fail a long run). _unreachable has recorded `unreachable_since`."""
    return (timezone.now() - job.unreachable_since).total_seconds() < UNREACHABLE_GRACE


def claim_ids(job, place=None):
    """Record where the job runs and its prompt/client ids before anything is posted, so a
    crash after the POST finds them and does not post again. Returns target_for(job), or None
    when the job was claimed before."""
    if job.prompt_id:
        return None
    url, token, place = target_for(job, place)
    fields = dict(scheduler.claim_fields(url, place), seed=job.seed if job.seed is not None else scheduler.new_seed())
    if not VideoJob.objects.filter(pk=job.pk, prompt_id="").update(submit_count=F("submit_count") + 1, **fields):
        job.refresh_from_db()  # another worker claimed it just now: its ids hold
        return None
    for name, value in fields.items():
        setattr(job, name, value)  # (a changed instance_id drops the cached instance)
    job.submit_count += 1
    return url, token, place


def submit(job, conn) -> bool:
    """Upload the image and POST the prompt, exactly once per run (see module docstring); whether
    it was posted now. The websocket is open before the POST (and before a retry asks whether
    ComfyUI has the prompt already): ComfyUI does not keep the events of a client not connected."""
    if job.posted_at is None:
        conn.open_events_soon(job.client_id)  # the upload goes on meanwhile; open before the POST
    else:
        conn.open_events(job.client_id)
        # A retry (or a duplicate task) may find the prompt already received: follow it instead.
        # Before the first POST was attempted ComfyUI cannot know it: no need to ask.
        if _known_to_comfyui(conn.client, job.prompt_id):
            job.transition(S.SUBMITTED)
            return False
    _post(conn.client, job, before_post=conn.wait_opened)
    return True


def _known_to_comfyui(client, prompt_id) -> bool:
    running, pending = client.queue()
    if prompt_id in running or prompt_id in pending:
        return True
    return client.history(prompt_id) is not None


def _post(client, job, before_post=None):
    with default_storage.open(job.input_image.name, "rb") as fh:
        data = fh.read()
    ext = job.input_image.name.rsplit(".", 1)[-1]
    image_name = client.upload_image(data, f"{job.id}.{ext}", subfolder="i2v", overwrite=True)
    graph = build_graph(job, image_name)
    steps_total = _expected_steps(graph) or len(graph)
    if job.posted_at is None:
        # From here ComfyUI may hold the run: the job is never moved to another place unasked.
        now = timezone.now()
        set_if(job.pk, "posted_at", None, {"posted_at": now})
        job.posted_at = now
    if before_post is not None:
        before_post()
    try:
        client.submit(graph, prompt_id=job.prompt_id, client_id=job.client_id,
                      output_node=job.workflow.output_node, extra_data={"i2v_job": str(job.id)})
    except ComfyUIError as exc:
        if exc.kind == "validation":
            raise JobFailed(str(exc), failures.from_rejection(exc.node_errors, str(exc)))
        raise
    if job.status in (S.QUEUED, S.PROVISIONING):
        job.transition(S.SUBMITTED, steps_total=steps_total, step=0, progress=0.0)


def resubmit_or_fail(job, client):
    """ComfyUI has no trace of the run (it restarted): submit it once more, then give up."""
    if job.submit_count >= MAX_SUBMITS:
        raise JobFailed("ComfyUI lost this job twice (did it restart?); giving up. Try again.")
    log.warning("job %s: ComfyUI lost prompt %s; resubmitting once", job.id, job.prompt_id)
    VideoJob.objects.filter(pk=job.pk, submit_count=job.submit_count).update(
        submit_count=job.submit_count + 1, step=0, progress=0.0, node_progress={}, node_timings=[], eta_at=None
    )
    job.refresh_from_db()
    _post(client, job)


class Progress:
    """Follows a run's events: per-node timings, sampler steps, and progress/ETA weighted by past
    runs (generation/progress.py), saved to the job."""

    def __init__(self, job):
        self.job = job
        self.nodes = dict(job.node_progress or {})
        self.timings = [list(entry) for entry in (job.node_timings or [])]
        self.cached: set[str] = set()
        self.estimate = progress_model.Estimate(progress_model.expected_seconds(progress_model.past_timings(job)))
        self.current_node = job.current_node
        self.last_save = 0.0
        self.held = False  # a write held back (SAVE_EVERY)

    def _now(self) -> float:
        """Seconds since the run was submitted (the origin of node_timings)."""
        origin = self.job.submitted_at or self.job.created_at
        return round((timezone.now() - origin).total_seconds(), 3)

    @property
    def current(self):
        """The node that runs now: the last timing entry still open."""
        if self.timings and self.timings[-1][3] is None:
            return self.timings[-1]
        return None

    def _close(self):
        entry = self.current
        if entry is not None:
            entry[3] = round(max(0.0, self._now() - entry[2]), 3)

    def on_cached(self, nodes):
        self.cached = {str(n) for n in nodes or []}
        self.estimate = progress_model.Estimate(self.estimate.expected, self.cached)

    def on_progress(self, node, value, maximum):
        self.nodes[str(node)] = [int(value), int(maximum)]
        self._save()

    def on_executing(self, node):
        if self.job.steps_total and not _expected_steps_known(self.job):
            # No sampler in the graph: a step per node.
            self.nodes[f"node:{node}"] = [1, 1]
        self._close()
        graph = self.job.workflow.graph if self.job.workflow else {}
        class_type = (graph.get(str(node)) or {}).get("class_type", "")
        self.timings.append([str(node), class_type, self._now(), None])
        self.current_node = str(node)
        self._save()

    def on_end(self):
        """The run ended: the node that ran last is closed here and saved with the job's next write
        (_conclude), one UPDATE instead of two on the way to the video."""
        self._close()

    def tick(self):
        """After each event and between events: write what was held back once it is due, and move
        progress and the ETA on by time when events pause (a long VAE decode sends none)."""
        since = time.monotonic() - self.last_save
        if (self.held and since >= SAVE_EVERY) or (since >= 1.0 and self.current is not None):
            self.write()

    def flush(self):
        """Write what was held back, now."""
        if self.held:
            self.write()

    def due_in(self) -> float | None:
        """Seconds until the write held back is due; None when none is."""
        if not self.held:
            return None
        return max(0.0, self.last_save + SAVE_EVERY - time.monotonic())

    def _estimate(self, step, total):
        if not self.estimate.known:
            fraction = step / total if total else 0.0
            return round(fraction * progress_model.NO_HISTORY_CAP, 4), None
        done = [e[0] for e in self.timings if e[3] is not None]
        current = self.current
        fraction, elapsed = 0.0, 0.0
        if current is not None:
            value, maximum = self.nodes.get(current[0], [0, 0])
            fraction = value / maximum if maximum else 0.0
            elapsed = self._now() - current[2]
        value, left = self.estimate.at(done, current[0] if current else None, fraction, elapsed)
        return round(value, 4), progress_model.eta_at(left)

    def fields(self) -> dict:
        """The job's progress columns as the events so far have them."""
        job = self.job
        step = sum(v for v, _ in self.nodes.values())
        total = max(job.steps_total, sum(m for _, m in self.nodes.values()))
        value, eta = self._estimate(min(step, total), total)
        return {"node_progress": self.nodes, "step": min(step, total), "steps_total": total,
                "progress": max(value, job.progress if job.status == S.RUNNING else 0.0),
                "node_timings": self.timings, "current_node": self.current_node, "eta_at": eta}

    def _save(self):
        """Write now, or hold the write back until SAVE_EVERY has passed since the last one (the
        first, which moves a submitted job to running, is never held)."""
        if self.job.status != S.SUBMITTED and time.monotonic() - self.last_save < SAVE_EVERY:
            self.held = True
            return
        self.write()

    def write(self):
        job = self.job
        fields = self.fields()
        self.last_save = time.monotonic()
        self.held = False
        if job.status == S.SUBMITTED:
            job.transition(S.RUNNING, **fields)
        else:
            set_if(job.pk, "status", job.status, fields)
            for key, value in fields.items():
                setattr(job, key, value)


def _expected_steps_known(job) -> bool:
    return any(not key.startswith("node:") for key in (job.node_progress or {})) or (
        job.workflow is not None and _expected_steps(job.workflow.graph) > 0
    )


def follow(job, deadline, conn, posted=False):
    """Follow the run on the websocket (falling back to polling) until it ends or `deadline`.
    `posted`: the prompt was posted in this slice, its websocket open before (submit()): no event
    of the run can have been missed, so the history and the queue are asked only if the run has
    not started within FIRST_LOOK (it waits behind others in ComfyUI's queue: its position), not
    at once: two round trips fewer on most jobs' way, while other jobs are on theirs."""
    client = conn.client
    conn.open_events(job.client_id)
    progress = Progress(job)
    first_look = FIRST_LOOK if posted and conn.events is not None else None
    item = None if first_look is not None else _check_history(client, job)
    try:
        item = _follow_events(job, deadline, conn, progress, item, first_look)
    except BaseException:
        progress.flush()  # what was held back: the next slice starts from the row
        raise
    if item is None:  # the slice ran out
        progress.flush()
        return
    # The websocket is closed with the connection (advance), once the video is stored: its close
    # handshake on a thread of its own here took the CPU from the way to the video.
    conn.run_ended = True
    progress.on_end()
    _conclude(job, item, progress, client)


class Heard:
    """What the websocket told of this run. ComfyUI sends its client `execution_start`, each output
    node's `executed` with its files (replayed for cached ones), `execution_success`, and only then
    writes the history and sends `executing` with no node. A run whose whole course this socket
    carried, from its start to its success, ends here without asking the history: a round trip
    and the parse of a history entry (which holds the whole graph) fewer on the way to the video.
    Any other run (it started before this socket opened, or it failed) asks the history."""

    def __init__(self, prompt_id):
        self.prompt_id = prompt_id
        self.start = self.success = None
        self.outputs = {}

    def note(self, ev) -> dict | None:
        """Take one event; when it is the success that completes the run heard whole, the run (item())."""
        data = ev.get("data") or {}
        if data.get("prompt_id") != self.prompt_id:
            return None
        kind = ev.get("type")
        if kind == "execution_start":
            self.start, self.success, self.outputs = data.get("timestamp"), None, {}
        elif kind == "executed" and self.start is not None and isinstance(data.get("output"), dict):
            self.outputs[str(data.get("node"))] = data["output"]
        elif kind == "execution_success" and self.start is not None:
            self.success = data.get("timestamp")
            return self.item()
        return None

    def item(self) -> dict | None:
        """The run as its history entry would show it (status, timestamps, outputs), once it
        succeeded with an output; else None."""
        if self.success is None or not self.outputs:
            return None
        messages = [["execution_start", {"prompt_id": self.prompt_id, "timestamp": self.start}],
                    ["execution_success", {"prompt_id": self.prompt_id, "timestamp": self.success}]]
        return {"status": {"status_str": "success", "completed": True, "messages": messages}, "outputs": self.outputs}


def _follow_events(job, deadline, conn, progress, item, first_look=None):
    """follow()'s loop: the history entry once the run ended, or None when `deadline` came first.
    `first_look`: seconds after which the history is asked if the run has not started by then."""
    client = conn.client
    last_poll = time.monotonic()
    look_at = None if first_look is None else last_poll + first_look
    heard = Heard(job.prompt_id)
    while item is None:
        if time.monotonic() >= deadline:
            return None
        if _timed_out(job):
            client.cancel(job.prompt_id)
            raise JobFailed(f"The job took longer than {settings.I2V_JOB_TIMEOUT} s and was stopped.")
        ended = False
        if conn.events is not None:
            wait = min(1.0, max(0.05, deadline - time.monotonic()))
            due = progress.due_in()
            if due is not None:
                wait = min(wait, due)
            if look_at is not None:
                wait = min(wait, max(0.0, look_at - time.monotonic()))
            try:
                ev = conn.events.next(timeout=wait)
            except ComfyUIError:
                conn.drop_events()  # socket dropped: poll instead
                ev = None
            if ev is not None:
                ended = _on_event(job, progress, ev)
                if (item := heard.note(ev)) is not None:
                    break
                if heard.start is not None:
                    look_at = None  # the run started: no first look (waiting for it would spin)
            if not ended:
                progress.tick()
        else:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        first = look_at is not None and time.monotonic() >= look_at
        if ended or first or time.monotonic() - last_poll >= POLL_EVERY:
            last_poll, look_at = time.monotonic(), None
            item = _check_history(client, job)
    return item


def _timed_out(job) -> bool:
    start = job.submitted_at or job.created_at
    return (timezone.now() - start).total_seconds() > settings.I2V_JOB_TIMEOUT


def _on_event(job, progress, ev) -> bool:
    """Apply one websocket event; True when it says the run ended."""
    data = ev.get("data") or {}
    kind = ev.get("type")
    if data.get("prompt_id") not in (None, job.prompt_id):
        return False
    if kind == "progress" and data.get("prompt_id") == job.prompt_id:
        progress.on_progress(data.get("node"), data.get("value", 0), data.get("max", 0))
    elif kind == "executing" and data.get("prompt_id") == job.prompt_id:
        if data.get("node") is None:
            return True
        progress.on_executing(data["node"])
    elif kind == "execution_start" and data.get("prompt_id") == job.prompt_id and job.status == S.SUBMITTED:
        job.transition(S.RUNNING)
    elif kind == "execution_cached" and data.get("prompt_id") == job.prompt_id:
        progress.on_cached(data.get("nodes"))
    elif kind in ("execution_error", "execution_interrupted") and data.get("prompt_id") == job.prompt_id:
        return True
    return False


def _check_history(client, job):
    """The history entry once the run ended; None while it runs. Handles a run ComfyUI lost."""
    item = client.history(job.prompt_id)
    if item is not None:
        return item
    running, pending = client.queue()
    if job.prompt_id in running or job.prompt_id in pending:
        if job.prompt_id in pending:
            position = pending.index(job.prompt_id) + len(running)
            if job.queue_position != position:
                VideoJob.objects.filter(pk=job.pk).update(queue_position=position)
                job.queue_position = position
        return None
    # Neither queued, running nor in history. Check history once more: the run may have
    # finished between the two calls.
    item = client.history(job.prompt_id)
    if item is not None:
        return item
    job.refresh_from_db()
    if job.cancel_requested:
        job.transition(S.CANCELLED, error="Cancelled by the user.")
        return {"_cancelled": True}
    resubmit_or_fail(job, client)
    return None


def _conclude(job, item, progress=None, client=None):
    if item.get("_cancelled"):
        return
    outcome, message = run_outcome(item)
    # No re-read: the job in hand is as this worker wrote it, and each write below is a
    # compare-and-set on its status (a job cancelled meanwhile is not overwritten).
    if job.is_terminal:
        return
    if outcome != "success" and progress is not None and progress.timings:
        progress.write()  # the timing of the node that ran last, which on_end closed
    if outcome == "interrupted":
        job.transition(S.CANCELLED, error="Cancelled: the run was interrupted on ComfyUI.")
        finish_accounting(job)
        return
    if outcome != "success":
        failure = failures.from_execution_error(execution_error(item))
        if failure.error_class == VideoJob.ErrorClass.OUT_OF_MEMORY and client is not None:
            failure.info.update(_gpu_memory(job, client))
        raise JobFailed(f"ComfyUI failed while running the workflow: {message}", failure)
    outputs = find_outputs(item, job.workflow.output_node if job.workflow else None)
    if not outputs:
        raise JobFailed("ComfyUI finished but produced no video output. Check the workflow's SaveVideo node.")
    out = outputs[0]
    fields = {**(progress.fields() if progress is not None else {}), "progress": job.progress, "eta_at": None}
    if progress is not None and progress.estimate.known:
        upload = progress.estimate.expected.get(progress_model.UPLOAD, 0.0)
        fields["progress"] = round(min(progress_model.RUNNING_CAP, 1 - upload / progress.estimate.total), 4)
        fields["eta_at"] = progress_model.eta_at(upload)
    else:
        fields["progress"] = max(job.progress, progress_model.NO_HISTORY_CAP)
    fields["provider_urls"] = {"output": out}
    if isinstance(default_storage, FileSystemStorage):
        # Local files: storing the video is a copy of a few ms, done here: the job goes from running
        # straight to completed, one write and one wake-up of its waiting client fewer. (With R2 an
        # upload may take long: the job is marked uploading first, and its GPU slot freed meanwhile.)
        try:
            if store_output(job, client, ended={**fields, "uploading_at": timezone.now()}):
                scheduler.slot_freed()
                job.learn_run = (execution_seconds(item),)
            return
        except StorageFailed as exc:  # retried in the uploading state, as any failed upload is
            log.warning("job %s: %s; will retry", job.id, exc)
    if job.transition(S.UPLOADING, **fields):
        scheduler.slot_freed()  # the GPU is done with it: the next job is placed while this one uploads
        # Learnt at the end of the slice (advance), after the video is stored: not on its way.
        job.learn_run = (execution_seconds(item),)


def execution_seconds(item) -> float | None:
    """How long ComfyUI executed the run (its history's execution_start → execution_success
    timestamps): the GPU's own time, without the wait in its queue."""
    stamps = {}
    for message in (item.get("status") or {}).get("messages") or []:
        if isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict):
            stamps[message[0]] = message[1].get("timestamp")
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end >= start:
        return (end - start) / 1000
    return None


def execution_error(item) -> dict:
    """The execution_error event of a failed run's history entry ({} when there is none)."""
    for message in ((item or {}).get("status") or {}).get("messages") or []:
        if isinstance(message, (list, tuple)) and len(message) == 2 and message[0] == "execution_error":
            return message[1] if isinstance(message[1], dict) else {}
    return {}


def _gpu_memory(job, client) -> dict:
    """The GPU's name and VRAM, for out-of-memory advice: the instance's, else ComfyUI's /system_stats."""
    if job.instance is not None and job.instance.gpu_ram_mb:
        return {"gpu": job.instance.gpu_name, "vram_gb": job.instance.vram_gb}
    try:
        device = (client.system_stats().get("devices") or [{}])[0]
    except ComfyUIError:
        return {}
    name = str(device.get("name") or "")
    # CUDA devices are named "cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync".
    name = name.split(" : ")[0].split(" ", 1)[-1] if name.startswith("cuda") else name
    vram = device.get("vram_total")
    return {"gpu": name, "vram_gb": round(vram / 1024**3, 1) if isinstance(vram, (int, float)) and vram else None}


def store_output(job, client, ended=None) -> bool:
    """Stream the output from ComfyUI's /view into the default storage, then complete the job.
    `ended`: for a job whose run just ended (_conclude), the fields its end writes (output, progress,
    uploading_at): written with the completion, the job never shows `uploading`. True when the job
    completed (False: it was cancelled meanwhile, and keeps no video)."""
    ended = dict(ended or {})
    out = (ended.get("provider_urls") or job.provider_urls or {}).get("output")
    if not out:
        raise JobFailed("The output file of this job is unknown.")
    ext = out["filename"].rsplit(".", 1)[-1].lower() if "." in out["filename"] else "mp4"
    with client.open_view(out["filename"], out.get("subfolder", ""), out.get("type", "output")) as resp:
        stream = ResponseStream(resp)
        name = save_video(f"videos/{job.id}.{ext}", stream)
    # No re-read: the transition below is a compare-and-set on the status (a job cancelled meanwhile
    # keeps no video), and the timings are this job's as advance() read or _conclude() wrote them.
    for key in ("progress", "eta_at", "step"):  # a completed job's own: 1.0, none, all steps
        ended.pop(key, None)
    timings = list(ended.pop("node_timings", None) or job.node_timings or [])
    uploading_at = ended.get("uploading_at") or job.uploading_at
    if timings and uploading_at:
        origin = job.submitted_at or job.created_at
        start = (uploading_at - origin).total_seconds()
        timings.append([progress_model.UPLOAD, progress_model.UPLOAD, round(start, 3),
                        round((timezone.now() - uploading_at).total_seconds(), 3)])
    steps = ended.get("steps_total", job.steps_total)
    # The cost is written with the completion: the answer that says "completed" says what it cost.
    ended["finished_at"] = timezone.now()
    cost = gpu_cost(job, ended["finished_at"])
    if cost is not None:
        ended["cost_usd"] = cost
    if not job.transition(S.COMPLETED, video=name, video_size=stream.bytes_read, step=steps,
                          node_timings=timings, eta_at=None, **ended):
        default_storage.delete(name)  # cancelled meanwhile: keep no orphan
        return False
    from generation.webhooks import enqueue_webhook

    enqueue_webhook(job)
    return True


STORAGE_ADVICE = (
    f"Gave up after {STORAGE_GRACE} s. Check the storage (the R2 settings and Cloudflare's status, or "
    "the free disk space for local files), then run the job again."
)


def save_video(name, stream) -> str:
    """Stream a video into the default storage; the name it was stored under. Raises StorageFailed.

    A failed upload leaves no object behind: S3/R2 creates an object only when its PutObject (or
    CompleteMultipartUpload) succeeds, and s3transfer aborts a multipart upload that failed."""
    try:
        return default_storage.save(name, File(stream, name=name.rsplit("/", 1)[-1]))
    except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
        raise StorageFailed(f"Could not upload the video to the storage: {exc}") from exc


def sentences(*parts: str) -> str:
    """Parts joined as sentences: each ends with a full stop (or ? or !) before the next begins."""
    out = []
    for part in parts:
        part = part.strip()
        if part:
            out.append(part if part[-1] in ".?!" else part + ".")
    return " ".join(out)


def storage_retry(job, exc, fail) -> bool:
    """After a StorageFailed: True to try the upload again in the next slice; once the job has
    been uploading for STORAGE_GRACE, fail(job, message) it instead and return False."""
    job.refresh_from_db()
    since = job.status_changed_at or job.created_at
    if (timezone.now() - since).total_seconds() < STORAGE_GRACE:
        log.warning("job %s: %s; will retry", job.id, exc)
        return True
    fail(job, sentences(str(exc), STORAGE_ADVICE))
    return False


class ResponseStream(io.RawIOBase):
    """A read-only file over a streaming httpx response: bytes flow to storage in chunks."""

    def __init__(self, response, chunk_size=1024 * 1024):
        self._iter = response.iter_bytes(chunk_size)
        self._buf = b""
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return False

    def read(self, size=-1):
        """`size` bytes, fewer only at the end. s3transfer decides multipart by the length of its
        first read(8 MiB) and cuts parts by what read() returns: a short read (one 1 MiB chunk)
        made every video a single PutObject held whole in memory."""
        if size is None or size < 0:
            return self.readall()
        out = bytearray()
        while len(out) < size:
            chunk = super().read(size - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def readinto(self, b):
        while not self._buf:
            try:
                self._buf = next(self._iter)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.bytes_read += n
        return n


def gpu_cost(job, until) -> Decimal | None:
    """The job's GPU cost: its seconds on the instance (to `until`) × the instance's $/hour; 0 on
    your own GPU (i2v pays nothing per clip); None when there is nothing to charge here."""
    if job.instance_id and job.instance and job.submitted_at:
        seconds = (until - job.submitted_at).total_seconds()
        return (job.instance.dph_total * Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.0001"))
    if job.backend == VideoJob.Backend.COMFYUI and job.cost_usd is None:
        return Decimal("0")
    return None


def finish_accounting(job):
    """Record the GPU cost of a job that just ended, then its webhook."""
    job.refresh_from_db()
    cost = gpu_cost(job, job.finished_at or timezone.now())
    if cost is not None:
        VideoJob.objects.filter(pk=job.pk).update(cost_usd=cost)
    from generation.webhooks import enqueue_webhook

    enqueue_webhook(job)


def cancel_on_comfyui(job):
    """Remove the prompt from ComfyUI's queue or interrupt it; cancel at once if it was pending
    or ComfyUI can't be reached (the follower confirms a running one)."""
    try:
        client = client_for(job)
    except NotPlaced:
        job.transition(S.CANCELLED, error="Cancelled by the user.")
        return
    try:
        running, pending = client.queue()
        client.cancel(job.prompt_id)
        if job.prompt_id not in running:
            job.transition(S.CANCELLED, error="Cancelled by the user.")
            finish_accounting(job)
    except ComfyUIError:
        job.transition(S.CANCELLED, error="Cancelled by the user (ComfyUI could not be reached to stop it).")
        finish_accounting(job)
    finally:
        client.close()
