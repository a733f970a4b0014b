import uuid
from django.conf import settings
from django.db import connection, models
from django.utils import timezone

from i2v.core.sql import prebuilt, save_values, write

from gpu.models import IllegalTransition, VastInstance


class Workflow(models.Model):
    """A ComfyUI API-format graph plus where each job parameter goes (bindings)."""

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    graph = models.JSONField()
    bindings = models.JSONField(default=dict)
    output_node = models.CharField(max_length=32)
    defaults = models.JSONField(default=dict, blank=True)
    model_files = models.ManyToManyField("gpu.ModelFile", blank=True, related_name="workflows")
    is_active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self):
        return f"{self.slug} ({'active' if self.is_active else 'inactive'})"


class VideoJobQuerySet(models.QuerySet):
    def _pk_filter(self):
        """The ids a `filter(pk=…)` or `filter(pk__in=[…])` (among other conditions) limits this
        query to, read from the query itself; None when it has no such condition. Those ids, or
        some of them, are what an update changes: announcing all of them costs a waiter at most
        one needless re-read, and saves reading the ids before each write (most name their job)."""
        where = self.query.where
        if where.connector != "AND" or where.negated:
            return None
        for child in where.children:
            target = getattr(getattr(child, "lhs", None), "target", None)
            if target is None or not target.primary_key or getattr(child, "negated", False):
                continue
            values = [child.rhs] if child.lookup_name == "exact" else child.rhs if child.lookup_name == "in" else None
            if not isinstance(values, (list, tuple, set, frozenset)):
                continue  # e.g. a subquery
            try:  # as the rest of the code names jobs (hex or hyphenated, a UUID object)
                return [uuid.UUID(str(value)) for value in values]
            except ValueError:
                return None
        return None

    def update(self, **kwargs):
        """Every job write goes through here, save() or written(): each drops the jobs' cached API
        answer and wakes the requests waiting for them (generation.waiting)."""
        from generation import jobcache, waiting

        if not (jobcache.enabled() or waiting.announcing()) or not jobcache.shows(kwargs):
            return super().update(**kwargs)
        if not (jobcache.enabled() or waiting.announces_ids()):
            count = super().update(**kwargs)
            waiting.announce()  # "some job changed": no need to read which
            return count
        ids = self._pk_filter()
        if ids is None:
            ids = list(self.values_list("pk", flat=True))
        count = super().update(**kwargs)
        written(ids, kwargs)
        return count


def written(job_ids, fields) -> None:
    """What update() does once it has written these fields of these jobs, for a write made with
    prebuilt SQL (i2v.core.sql): drop their cached answers and wake the requests waiting for them."""
    from generation import jobcache, waiting

    if not (jobcache.enabled() or waiting.announcing()) or not jobcache.shows(fields):
        return
    if not (jobcache.enabled() or waiting.announces_ids()):
        waiting.announce()
        return
    jobcache.forget(*job_ids)
    waiting.announce(*job_ids)


def set_if(job_id, field: str, expected, fields: dict) -> bool:
    """Write `fields` of the job if its `field` is `expected` (None: IS NULL), announcing the write as
    update() does; whether it was written. Prebuilt SQL, one statement per set of fields: the ORM
    compiles each of these compare-and-sets anew, on every job's way to its GPU and back (a
    completion's 14 fields, in-process on PostgreSQL: 0.61 ms of CPU through the ORM, 0.41-0.45 ms
    prebuilt). Values that are expressions go through the ORM."""
    if any(hasattr(value, "resolve_expression") for value in fields.values()):
        return VideoJob.objects.filter(pk=job_id, **{field: expected}).update(**fields) == 1
    names = tuple(fields)
    test = "IS NULL" if expected is None else "= %s"

    def build(q):
        sets = ", ".join(f"{q(VideoJob, name)} = %s" for name in names)
        return f"UPDATE {q(VideoJob)} SET {sets} WHERE {q(VideoJob, 'id')} = %s AND {q(VideoJob, field)} {test}"

    sql = prebuilt(f"videojob.set:{','.join(names)}:{field}:{test}", build)
    params = save_values(VideoJob, fields) + [VideoJob._meta.pk.get_db_prep_value(job_id, connection)]
    if expected is not None:
        params += save_values(VideoJob, {field: expected})
    if write(sql, params) != 1:
        return False
    written([job_id], fields)
    return True


class VideoJob(models.Model):
    """One image-to-video request and everything that happened to it."""

    objects = VideoJobQuerySet.as_manager()

    class Status(models.TextChoices):
        QUEUED = "queued"
        PROVISIONING = "provisioning"
        SUBMITTED = "submitted"
        RUNNING = "running"
        UPLOADING = "uploading"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Backend(models.TextChoices):
        COMFYUI = "comfyui", "ComfyUI (GPU)"
        FAL = "fal", "fal.ai"

    class ErrorClass(models.TextChoices):
        """Why a job failed; each class has its own advice (generation/failures.py)."""

        MISSING_MODEL = "missing_model", "Model file missing"
        CORRUPT_MODEL = "corrupt_model", "Model file corrupt or incomplete"
        OUT_OF_MEMORY = "out_of_memory", "Out of GPU memory"
        WORKFLOW_REJECTED = "workflow_rejected", "Workflow rejected by ComfyUI"
        CUSTOM_NODE_MISSING = "custom_node_missing", "Custom node missing"
        COMFYUI_UNREACHABLE = "comfyui_unreachable", "ComfyUI unreachable"
        NODE_ERROR = "node_error", "Error while running a node"
        STORAGE_REFUSED = "storage_refused", "Storage refused the video"
        FAL_CONTENT_POLICY = "fal_content_policy", "fal.ai content policy"
        FAL_BAD_INPUT = "fal_bad_input", "fal.ai rejected the input"
        FAL_ERROR = "fal_error", "fal.ai error"
        NO_GPU = "no_gpu", "No GPU configured"
        TIMEOUT = "timeout", "Took too long"
        OTHER = "other", "Other"

    # The forward path; a job only ever moves right along it, or to failed/cancelled.
    PATH = [Status.QUEUED, Status.PROVISIONING, Status.SUBMITTED, Status.RUNNING, Status.UPLOADING, Status.COMPLETED]
    TERMINAL = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)
    ACTIVE = (Status.QUEUED, Status.PROVISIONING, Status.SUBMITTED, Status.RUNNING, Status.UPLOADING)
    # Column stamped when a job enters a state.
    STAMPS = {
        Status.PROVISIONING: "provisioning_at",
        Status.SUBMITTED: "submitted_at",
        Status.RUNNING: "started_at",
        Status.UPLOADING: "uploading_at",
        Status.COMPLETED: "finished_at",
        Status.FAILED: "finished_at",
        Status.CANCELLED: "finished_at",
    }

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="video_jobs")
    input_image = models.FileField(upload_to="inputs/%Y/%m/", max_length=300)
    image_url = models.URLField(max_length=2000, blank=True, help_text="Where the image was fetched from, if given as a URL")
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    backend = models.CharField(max_length=10, choices=Backend.choices, default=Backend.COMFYUI)
    workflow = models.ForeignKey(Workflow, null=True, blank=True, on_delete=models.SET_NULL)
    workflow_slug = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    frames = models.PositiveIntegerField()
    fps = models.PositiveIntegerField()
    seed = models.BigIntegerField(null=True, blank=True)
    steps = models.PositiveIntegerField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    request_hash = models.CharField(max_length=64, blank=True, help_text="sha256 of the request an idempotency key was used with")
    webhook_url = models.URLField(max_length=2000, blank=True)

    # Where it runs: the scheduler binds it to a place (gpu.capacity: "config", "server:<pk>",
    # "vast:<uuid>", or "fal") only when that place has a free slot; empty while it waits.
    place = models.CharField(max_length=64, blank=True)
    bound_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True, help_text="Finish by then if any place can")
    posted_at = models.DateTimeField(
        null=True, blank=True, help_text="When POST /prompt was first attempted on the current place"
    )
    gpu_class = models.CharField(max_length=100, blank=True, help_text="The kind of GPU it ran on (run-time history)")
    instance = models.ForeignKey(VastInstance, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    comfyui_url = models.URLField(max_length=500, blank=True)
    prompt_id = models.CharField(max_length=64, blank=True)
    client_id = models.CharField(max_length=64, blank=True)
    submit_count = models.PositiveIntegerField(default=0)
    request_id = models.CharField(max_length=100, blank=True)
    provider_urls = models.JSONField(default=dict, blank=True)

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    progress = models.FloatField(default=0.0)
    step = models.PositiveIntegerField(default=0)
    steps_total = models.PositiveIntegerField(default=0)
    current_node = models.CharField(max_length=100, blank=True)
    node_progress = models.JSONField(default=dict, blank=True, help_text="Latest [value, max] per ComfyUI node")
    queue_position = models.IntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_class = models.CharField(max_length=24, choices=ErrorClass.choices, blank=True)
    error_info = models.JSONField(default=dict, blank=True, help_text="What the advice names: file, folder, node, input, GPU")
    cancel_requested = models.BooleanField(default=False)
    unreachable_since = models.DateTimeField(null=True, blank=True, help_text="When ComfyUI stopped answering")
    note = models.CharField(max_length=300, blank=True, help_text="What happened that the user should know")
    node_timings = models.JSONField(
        default=list, blank=True, help_text="[node id, class_type, start s, seconds] per node that ran, then the upload"
    )
    eta_at = models.DateTimeField(null=True, blank=True, help_text="When the video should be stored, from past runs")

    video = models.FileField(upload_to="videos/%Y/%m/", max_length=300, blank=True)
    video_size = models.BigIntegerField(null=True, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    status_changed_at = models.DateTimeField(default=timezone.now)
    provisioning_at = models.DateTimeField(null=True, blank=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    uploading_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cost_usd = models.DecimalField(max_digits=10, decimal_places=4, null=True, blank=True)

    # A lease so that only one task works on a job at a time.
    lease_token = models.CharField(max_length=32, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "idempotency_key"], name="unique_idempotency_key_per_owner"),
        ]
        indexes = [
            # GET /api/jobs: a user's jobs newest first, optionally by status.
            models.Index(fields=["owner", "-created_at"]),
            # The watchdog: active jobs whose lease ran out.
            models.Index(fields=["status", "lease_until"]),
            # The scheduler: waiting jobs (place "") in order, and the jobs bound to each place.
            models.Index(fields=["place", "status", "created_at"]),
            # Progress weights: the last completed runs of one workflow and size (runner.past_timings).
            models.Index(fields=["workflow_slug", "width", "height", "frames", "status", "-finished_at"]),
        ]

    def __str__(self):
        return f"VideoJob {self.id} ({self.status})"

    @property
    def is_terminal(self):
        return self.status in self.TERMINAL

    @classmethod
    def can_transition(cls, frm, to) -> bool:
        if frm in cls.TERMINAL or frm == to:
            return False
        if to in (cls.Status.FAILED, cls.Status.CANCELLED):
            return True
        if to not in cls.PATH:
            return False
        return cls.PATH.index(to) > cls.PATH.index(frm)

    def transition(self, to, **fields) -> bool:
        """Compare-and-set self.status → `to` (refuses illegal moves; False if another writer won)."""
        if not self.can_transition(self.status, to):
            raise IllegalTransition(f"Job cannot go from {self.status} to {to}.")
        now = timezone.now()
        fields["status_changed_at"] = now
        fields.setdefault(self.STAMPS[to], now)
        if to == self.Status.COMPLETED:
            fields.setdefault("progress", 1.0)
        won = set_if(self.pk, "status", self.status, {"status": to, **fields})
        if won:
            self.status = to
            for key, value in fields.items():
                setattr(self, key, value)
        return won

    def duration_seconds(self):
        if not self.finished_at:
            return None
        return (self.finished_at - self.created_at).total_seconds()

    def gpu_seconds(self):
        if not self.started_at:
            return None
        end = self.finished_at or timezone.now()
        return max(0.0, (end - (self.submitted_at or self.started_at)).total_seconds())


class UserQuota(models.Model):
    """A user's share of the GPUs and limits; a user without a row gets the settings' defaults."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota")
    weight = models.PositiveSmallIntegerField(
        default=1, help_text="Share of the GPUs while others wait: a user with weight 2 gets two turns to one's one."
    )
    max_waiting = models.PositiveIntegerField(null=True, blank=True, help_text="Jobs waiting at once; empty = I2V_MAX_WAITING")
    max_running = models.PositiveIntegerField(null=True, blank=True, help_text="Jobs running at once; empty = I2V_MAX_RUNNING")
    fal_daily_usd = models.DecimalField(
        "fal.ai $/day", max_digits=10, decimal_places=2, null=True, blank=True,
        help_text="fal.ai spend per day (UTC); empty = I2V_FAL_DAILY_USD",
    )

    class Meta:
        verbose_name = "user quota"

    def __str__(self):
        return f"UserQuota {self.user_id} (weight {self.weight})"

    @property
    def waiting_limit(self) -> int:
        return self.max_waiting if self.max_waiting is not None else settings.I2V_MAX_WAITING

    @property
    def running_limit(self) -> int:
        return self.max_running if self.max_running is not None else settings.I2V_MAX_RUNNING

    @property
    def fal_limit(self):
        from decimal import Decimal

        return self.fal_daily_usd if self.fal_daily_usd is not None else Decimal(str(settings.I2V_FAL_DAILY_USD))


class RunStat(models.Model):
    """How long runs of one kind took on one class of GPU: the scheduler's expected run time."""

    workflow_slug = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    frames = models.PositiveIntegerField()
    gpu_class = models.CharField(max_length=100)
    runs = models.PositiveIntegerField(default=0)
    mean_seconds = models.FloatField(default=0.0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["workflow_slug", "width", "height", "frames", "gpu_class"], name="unique_run_kind"),
        ]

    def __str__(self):
        return f"RunStat {self.workflow_slug} {self.width}x{self.height}x{self.frames} on {self.gpu_class}: {self.mean_seconds:.1f} s"


class SchedulerState(models.Model):
    """One row: the lock every scheduling pass takes, and what the last pass saw."""

    last_pass_at = models.DateTimeField(null=True, blank=True)
    passes = models.PositiveBigIntegerField(default=0, help_text="Passes so far (lets a pass asked for twice run once)")
    pass_ms = models.FloatField(default=0.0)
    ticker_until = models.DateTimeField(null=True, blank=True, help_text="A worker passes every few seconds until then")
    summary = models.JSONField(default=dict, blank=True)

    def __str__(self):
        return f"SchedulerState (last pass {self.last_pass_at})"


class WebhookDelivery(models.Model):
    """One attempt to POST a job's final state to its webhook_url."""

    job = models.ForeignKey(VideoJob, on_delete=models.CASCADE, related_name="webhook_deliveries")
    attempt = models.PositiveIntegerField()
    at = models.DateTimeField(default=timezone.now)
    url = models.URLField(max_length=2000)
    status_code = models.IntegerField(null=True, blank=True)
    ok = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["job", "attempt"]
        verbose_name_plural = "webhook deliveries"

    def __str__(self):
        return f"Webhook {self.job_id} #{self.attempt} ({'ok' if self.ok else 'failed'})"


def _connect_job_cache():
    from generation.jobcache import _forget_instance

    models.signals.post_save.connect(_forget_instance, sender=VideoJob, dispatch_uid="jobcache-save")
    models.signals.post_delete.connect(_forget_instance, sender=VideoJob, dispatch_uid="jobcache-delete")


_connect_job_cache()
