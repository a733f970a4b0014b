"""The /api/gpu/* and /api/vastai/* routes."""

from typing import Literal, Optional

from django.conf import settings
from ninja import Router, Schema
from ninja.errors import HttpError
from pydantic import ConfigDict, field_validator

from gpu import domain
from gpu.models import GpuConfig, VastInstance
from gpu.netguard import BlockedURL
from gpu.urls_check import split_token, validate_service_url

router = Router(tags=["gpu"])


class ConfigOut(Schema):
    comfyui_url: Optional[str]
    comfyui_available: bool
    swarmui_url: Optional[str]
    swarmui_available: bool
    gpu_provider: str
    vastai_instance_id: Optional[int]


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


def config_out(config: GpuConfig) -> dict:
    from gpu.health import availability

    return {
        "comfyui_url": config.comfyui_url or None,
        "comfyui_available": availability(config.comfyui_url, "comfyui", config.comfyui_token),
        "swarmui_url": config.swarmui_url or None,
        "swarmui_available": availability(config.swarmui_url, "swarmui", config.comfyui_token),
        "gpu_provider": config.gpu_provider,
        "vastai_instance_id": config.vastai_instance_id,
    }


def _require_staff(request):
    if not request.auth.is_staff:
        raise HttpError(403, "Only staff can change the GPU configuration.")


@router.get("/gpu/config", response=ConfigOut, summary="Current GPU configuration")
def get_config(request):
    return config_out(GpuConfig.get())


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
    if changes.get("vastai_instance_id") is not None:
        if not VastInstance.objects.filter(vast_id=changes["vastai_instance_id"]).exists():
            raise HttpError(422, f"vastai_instance_id: no known vast.ai instance {changes['vastai_instance_id']}.")
    config = domain.update_config(changes, user=request.auth, source="api")
    return config_out(config)


class TestConnectionIn(Schema):
    model_config = ConfigDict(extra="forbid")

    url: str
    token: Optional[str] = None

    @field_validator("url")
    @classmethod
    def _url(cls, value):
        return validate_service_url(value)


class TestConnectionOut(Schema):
    url: str
    reachable: bool
    api_type: Optional[Literal["comfyui", "swarmui"]]
    details: dict


@router.post("/gpu/test-connection", response=TestConnectionOut, summary="Detect what answers at a URL")
def test_connection(request, payload: TestConnectionIn):
    from gpu.probe import probe

    config = GpuConfig.get()
    # The configured token goes only to the configured URL; another URL gets only the token sent with it.
    token = payload.token if payload.token is not None else (
        config.comfyui_token if payload.url in (config.comfyui_url, config.swarmui_url) else ""
    )
    result = probe(payload.url, token=token)
    details = dict(result["details"])
    details["message"] = result["message"]
    details["status"] = result["status"]
    return {"url": result["url"], "reachable": result["reachable"], "api_type": result["api_type"], "details": details}


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


@router.get("/gpu/health", response=HealthOut, summary="Health of the configured GPU servers")
def health(request):
    from gpu.health import health_report

    return health_report(GpuConfig.get())
