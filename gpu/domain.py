"""GPU-side business logic: config changes (recorded), availability, and the error every
vast.ai rental step (gpu.offers, gpu.onstart, gpu.lifecycle, gpu.reconciler) raises."""

import time

from django.conf import settings
from django.db import IntegrityError, transaction

from gpu.models import ApiPace, GpuConfig, GpuConfigChange
from gpu.vastai import VastAIClient, VastAIError

CONFIG_FIELDS = ("comfyui_url", "swarmui_url", "gpu_provider", "vastai_instance_id", "comfyui_token")
NO_KEY = ("vast.ai is not configured: set VASTAI_API_KEY (an API key from https://cloud.vast.ai/manage-keys/) "
          "and restart the server and the worker.")


class ProvisioningError(Exception):
    """A GPU could not be rented, readied or destroyed; str() says what to do.

    `status` is the HTTP code the API answers with; `transient` errors (vast.ai
    unreachable, rate-limited) are worth retrying later."""

    def __init__(self, message, *, status=409, transient=False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.transient = transient

    def __str__(self):
        return self.message


def pace(endpoint: str, interval: float) -> None:
    """Wait for this process's turn at a vast.ai endpoint: calls go out at least `interval` seconds
    apart across every process. A slot is claimed in the database (a row lock on PostgreSQL, the
    write lock on SQLite), then the wait happens outside the transaction."""
    for _ in range(3):
        try:
            with transaction.atomic():
                ApiPace.objects.get_or_create(endpoint=endpoint)
                row = ApiPace.objects.select_for_update().get(endpoint=endpoint)
                now = time.time()
                start = max(now, row.next_at)
                ApiPace.objects.filter(pk=row.pk).update(next_at=start + interval)
            break
        except IntegrityError:  # two processes created the row at once: the other one won
            continue
    else:
        return
    if start > now:
        time.sleep(start - now)


def vast_client(*, retries=3) -> VastAIClient:
    if not settings.VASTAI_API_KEY:
        raise ProvisioningError(NO_KEY, status=503)
    return VastAIClient(settings.VASTAI_API_KEY, settings.VASTAI_API_URL, retries=retries,
                        backoff=settings.VASTAI_RETRY_BACKOFF, pace=pace, pace_scale=settings.VASTAI_PACE_SCALE)


def vast_error(exc: VastAIError, doing: str) -> ProvisioningError:
    if exc.kind in ("unreachable", "timeout", "rate_limited", "quota", "http", "bad_response"):
        return ProvisioningError(f"{doing}: {exc}", status=503, transient=exc.kind != "quota")
    if exc.kind == "auth":
        return ProvisioningError(f"{doing}: {exc}", status=503)
    return ProvisioningError(f"{doing}: {exc}", status=409)


def mask(field, value):
    if field in GpuConfig.SECRET_FIELDS:
        return "(set)" if value else "(empty)"
    return "" if value is None else str(value)


def record_changes(old: GpuConfig, new: GpuConfig, *, user=None, source="api") -> list[str]:
    """Record each audited field that differs between `old` and `new` (secrets masked)."""
    changed = []
    for field in CONFIG_FIELDS:
        before, after = getattr(old, field), getattr(new, field)
        if before == after:
            continue
        changed.append(field)
        GpuConfigChange.objects.create(
            user=user if user is not None and user.is_authenticated else None,
            field=field,
            old_value=mask(field, before),
            new_value=mask(field, after),
            source=source,
        )
    return changed


@transaction.atomic
def save_config(config: GpuConfig, *, user=None, source="api") -> GpuConfig:
    """Save `config` (the singleton), recording what changed against the stored row."""
    old = GpuConfig.objects.select_for_update().get(pk=GpuConfig.get().pk)
    record_changes(old, config, user=user, source=source)
    config.save()
    return config


def update_config(changes: dict, *, user=None, source="api") -> GpuConfig:
    """Apply `changes` to the GpuConfig row and record each changed field."""
    config = GpuConfig.get()
    for field, value in changes.items():
        setattr(config, field, value)
    return save_config(config, user=user, source=source)


PROBE_STAFF_ONLY = ("Only staff can test a URL other than the configured ones; "
                    "leave the URL out to test the configured GPU.")


def may_probe(user, url: str, config: GpuConfig) -> bool:
    """Staff may probe any URL; other users only the configured ComfyUI/SwarmUI (probing any URL
    from the server would map the server's network for them: open, refused and timeout differ)."""
    from gpu.urls_check import split_token

    if user.is_staff:
        return True
    target = split_token(url.strip().rstrip("/"))[0]
    return bool(target) and target in {u.rstrip("/") for u in (config.comfyui_url, config.swarmui_url) if u}
