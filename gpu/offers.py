"""vast.ai offers under the GPU policy, machines to avoid, and the daily spend cap."""

from datetime import timedelta
from decimal import Decimal

from django.db.models import Q
from django.utils import timezone

from gpu.domain import ProvisioningError, vast_client, vast_error
from gpu.models import BadMachine, GpuConfig, VastInstance
from gpu.vastai import VastAIError

BAD_MACHINE_DAYS = 7
SPEND_HORIZON_HOURS = Decimal(1)  # a new instance is assumed to run at least this long


def policy_filters(config) -> dict:
    """GpuConfig's GPU policy as VastAIClient.search_offers keyword arguments."""
    return {
        "min_vram_gb": config.min_vram_gb or None,
        "gpu_names": [n.strip() for n in (config.gpu_names or "").split(",") if n.strip()],
        "max_dph": float(config.max_dph) if config.max_dph else None,
        "min_reliability": config.min_reliability or None,
        "min_inet_down": config.min_inet_down_mbps or None,
        "verified": config.verified_only,
        "min_direct_ports": config.min_direct_ports or None,
        "disk_gb": config.disk_gb,
    }


def policy_text(config) -> str:
    parts = [f"≥ {config.min_vram_gb} GB VRAM"]
    if config.gpu_names.strip():
        parts.append(f"GPU one of {config.gpu_names.strip()}")
    if config.max_dph:
        parts.append(f"≤ ${config.max_dph:.2f}/h")
    if config.min_reliability:
        parts.append(f"reliability ≥ {config.min_reliability}")
    if config.min_inet_down_mbps:
        parts.append(f"≥ {config.min_inet_down_mbps} Mbps down")
    if config.verified_only:
        parts.append("verified hosts")
    if config.min_direct_ports:
        parts.append(f"≥ {config.min_direct_ports} direct ports")
    parts.append(f"{config.disk_gb} GB disk")
    return ", ".join(parts)


def bad_machines(now=None) -> list[int]:
    since = (now or timezone.now()) - timedelta(days=BAD_MACHINE_DAYS)
    return list(BadMachine.objects.filter(created_at__gte=since).values_list("machine_id", flat=True))


def search_offers(*, limit=10, config=None, **overrides) -> list[dict]:
    """The cheapest offers matching the GPU policy (overrides replace policy fields), bad machines left out."""
    config = config or GpuConfig.get()
    filters = policy_filters(config)
    filters.update({key: value for key, value in overrides.items() if value is not None})
    with vast_client() as client:
        try:
            return client.search_offers(limit=limit, exclude_machines=bad_machines(), **filters)
        except VastAIError as exc:
            raise vast_error(exc, "Searching vast.ai offers failed") from None


def offer_json(offer: dict) -> dict:
    gpu_ram = offer.get("gpu_ram") or 0
    return {
        "id": offer.get("id"),
        "gpu_name": offer.get("gpu_name") or "",
        "num_gpus": offer.get("num_gpus") or 1,
        "vram_gb": round(gpu_ram / 1024, 1) if gpu_ram else None,
        "dph": round(float(offer.get("dph_total") or 0), 4),
        "reliability": offer.get("reliability2", offer.get("reliability")),
        "location": offer.get("geolocation") or "",
        "inet_down": offer.get("inet_down"),
        "machine_id": offer.get("machine_id"),
        "verified": offer.get("verification") == "verified",
    }


# ---------------------------------------------------------------------- money


def spend_today(now=None) -> Decimal:
    """What vast.ai rentals have cost since midnight UTC: $/hour × time rented today (an instance the
    user rented in the console counts once they switch its auto_destroy on)."""
    now = now or timezone.now()
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    total = Decimal(0)
    rows = VastInstance.objects.under_spend_cap().filter(vast_id__isnull=False, created_at__lt=now).filter(
        Q(destroyed_at__isnull=True) | Q(destroyed_at__gt=start))
    for inst in rows:
        begin, end = max(inst.created_at, start), min(inst.destroyed_at or now, now)
        if end > begin:
            total += inst.dph_total * Decimal((end - begin).total_seconds()) / Decimal(3600)
    return total.quantize(Decimal("0.0001"))


def check_spend(config, dph, now=None):
    spent = spend_today(now)
    dph = Decimal(str(dph or 0))
    if spent + dph * SPEND_HORIZON_HOURS > config.max_daily_spend:
        raise ProvisioningError(
            f"Daily spend cap: ${spent:.2f} already spent on vast.ai today (UTC) of the ${config.max_daily_spend:.2f} "
            f"cap, and a new instance at ${dph:.3f}/h for an hour would pass it. Raise max_daily_spend "
            "(admin → GPU configuration) or wait until midnight UTC.",
            status=409,
        )

