"""GPU-side business logic: config changes (recorded), availability."""

from django.db import transaction

from gpu.models import GpuConfig, GpuConfigChange

CONFIG_FIELDS = ("comfyui_url", "swarmui_url", "gpu_provider", "vastai_instance_id", "comfyui_token")


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
