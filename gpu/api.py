"""The /api/gpu/* and /api/vastai/* routes."""

import uuid
from datetime import datetime
from typing import Literal, Optional

from django.conf import settings
from ninja import Field, Query, Router, Schema
from ninja.errors import HttpError
from ninja.responses import Status
from pydantic import ConfigDict, field_validator

from gpu import adoption, domain
from gpu.models import GpuConfig, VastInstance
from gpu.netguard import BlockedURL
from gpu.urls_check import split_token, validate_service_url
from i2v.core.throttles import probe_rate

router = Router(tags=["gpu"])
# test-connection and health share one budget: both probe the network from the server.
PROBE_RATE = probe_rate()


class Detail(Schema):
    detail: str


class AdoptedOut(Schema):
    """The configured vast.ai instance, and what i2v can and cannot do with it."""

    id: str
    vast_id: Optional[int]
    origin: str
    state: str
    gpu_name: str
    dph: float
    cost_usd: float
    auto_destroy: bool
    comfyui_url: Optional[str]
    image: Optional[str]
    can: list[str]
    cannot: list[str]


class ConfigOut(Schema):
    comfyui_url: Optional[str]
    comfyui_available: bool
    swarmui_url: Optional[str]
    swarmui_available: bool
    gpu_provider: str
    vastai_instance_id: Optional[int]
    vastai_instance: Optional[AdoptedOut] = None


class ConfigIn(Schema):
    model_config = ConfigDict(extra="forbid")

    comfyui_url: Optional[str] = None
    swarmui_url: Optional[str] = None
    gpu_provider: Optional[Literal["none", "local", "vastai"]] = None
    vastai_instance_id: Optional[int] = None
    comfyui_token: Optional[str] = None

    @field_validator("comfyui_url", "swarmui_url")
    @classmethod
    def _url(cls, value):
        if value in (None, ""):
            return value
        return validate_service_url(value)

    @field_validator("comfyui_token")
    @classmethod
    def _token(cls, value):
        if value is not None and (len(value) > 500 or any(c in value for c in "\r\n\x00")):
            raise ValueError("must be at most 500 characters, on one line")
        return value


def adopted_json(instance: VastInstance) -> dict:
    template = instance.template or {}
    live = instance.state in VastInstance.LIVE + (VastInstance.State.DESTROYING,)
    return {
        "id": str(instance.id),
        "vast_id": instance.vast_id,
        "origin": instance.origin,
        "state": instance.state,
        "gpu_name": instance.gpu_name,
        "dph": float(instance.dph_total),
        "cost_usd": float(instance.accrued_cost() if live else instance.cost_usd),
        "auto_destroy": instance.auto_destroy,
        "comfyui_url": instance.comfyui_url or None,
        "image": template.get("image") or None,
        "can": list(template.get("can") or []),
        "cannot": list(template.get("cannot") or []),
    }


def config_out(config: GpuConfig) -> dict:
    from gpu.adoption import configured_instance
    from gpu.health import availability
    from gpu.tunnel import configured_token

    instance = configured_instance(config)
    return {
        "vastai_instance": adopted_json(instance) if instance is not None else None,
        "comfyui_url": config.comfyui_url or None,
        "comfyui_available": availability(config.comfyui_url, "comfyui", configured_token(config)),
        "swarmui_url": config.swarmui_url or None,
        "swarmui_available": availability(config.swarmui_url, "swarmui", config.comfyui_token),
        "gpu_provider": config.gpu_provider,
        "vastai_instance_id": config.vastai_instance_id,
    }


def _require_staff(request):
    if not request.auth.is_staff:
        raise HttpError(403, "Only staff can change the GPU configuration.")


@router.get("/gpu/config", response=ConfigOut, summary="Current GPU configuration (the URLs for staff only)")
def get_config(request):
    out = config_out(GpuConfig.get())
    if not request.auth.is_staff:
        out.update(comfyui_url=None, swarmui_url=None)
    return out


@router.post("/gpu/config", response=ConfigOut, summary="Change the GPU configuration")
def post_config(request, payload: ConfigIn):
    _require_staff(request)
    changes = payload.model_dump(exclude_unset=True)
    for key in ("comfyui_url", "swarmui_url"):
        if changes.get(key):
            changes[key], token = split_token(changes[key])
            if token and not changes.get("comfyui_token"):
                changes["comfyui_token"] = token
    for key in ("comfyui_url", "swarmui_url", "comfyui_token"):
        if key in changes and changes[key] is None:
            changes[key] = ""
    if "gpu_provider" in changes and changes["gpu_provider"] is None:
        # An explicit null means "leave it as it is" (the column has no empty value; it was a 500).
        del changes["gpu_provider"]
    try:
        config = adoption.configure(changes, user=request.auth, source="api")
    except adoption.AdoptionError as exc:
        raise HttpError(exc.status, exc.message) from None
    return config_out(config)


class TestConnectionIn(Schema):
    model_config = ConfigDict(extra="forbid")

    url: Optional[str] = Field(default=None, description="Left out: the configured ComfyUI (or SwarmUI) URL. "
                               "Another URL is for staff only.")
    token: Optional[str] = None

    @field_validator("url")
    @classmethod
    def _url(cls, value):
        return validate_service_url(value) if value else None


class TestConnectionOut(Schema):
    url: str
    reachable: bool
    api_type: Optional[Literal["comfyui", "swarmui"]]
    details: dict


@router.post("/gpu/test-connection", response={200: TestConnectionOut, 403: Detail, 422: Detail, 429: Detail},
             throttle=[PROBE_RATE], summary="Detect what answers at a URL")
def test_connection(request, payload: TestConnectionIn):
    from gpu.probe import probe

    config = GpuConfig.get()
    if not payload.url:
        payload.url = config.comfyui_url or config.swarmui_url
        if not payload.url:
            raise HttpError(422, "url: no GPU URL is configured; send the URL to test.")
    if not domain.may_probe(request.auth, payload.url, config):
        raise HttpError(403, domain.PROBE_STAFF_ONLY)
    # The configured token goes only to the configured URL; another URL gets only the token sent with it.
    token = payload.token if payload.token is not None else (
        config.comfyui_token if payload.url in (config.comfyui_url, config.swarmui_url) else ""
    )
    result = probe(payload.url, token=token)
    details = dict(result["details"])
    details["message"] = result["message"]
    details["status"] = result["status"]
    url = result["url"]
    if not request.auth.is_staff:
        url = "(configured)"
    return {"url": url, "reachable": result["reachable"], "api_type": result["api_type"], "details": details}


class HealthOut(Schema):
    provider: str
    comfyui_status: str
    comfyui_url: Optional[str]
    swarmui_status: str
    swarmui_url: Optional[str]
    models_available: list[str]
    models_missing: list[str]
    workflow: Optional[str]
    details: dict


@router.get("/gpu/health", response={200: HealthOut, 429: Detail}, throttle=[PROBE_RATE],
            summary="Health of the configured GPU servers (their URLs for staff only)")
def health(request):
    from gpu.health import health_report

    report = health_report(GpuConfig.get())
    if not request.auth.is_staff:
        report.update(comfyui_url=None, swarmui_url=None, details={})
    return report


# ---------------------------------------------------------------------- vast.ai offers and instances


class OfferOut(Schema):
    id: int
    gpu_name: str
    num_gpus: int
    vram_gb: Optional[float]
    dph: float
    reliability: Optional[float]
    location: str
    inet_down: Optional[float]
    machine_id: Optional[int]
    verified: bool


class InstanceOut(Schema):
    id: str
    vast_id: Optional[int]
    label: str
    state: str
    actual_status: Optional[str]
    status_msg: Optional[str]
    error: Optional[str]
    offer_id: Optional[int]
    machine_id: Optional[int]
    gpu_name: str
    num_gpus: int
    vram_gb: Optional[float]
    dph: float
    cost_usd: float
    comfyui_url: Optional[str]
    origin: str
    auto_destroy: bool
    can: list[str] = []
    cannot: list[str] = []
    active_jobs: int
    created_at: datetime
    ready_at: Optional[datetime]
    last_busy_at: Optional[datetime]
    destroyed_at: Optional[datetime]
    destroy_reason: Optional[str]


class InstanceList(Schema):
    items: list[InstanceOut]
    count: int
    spend_today_usd: float
    max_daily_spend_usd: float


class CreateInstanceIn(Schema):
    model_config = ConfigDict(extra="forbid")

    offer_id: Optional[int] = Field(default=None, gt=0)


class VastError(Schema):
    detail: str


def _provisioning_error(exc) -> HttpError:
    return HttpError(exc.status, exc.message)


def _require_staff_for(request, what):
    if not request.auth.is_staff:
        raise HttpError(403, f"Only staff can {what}.")


@router.get("/vastai/offers", response={200: list[OfferOut], 422: VastError, 503: VastError},
            summary="Cheapest vast.ai offers matching the GPU policy")
def vastai_offers(request, limit: int = 10, min_vram_gb: Optional[float] = None, max_dph: Optional[float] = None,
                  gpu_names: Optional[str] = None):
    from gpu import offers as vast_offers
    from gpu.lifecycle import ProvisioningError

    if not 1 <= limit <= 50:
        raise HttpError(422, "limit: must be between 1 and 50")
    if min_vram_gb is not None and not 0 < min_vram_gb <= 1024:
        raise HttpError(422, "min_vram_gb: must be between 0 and 1024")
    if max_dph is not None and not 0 < max_dph <= 128:
        raise HttpError(422, "max_dph: must be between 0 and 128 $/hour")
    names = [n.strip() for n in gpu_names.split(",") if n.strip()] if gpu_names else None
    try:
        offers = vast_offers.search_offers(limit=limit, min_vram_gb=min_vram_gb, max_dph=max_dph, gpu_names=names)
    except ProvisioningError as exc:
        raise _provisioning_error(exc) from None
    return [vast_offers.offer_json(o) for o in offers]


@router.get("/vastai/instances", response=InstanceList, summary="vast.ai instances (live ones; ?all=true for history)")
def vastai_instances(request, show_all: bool = Query(False, alias="all")):
    from gpu import lifecycle, offers

    qs = VastInstance.objects.order_by("-created_at")
    if not show_all:
        qs = qs.exclude(state=VastInstance.State.DESTROYED).exclude(state=VastInstance.State.FAILED, destroyed_at__isnull=False)
    rows = list(qs[:200])
    config = GpuConfig.get()
    return {"items": [lifecycle.instance_json(i) for i in rows], "count": len(rows),
            "spend_today_usd": float(offers.spend_today()), "max_daily_spend_usd": float(config.max_daily_spend)}


@router.post("/vastai/instances", response={202: InstanceOut, 403: VastError, 409: VastError, 422: VastError, 503: VastError},
             summary="Rent a vast.ai GPU (the given offer, else the cheapest matching one)")
def vastai_create_instance(request, payload: CreateInstanceIn = None):
    from gpu import lifecycle

    _require_staff_for(request, "rent vast.ai instances")
    offer_id = payload.offer_id if payload is not None else None
    try:
        instance = lifecycle.create_instance(offer_id=offer_id, user=request.auth)
    except lifecycle.ProvisioningError as exc:
        raise _provisioning_error(exc) from None
    return Status(202, lifecycle.instance_json(instance))


def _instance_by_public_id(value: str) -> VastInstance:
    value = value.strip()
    try:
        lookup = {"vast_id": int(value)} if value.isdigit() else {"pk": uuid.UUID(value)}
    except ValueError:
        raise HttpError(404, "No such instance: use its id (a UUID) or its vast.ai id.") from None
    instance = VastInstance.objects.filter(**lookup).first()
    if instance is None:
        raise HttpError(404, "No such instance.")
    return instance


@router.get("/vastai/instances/{instance_id}", response={200: InstanceOut, 404: VastError}, summary="One vast.ai instance")
def vastai_instance(request, instance_id: str):
    from gpu import lifecycle

    return lifecycle.instance_json(_instance_by_public_id(instance_id))


@router.delete("/vastai/instances/{instance_id}", response={200: InstanceOut, 403: VastError, 404: VastError, 409: VastError,
                                                            503: VastError},
               summary="Destroy a vast.ai instance (billing stops)")
def vastai_destroy_instance(request, instance_id: str):
    from gpu import lifecycle

    _require_staff_for(request, "destroy vast.ai instances")
    instance = _instance_by_public_id(instance_id)
    try:
        instance = lifecycle.destroy_instance(instance, f"destroyed by {request.auth.get_username()} through the API")
    except lifecycle.ProvisioningError as exc:
        raise _provisioning_error(exc) from None
    return lifecycle.instance_json(instance)


class InstancePatchIn(Schema):
    model_config = ConfigDict(extra="forbid")

    auto_destroy: bool


@router.patch("/vastai/instances/{instance_id}", response={200: InstanceOut, 403: VastError, 404: VastError},
              summary="Switch auto-destroy (the idle reaper and the daily spend cap) for one instance")
def vastai_patch_instance(request, instance_id: str, payload: InstancePatchIn):
    from gpu import lifecycle

    _require_staff_for(request, "change vast.ai instances")
    instance = adoption.set_auto_destroy(_instance_by_public_id(instance_id), payload.auto_destroy)
    return lifecycle.instance_json(instance)
