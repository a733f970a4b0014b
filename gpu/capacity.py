"""The GPU side's offer to the scheduler: every place a ComfyUI job can run, with its price and slots.

A place is the ComfyUI URL of the GPU configuration, a further ComfyUIServer, or a vast.ai
instance (ready, or booting: capacity that is coming). gpu/ knows nothing of jobs: the
scheduler (generation.scheduler) counts the jobs bound to each place and decides.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import django.dispatch
from django.conf import settings
from django.db import connection
from django.db.models import F, Max
from django.utils import timezone

from gpu.models import ComfyUIServer, GpuConfig, PlaceHealth, VastInstance
from gpu.tunnel import instance_for_url
from i2v.core.sql import columns, fetch, from_row, prebuilt

# A URL that refused a job is left alone this long before the scheduler tries it again.
DOWN_RETRY_SECONDS = 15
CONFIG = "config"


# What gpu/ asks about jobs without knowing them: the job side registers the answers at startup
# (generation.apps), so gpu/ never imports generation.
_demand = {"active_jobs": lambda instance_pk: 0, "jobs_waiting": lambda: False, "workflow_models": lambda slug: []}

# Sent when capacity appears or goes (an instance became ready, or ended): the scheduler listens.
capacity_changed = django.dispatch.Signal()


def register_demand(*, active_jobs, jobs_waiting, workflow_models) -> None:
    """active_jobs(instance_pk) -> jobs working on that instance; jobs_waiting() -> any job
    waits for a GPU; workflow_models(slug) -> [(ComfyUI's model list name, file name)] the
    workflow's graph loads."""
    _demand.update(active_jobs=active_jobs, jobs_waiting=jobs_waiting, workflow_models=workflow_models)


def workflow_models(slug: str) -> list[tuple[str, str]]:
    return _demand["workflow_models"](slug)


def active_jobs(instance_pk) -> int:
    return _demand["active_jobs"](instance_pk)


def jobs_waiting() -> bool:
    return _demand["jobs_waiting"]()


@dataclass
class Place:
    key: str  # "config", "server:<pk>", "vast:<uuid>": what a job's `place` stores
    url: str
    token: str
    slots: int
    dph: Decimal  # $/hour
    gpu_class: str  # places with the same class share run-time history
    label: str  # for people: "ComfyUI at …", "vast.ai instance 123 (RTX 4090)"
    ready_at: datetime | None = None  # None: ready now; else a booting instance, expected ready then
    instance_id: object = None
    down: bool = False

    @property
    def ready(self) -> bool:
        return self.ready_at is None and not self.down


# The reads of every scheduling pass, with prebuilt SQL (i2v.core.sql): compiling them took
# longer than running them.


def servers_read() -> tuple[str, list]:
    """The enabled ComfyUI servers' prebuilt SELECT and its parameters (i2v.core.sql.read_ahead)."""
    return prebuilt("comfyuiserver.enabled", lambda q: f"SELECT {columns(ComfyUIServer, q)} FROM {q(ComfyUIServer)} "
                                                       f"WHERE {q(ComfyUIServer, 'enabled')} = %s"), [True]


def _enabled_servers() -> list[ComfyUIServer]:
    return [from_row(ComfyUIServer, row) for row in fetch(*servers_read())]


def down_read(now) -> tuple[str, list]:
    """The prebuilt SELECT of the URLs that refused a connection lately, as of `now`, and its
    parameters (i2v.core.sql.read_ahead)."""
    cutoff = now - timedelta(seconds=DOWN_RETRY_SECONDS)
    sql = prebuilt("placehealth.down", lambda q: f"SELECT {q(PlaceHealth, 'url')} FROM {q(PlaceHealth)} "
                                                 f"WHERE {q(PlaceHealth, 'checked_at')} > %s")
    return sql, [PlaceHealth._meta.get_field("checked_at").get_db_prep_value(cutoff, connection)]


def _down_urls(now) -> set[str]:
    return {url for (url,) in fetch(*down_read(now))}


def expected_boot_seconds(config: GpuConfig | None = None) -> float:
    """How long a new vast.ai instance takes to be ready: the mean of the last ten that were,
    else the configured default."""
    config = config or GpuConfig.get()
    booted = (VastInstance.objects.filter(ready_at__isnull=False)
              .annotate(took=F("ready_at") - F("created_at")).order_by("-created_at")
              .values_list("took", flat=True)[:10])
    took = [t.total_seconds() for t in booted if t is not None and t.total_seconds() > 0]
    return sum(took) / len(took) if took else float(config.default_boot_seconds)


def _config_place(config, live: list[VastInstance] | None = None) -> Place | None:
    """`live`: the live instances when the caller has them (else they are asked for)."""
    if not config.comfyui_url:
        return None
    instance = instance_for_url(config.comfyui_url, config, live)
    if instance is not None:
        # A vast.ai instance's URL (one the user rented and named): one place, its busy time, its price.
        return Place(CONFIG, config.comfyui_url, config.comfyui_token or instance.web_password, config.slots_per_gpu,
                     instance.dph_total, instance.gpu_name or f"url:{config.comfyui_url}",
                     f"ComfyUI at {config.comfyui_url} (vast.ai instance {instance.vast_id})", instance_id=instance.pk)
    return Place(CONFIG, config.comfyui_url, config.comfyui_token, config.slots_per_gpu, config.comfyui_dph,
                 f"url:{config.comfyui_url}", f"ComfyUI at {config.comfyui_url}")


def _server_place(server, config) -> Place:
    return Place(f"server:{server.pk}", server.url, server.token, server.slots or config.slots_per_gpu, server.dph,
                 server.gpu_name or f"url:{server.url}", f"ComfyUI {server.name} at {server.url}")


def _instance_place(instance, config, boot_seconds) -> Place:
    label = f"vast.ai instance {instance.vast_id or 'being rented'}" + (f" ({instance.gpu_name})" if instance.gpu_name else "")
    ready_at = None
    if instance.state != VastInstance.State.RUNNING or not instance.comfyui_url:
        ready_at = max(timezone.now(), instance.created_at + timedelta(seconds=boot_seconds))
    return Place(f"vast:{instance.pk}", instance.comfyui_url, instance.web_password, config.slots_per_gpu,
                 instance.dph_total, instance.gpu_name or "vast", label, ready_at=ready_at, instance_id=instance.pk)


def places(config: GpuConfig | None = None, now=None) -> list[Place]:
    """Every place a ComfyUI job can run now or soon, with `down` set on URLs that just refused."""
    config = config or GpuConfig.get()
    now = now or timezone.now()
    found = []
    live = VastInstance.objects.live_list()
    if (place := _config_place(config, live)) is not None:
        found.append(place)
    found += [_server_place(s, config) for s in _enabled_servers()]
    # An instance behind the configured URL is that place already, not a second one.
    live = [i for i in live if not place or i.pk != place.instance_id]
    if live:
        boot = expected_boot_seconds(config)
        found += [_instance_place(i, config, boot) for i in live]
    down = _down_urls(now)
    for place in found:
        place.down = bool(place.url) and place.url in down
    return found


def resolve(key: str) -> Place | None:
    """The place a job is bound to, as it is now (the configured URL may have changed); None when
    the place is gone (an instance destroyed, a server removed or switched off)."""
    config = GpuConfig.get()
    if key == CONFIG:
        return _config_place(config)
    # Each read is one of the prebuilt ones (i2v.core.sql), so that a worker can read them
    # ahead with its lease (generation.tasks.lease_and_read).
    kind, _, ident = key.partition(":")
    if kind == "server" and ident.isdigit():
        server = next((s for s in _enabled_servers() if s.pk == int(ident)), None)
        return _server_place(server, config) if server else None
    if kind == "vast" and _is_uuid(ident):
        instance = next((i for i in VastInstance.objects.live_list() if i.pk == uuid.UUID(ident)
                         and i.state == VastInstance.State.RUNNING and i.comfyui_url), None)
        return _instance_place(instance, config, 0) if instance else None
    return None


def resolve_reads() -> list[tuple[str, list]]:
    """The prebuilt SELECTs resolve() makes, for i2v.core.sql.read_ahead."""
    return [GpuConfig.read(), VastInstance.objects.live_read(), servers_read()]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def mark_down(url: str, error: str) -> bool:
    """Record that `url` refused a connection. True when it was up before (so callers log once)."""
    now = timezone.now()
    row, created = PlaceHealth.objects.get_or_create(url=url, defaults={"down_since": now, "checked_at": now, "error": error[:300]})
    if not created:
        PlaceHealth.objects.filter(pk=row.pk).update(checked_at=now, error=error[:300])
    return created


def mark_up(url: str) -> bool:
    """`url` answered. True when it had been down."""
    # Asked after every run: one indexed look in the usual case, prebuilt (traced on the worker's
    # way out, while the web answers the run's end: 1.0-1.3 ms through the ORM's exists(), 0.2-0.3
    # prebuilt). Django wraps a delete in a transaction of its own, three round trips: only for a
    # URL that was down.
    sql = prebuilt("placehealth.exists", lambda q: f"SELECT 1 FROM {q(PlaceHealth)} WHERE {q(PlaceHealth, 'url')} = %s LIMIT 1")
    return bool(fetch(sql, [url])) and PlaceHealth.objects.filter(url=url).delete()[0] > 0


def down_since(url: str) -> datetime | None:
    return PlaceHealth.objects.filter(url=url).values_list("down_since", flat=True).first()


def rental_room(config: GpuConfig | None = None) -> int:
    """How many more vast.ai instances may be rented now (0 when renting is off or at the cap)."""
    config = config or GpuConfig.get()
    if config.gpu_provider != GpuConfig.Provider.VASTAI or not settings.VASTAI_API_KEY:
        return 0
    live = VastInstance.objects.filter(state__in=VastInstance.LIVE).count()
    return max(0, config.max_instances - live)


def rental_blocker(config: GpuConfig) -> str:
    """Why rental_room() is 0, in words an operator can act on."""
    if not settings.VASTAI_API_KEY:
        return "VASTAI_API_KEY is not set on the server."
    if config.max_instances == 0:
        return "max_instances is 0, so vast.ai rentals are switched off: raise it in admin → GPU configuration."
    return f"at the limit of {config.max_instances} vast.ai instance(s) (max_instances)."


def idle_since(instance: VastInstance) -> datetime:
    """Since when the instance has had nothing to do: the latest of its last job finishing
    (through the reverse relation the job side declares), being given work, ready, created."""
    last_job = instance.jobs.aggregate(last=Max("finished_at"))["last"]
    return max(t for t in (instance.last_busy_at, instance.ready_at, last_job, instance.created_at) if t)


def touch_instance(instance_id, now=None) -> None:
    """The scheduler gave the instance work: its idle time starts again."""
    VastInstance.objects.filter(pk=instance_id).update(last_busy_at=now or timezone.now())
