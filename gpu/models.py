import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone

from i2v.core.crypto import EncryptedTextField
from i2v.core.sql import columns, fetch, from_row, marks, prebuilt


class GpuConfig(models.Model):
    """The one GPU configuration row (a singleton, pk=1), edited in the admin and the API."""

    class Provider(models.TextChoices):
        NONE = "none", "None"
        LOCAL = "local", "Local / any URL"
        VASTAI = "vastai", "vast.ai"

    SINGLETON_PK = 1
    SECRET_FIELDS = ("comfyui_token",)

    comfyui_url = models.URLField(max_length=500, blank=True, help_text="e.g. the tunnel URL behind vast.ai's Open button")
    swarmui_url = models.URLField(max_length=500, blank=True)
    gpu_provider = models.CharField(max_length=10, choices=Provider.choices, default=Provider.NONE)
    vastai_instance_id = models.BigIntegerField(null=True, blank=True, help_text="vast.ai id of the instance in use")
    comfyui_token = EncryptedTextField(
        max_length=500, blank=True, purpose="gpu.comfyui_token",
        help_text="Sent as Authorization: Bearer to ComfyUI. Write-only; encrypted at rest.",
    )
    default_workflow = models.CharField(max_length=64, default="wan22-i2v")

    # Provisioning policy (vast.ai).
    min_vram_gb = models.PositiveIntegerField(default=24)
    gpu_names = models.CharField(max_length=500, blank=True, help_text="Comma separated, e.g. RTX 4090, RTX 5090")
    max_dph = models.DecimalField("max $/hour", max_digits=8, decimal_places=4, default=Decimal("1.0000"))
    min_reliability = models.FloatField(default=0.98)
    min_inet_down_mbps = models.PositiveIntegerField(default=500)
    verified_only = models.BooleanField(default=True)
    min_direct_ports = models.PositiveIntegerField(default=4)
    disk_gb = models.PositiveIntegerField(default=80)
    docker_image = models.CharField(max_length=300, default="vastai/comfy:latest")
    template_hash = models.CharField(max_length=100, blank=True)
    max_instances = models.PositiveIntegerField(default=1)
    idle_minutes = models.PositiveIntegerField(default=15, help_text="Destroy an instance idle this long.")
    boot_timeout_minutes = models.PositiveIntegerField(default=30)
    scale_out_wait_seconds = models.PositiveIntegerField(default=300)
    max_daily_spend = models.DecimalField(max_digits=10, decimal_places=2, default=Decimal("20.00"))

    # Scheduling (generation.scheduler): where jobs go and how much each GPU takes at once.
    class Policy(models.TextChoices):
        GPU_ONLY = "gpu_only", "GPU only (fal.ai only when a job asks for it)"
        CHEAPEST = "cheapest", "Cheapest place that meets the job's deadline"
        FASTEST = "fastest", "Fastest place (earliest finish)"

    placement_policy = models.CharField(max_length=10, choices=Policy.choices, default=Policy.GPU_ONLY)
    slots_per_gpu = models.PositiveSmallIntegerField(
        default=2, help_text="Jobs handed to one ComfyUI at once: 1 running + 1 waiting in its own queue."
    )
    comfyui_dph = models.DecimalField(
        "$/hour of the ComfyUI URL", max_digits=8, decimal_places=4, default=Decimal("0"),
        help_text="What an hour of the configured ComfyUI costs you (0 for your own GPU); used to compare prices.",
    )
    default_run_seconds = models.PositiveIntegerField(
        default=300, help_text="Expected seconds of one run while no past run of the same kind is known."
    )
    default_boot_seconds = models.PositiveIntegerField(
        default=600, help_text="Expected seconds for a new vast.ai instance to become ready, until some have booted."
    )

    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "GPU configuration"
        verbose_name_plural = "GPU configuration"

    def __str__(self):
        return f"GPU config ({self.gpu_provider})"

    def save(self, *args, **kwargs):
        self.pk = self.SINGLETON_PK
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("The GPU configuration cannot be deleted; clear its fields instead.")

    @classmethod
    def read(cls) -> tuple[str, list]:
        """get()'s prebuilt SELECT and its parameters (i2v.core.sql.read_ahead)."""
        return prebuilt("gpuconfig", lambda q: f"SELECT {columns(cls, q)} FROM {q(cls)} WHERE {q(cls, 'id')} = %s"), [
            cls.SINGLETON_PK]

    @classmethod
    def get(cls):
        # Read by every scheduling pass and every job's worker: prebuilt SQL (i2v.core.sql).
        for row in fetch(*cls.read()):
            return from_row(cls, row)
        obj, _ = cls.objects.get_or_create(
            pk=cls.SINGLETON_PK,
            defaults={"comfyui_url": settings.COMFYUI_URL, "swarmui_url": settings.SWARMUI_URL},
        )
        return obj


class GpuConfigChange(models.Model):
    """One recorded change of a GpuConfig field (secrets masked)."""

    at = models.DateTimeField(default=timezone.now)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    field = models.CharField(max_length=64)
    old_value = models.TextField(blank=True)
    new_value = models.TextField(blank=True)
    source = models.CharField(max_length=20, default="api")

    class Meta:
        ordering = ["-at"]

    def __str__(self):
        return f"{self.field}: {self.old_value!r} → {self.new_value!r}"


class IllegalTransition(Exception):
    pass


class VastInstanceQuerySet(models.QuerySet):
    def reapable(self):
        """Live instances i2v may destroy on its own (the idle reaper): its own rentals, and an
        instance the user rented in the console only once they switched auto_destroy on."""
        return self.filter(state__in=VastInstance.LIVE, auto_destroy=True)

    def under_spend_cap(self):
        """The instances the daily spend cap counts: the same consent as the reaper's."""
        return self.filter(auto_destroy=True)

    def live_read(self) -> tuple[str, list]:
        """live_list()'s prebuilt SELECT and its parameters (i2v.core.sql.read_ahead)."""
        model, live = self.model, self.model.LIVE
        return prebuilt("vastinstance.live", lambda q: f"SELECT {columns(model, q)} FROM {q(model)} "
                                                       f"WHERE {q(model, 'state')} IN ({marks(len(live))})"), list(live)

    def live_list(self) -> list["VastInstance"]:
        """The live instances (a few rows at most), read by every scheduling pass: prebuilt SQL
        (i2v.core.sql) instead of the 1.2 ms the ORM takes to compile the query."""
        return [from_row(self.model, row) for row in fetch(*self.live_read())]

    def reconcilable(self):
        """Rows the reconciler may destroy or relabel: never an adopted instance."""
        return self.exclude(origin=VastInstance.Origin.ADOPTED)


class VastInstance(models.Model):
    """One rented vast.ai instance and what it has cost."""

    class State(models.TextChoices):
        CREATING = "creating"
        LOADING = "loading"
        RUNNING = "running"
        DESTROYING = "destroying"
        DESTROYED = "destroyed"
        FAILED = "failed"

    TRANSITIONS = {
        State.CREATING: {State.LOADING, State.RUNNING, State.DESTROYING, State.FAILED},
        State.LOADING: {State.RUNNING, State.DESTROYING, State.FAILED},
        State.RUNNING: {State.DESTROYING, State.FAILED},
        # A failed instance may still exist on vast.ai: it must be destroyed too.
        State.FAILED: {State.DESTROYING, State.DESTROYED},
        State.DESTROYING: {State.DESTROYED, State.FAILED},
        State.DESTROYED: set(),
    }
    LIVE = (State.CREATING, State.LOADING, State.RUNNING)
    BOOTING = (State.CREATING, State.LOADING)

    class Origin(models.TextChoices):
        MANUAL = "manual"  # the API, the admin or a management command
        JOB = "job"  # a job needed a GPU and none was live
        SCALE_OUT = "scale-out"  # jobs waited too long
        ADOPTED = "adopted"  # rented by the user in the vast.ai console, then named in the GPU config

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    vast_id = models.BigIntegerField(null=True, blank=True, unique=True)
    offer_id = models.BigIntegerField(null=True, blank=True)
    machine_id = models.BigIntegerField(null=True, blank=True)
    gpu_name = models.CharField(max_length=100, blank=True)
    num_gpus = models.PositiveIntegerField(default=1)
    gpu_ram_mb = models.PositiveIntegerField(null=True, blank=True)
    dph_total = models.DecimalField("$/hour", max_digits=8, decimal_places=4, default=Decimal("0"))
    state = models.CharField(max_length=12, choices=State.choices, default=State.CREATING)
    status_msg = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    comfyui_url = models.URLField(max_length=500, blank=True)
    web_password = EncryptedTextField(max_length=100, blank=True, editable=False, purpose="gpu.vast_web_password")

    created_at = models.DateTimeField(default=timezone.now)
    state_changed_at = models.DateTimeField(default=timezone.now)
    ready_at = models.DateTimeField(null=True, blank=True)
    last_busy_at = models.DateTimeField(null=True, blank=True)
    destroyed_at = models.DateTimeField(null=True, blank=True)
    cost_usd = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal("0"))

    # Provisioning bookkeeping (gpu.lifecycle, gpu.onstart).
    origin = models.CharField(max_length=12, choices=Origin.choices, default=Origin.MANUAL)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    attempt = models.PositiveSmallIntegerField(default=1, help_text="1 for a first rental, 2+ for a replacement of a machine that died")
    actual_status = models.CharField(max_length=20, blank=True, help_text="vast.ai's actual_status when last checked")
    checked_at = models.DateTimeField(null=True, blank=True, help_text="When vast.ai was last asked about it")
    unknown_since = models.DateTimeField(null=True, blank=True,
                                         help_text="Since when a running instance reports `unknown` (a heartbeat gap)")
    comfyui_seen_at = models.DateTimeField(null=True, blank=True, help_text="When ComfyUI first answered")
    portal_url = models.URLField(max_length=500, blank=True)
    provisioning_key = models.CharField(max_length=300, blank=True, help_text="R2 key of its generated provisioning script")
    destroy_reason = models.CharField(max_length=300, blank=True)
    auto_destroy = models.BooleanField(
        default=True, help_text="Destroyed when idle and counted in the daily spend cap. Off by default for an instance "
                                "you rented yourself in the vast.ai console (i2v never destroys it without consent).")
    template = models.JSONField(default=dict, blank=True, editable=False,
                                help_text="What adoption found the instance runs (image, ports, tokens) and what i2v "
                                          "can and cannot do with it")
    tunnel_checked_at = models.DateTimeField(null=True, blank=True, help_text="When the portal was last asked for the tunnel URL")

    objects = VastInstanceQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Live instances for scheduling and the idle reaper.
            models.Index(fields=["state", "created_at"]),
        ]

    def __str__(self):
        return f"VastInstance {self.vast_id or self.id} ({self.state})"

    @classmethod
    def can_transition(cls, frm, to) -> bool:
        return to in cls.TRANSITIONS.get(frm, set())

    def transition(self, to, **fields) -> bool:
        """Compare-and-set self.state → `to`. Refuses illegal moves; False if another writer won."""
        if not self.can_transition(self.state, to):
            raise IllegalTransition(f"Instance cannot go from {self.state} to {to}.")
        now = timezone.now()
        fields.setdefault("state_changed_at", now)
        if to == self.State.RUNNING:
            fields.setdefault("ready_at", now)
        if to == self.State.DESTROYED:
            fields.setdefault("destroyed_at", now)
        won = VastInstance.objects.filter(pk=self.pk, state=self.state).update(state=to, **fields) == 1
        if won:
            self.state = to
            for key, value in fields.items():
                setattr(self, key, value)
        return won

    @property
    def label(self) -> str:
        """The vast.ai label that ties a rented instance to this row (the reconciler reads it)."""
        return f"i2v:{self.id}"

    @property
    def vram_gb(self):
        return round(self.gpu_ram_mb / 1024, 1) if self.gpu_ram_mb else None

    def accrued_cost(self, now=None) -> Decimal:
        """$/hour × time since creation (until destroyed)."""
        end = self.destroyed_at or now or timezone.now()
        seconds = max(0.0, (end - self.created_at).total_seconds())
        return (self.dph_total * Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.0001"))


class BadMachine(models.Model):
    """A vast.ai machine an instance died on while booting; offers on it are skipped for a while."""

    machine_id = models.BigIntegerField(unique=True)
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"BadMachine {self.machine_id}"


class ModelFile(models.Model):
    """One model file a workflow needs (the model manifest): where ComfyUI wants it and where R2
    keeps it. Workflows (generation) point here; `workflows` is their reverse relation."""

    name = models.CharField(max_length=100, unique=True)
    filename = models.CharField(max_length=300)
    folder = models.CharField(max_length=64, help_text="ComfyUI models/ folder, e.g. unet, loras, vae")
    r2_key = models.CharField(max_length=500)
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    source = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["name"]
        # The table the generation app created: the model moved here, the rows stayed.
        db_table = "generation_modelfile"

    def __str__(self):
        return f"{self.filename} ({self.folder})"

    @classmethod
    def for_workflow(cls, slug: str):
        return cls.objects.filter(workflows__slug=slug).order_by("folder", "filename")


class ComfyUIServer(models.Model):
    """A further ComfyUI (or a second tunnel) jobs may run on, besides GpuConfig.comfyui_url."""

    name = models.CharField(max_length=100, unique=True)
    url = models.URLField(max_length=500, unique=True)
    token = models.CharField(max_length=500, blank=True, help_text="Sent as Authorization: Bearer. Write-only.")
    enabled = models.BooleanField(default=True)
    slots = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Jobs at once; empty = the GPU config's slots per GPU")
    dph = models.DecimalField("$/hour", max_digits=8, decimal_places=4, default=Decimal("0"))
    gpu_name = models.CharField(max_length=100, blank=True, help_text="e.g. RTX 4090; servers with the same GPU share run-time history")
    created_at = models.DateTimeField(default=timezone.now)

    SECRET_FIELDS = ("token",)

    class Meta:
        ordering = ["name"]
        verbose_name = "ComfyUI server"

    def __str__(self):
        return f"ComfyUIServer {self.name} ({'on' if self.enabled else 'off'})"


class PlaceHealth(models.Model):
    """A ComfyUI URL that stopped answering: the scheduler leaves it alone for a while."""

    url = models.URLField(max_length=500, unique=True)
    down_since = models.DateTimeField()
    checked_at = models.DateTimeField()
    error = models.CharField(max_length=300, blank=True)

    def __str__(self):
        return f"PlaceHealth {self.url} (down since {self.down_since:%H:%M:%S})"


class ApiPace(models.Model):
    """When the next call to one rate-limited vast.ai endpoint may go out, shared by every process
    (vast.ai's limits are minimum intervals per endpoint and API key, whichever process calls)."""

    endpoint = models.CharField(max_length=40, unique=True)
    next_at = models.FloatField(default=0.0, help_text="Unix time")

    def __str__(self):
        return f"ApiPace {self.endpoint} {self.next_at:.1f}"
