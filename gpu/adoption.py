"""Adopting a vast.ai instance the user rented in the vast.ai console.

The seed's "best results" path: rent a GPU by hand from vast.ai's ComfyUI template, copy the
Open URL, and tell i2v. Naming the instance (`vastai_instance_id`) makes i2v look it up
(`GET /instances/{id}/`) and keep a VastInstance row for it (origin `adopted`): its GPU,
$/hour, state and start time, so its cost accrues and it can be destroyed from i2v. An
adopted instance is never destroyed without consent: `auto_destroy` starts off, and the
reconciler leaves it alone. Adoption also reads what the instance runs (image, ports,
tokens) and says plainly what i2v can and cannot do with it.
"""

import logging
from datetime import datetime, timezone as dt_timezone
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from gpu import domain
from gpu.domain import ProvisioningError, vast_client
from gpu.models import GpuConfig, VastInstance
from gpu.tunnel import same_url, comfyui_tunnel, quick_tunnels
from gpu.vastai import DEAD_STATUSES, VastAIError, comfyui_url_of, portal_url_of

log = logging.getLogger(__name__)
St = VastInstance.State


class AdoptionError(Exception):
    """The instance cannot be adopted; str() says why and what to do. `status` is the HTTP code."""

    def __init__(self, message, *, status=422):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self):
        return self.message


def _env(info: dict) -> dict:
    """The instance's environment from its record (`extra_env` is a list of [name, value])."""
    raw = info.get("extra_env") or []
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    return {str(p[0]): str(p[1]) for p in raw if isinstance(p, (list, tuple)) and len(p) == 2}


def _truthy(value) -> bool:
    return str(value or "").strip().lower() not in ("", "0", "false", "no", "off")


def instance_token(info: dict) -> str:
    """The token vast.ai's Caddy accepts for this instance, as its record shows it: WEB_PASSWORD when
    the user set one, else the token vast.ai generated for the Open button (`jupyter_token`, when the
    template asks for one with OPEN_BUTTON_TOKEN)."""
    env = _env(info)
    if env.get("WEB_PASSWORD"):
        return env["WEB_PASSWORD"]
    if _truthy(env.get("OPEN_BUTTON_TOKEN")) and info.get("jupyter_token"):
        return str(info["jupyter_token"])
    return ""


def describe_template(info: dict, *, has_token: bool) -> dict:
    """What the instance runs and what that lets i2v do, in plain sentences (`can`, `cannot`)."""
    env = _env(info)
    ports = sorted(int(k.split("/")[0]) for k in (info.get("ports") or {}) if str(k).split("/")[0].isdigit())
    image = str(info.get("image_uuid") or "")
    https = str(env.get("ENABLE_HTTPS", "")).lower() == "true"
    auth_off = str(env.get("ENABLE_AUTH", "")).lower() == "false"
    web_password = bool(env.get("WEB_PASSWORD"))
    open_button = _truthy(env.get("OPEN_BUTTON_TOKEN")) and bool(info.get("jupyter_token"))
    portal = 1111 in ports
    direct = comfyui_url_of(info)
    can, cannot = [f"i2v shows its cost (${float(info.get('dph_total') or 0):.3f}/hour) and can destroy it."], []
    if image and "comfy" not in image.lower():
        cannot.append(f"{image} is not vast.ai's ComfyUI image: i2v cannot tell what it serves; Test connection "
                      "shows whether ComfyUI answers.")
    if web_password:
        can.append("i2v authenticates with the instance's WEB_PASSWORD (read from its record).")
    elif open_button:
        can.append("i2v authenticates with the token vast.ai generated for the Open button (OPEN_BUTTON_TOKEN).")
    elif auth_off:
        can.append("i2v needs no token: ENABLE_AUTH=false.")
    elif not has_token:
        cannot.append("Neither WEB_PASSWORD nor OPEN_BUTTON_TOKEN is set: i2v cannot read the instance's token; "
                      "paste the Open URL with its ?token= as the ComfyUI URL.")
    if not ports:
        cannot.append("The instance is not running: i2v cannot see its ports yet; name it again once it runs.")
    elif 8188 not in ports:
        cannot.append("Port 8188 is not mapped: i2v cannot reach ComfyUI directly; it uses the URL you paste.")
    elif https:
        cannot.append("ENABLE_HTTPS serves the direct port with vast.ai's self-signed certificate: i2v cannot use "
                      "it and uses the tunnel.")
    elif direct:
        can.append(f"i2v can reach ComfyUI directly at {direct} (plain HTTP) when the tunnel is down.")
    if ports and not portal:
        cannot.append("No portal on 1111: i2v cannot follow the tunnel; paste the URL when it changes.")
    elif ports and (has_token or auth_off):
        can.append("i2v follows the tunnel: when its URL changes, it reads the new one from the portal on 1111.")
    elif ports:
        cannot.append("The portal on 1111 needs a token i2v does not have: i2v cannot follow the tunnel; paste the "
                          "URL when it changes.")
    can.append("i2v destroys it when idle, and counts it in the daily spend cap, only once you switch "
               "auto-destroy on.")
    return {"image": image, "ports": ports, "web_password": web_password, "open_button_token": open_button,
            "portal": portal, "https": https, "can": can, "cannot": cannot}


def _started(info: dict):
    start = info.get("start_date")
    try:
        return datetime.fromtimestamp(float(start), tz=dt_timezone.utc) if start else timezone.now()
    except (TypeError, ValueError, OverflowError):
        return timezone.now()


def _look_up(vast_id: int) -> dict:
    if not settings.VASTAI_API_KEY:
        raise AdoptionError(f"vastai_instance_id: i2v knows no vast.ai instance {vast_id} and cannot look it up on "
                            "vast.ai: set VASTAI_API_KEY (an API key from https://cloud.vast.ai/manage-keys/) and restart "
                            "the server and the worker.")
    try:
        with vast_client() as client:
            info = client.show_instance(vast_id)
            if info is not None and not info.get("ports") and info.get("actual_status") == "running":
                # The by-id answer may lack the port mappings; the legacy list carries them.
                info = next((i for i in client.list_instances() if i.get("id") == vast_id), info)
    except ProvisioningError as exc:
        raise AdoptionError(f"vastai_instance_id: cannot look up vast.ai instance {vast_id}: {exc}", status=503) from None
    except VastAIError as exc:
        status = 503 if exc.kind in ("unreachable", "timeout", "rate_limited", "http", "bad_response", "auth") else 422
        raise AdoptionError(f"vastai_instance_id: cannot look up vast.ai instance {vast_id}: {exc}", status=status) from None
    if info is None:
        raise AdoptionError(f"vastai_instance_id: vast.ai has no instance {vast_id} on this account (check the id in "
                            "the console's Instances page; a destroyed instance is gone).")
    return info


def _tie(info: dict, url: str, token: str) -> tuple[str, str]:
    """(comfyui_url to tie to the instance or "", a sentence when `url` is not the instance's)."""
    if not url:
        return "", ""
    direct = comfyui_url_of(info)
    if same_url(url, direct or ""):
        return url, ""
    portal = portal_url_of(info)
    tunnels = quick_tunnels(portal, token) if portal and token else None
    if tunnels is None or same_url(url, comfyui_tunnel(tunnels) or ""):
        # Its tunnel, or the portal cannot say: the user named both together, so take their word.
        return url, ""
    return "", (f"The configured ComfyUI URL {url} is neither its direct port nor its tunnel: jobs there do not "
                "count as its busy time.")


def adopt(vast_id: int, *, comfyui_url: str = "", token: str = "", user=None) -> VastInstance:
    """The VastInstance for vast.ai instance `vast_id` on the account, adopting it when i2v does not
    track it yet. `comfyui_url` (the configured URL) is tied to it when it is the instance's direct
    port or tunnel; `token` is the one configured with that URL. Raises AdoptionError."""
    existing = VastInstance.objects.filter(vast_id=vast_id).first()
    live = existing is not None and existing.state != St.DESTROYED and not (existing.state == St.FAILED and existing.destroyed_at)
    if live and not (existing.origin == VastInstance.Origin.ADOPTED and not existing.template.get("ports")):
        if existing.origin == VastInstance.Origin.ADOPTED and comfyui_url and not same_url(existing.comfyui_url, comfyui_url):
            retie(existing, comfyui_url)
            existing.refresh_from_db()
        return existing
    info = _look_up(vast_id)
    own_token = instance_token(info)
    use_token = own_token or token
    actual = str(info.get("actual_status") or "")
    if actual in DEAD_STATUSES:
        raise AdoptionError(f"vastai_instance_id: vast.ai instance {vast_id} is {actual} and will not run again; "
                            "rent another one.", status=409)
    template = describe_template(info, has_token=bool(use_token))
    tied, note = _tie(info, comfyui_url, use_token)
    if note:
        template["cannot"].insert(0, note)
    now = timezone.now()
    running = actual == "running"
    fields = {
        "vast_id": vast_id,
        "origin": VastInstance.Origin.ADOPTED,
        "auto_destroy": False,
        "created_by": user if user is not None and getattr(user, "is_authenticated", False) else None,
        "machine_id": info.get("machine_id") if isinstance(info.get("machine_id"), int) else None,
        "gpu_name": str(info.get("gpu_name") or "")[:100],
        "num_gpus": int(info.get("num_gpus") or 1),
        "gpu_ram_mb": info.get("gpu_ram") if isinstance(info.get("gpu_ram"), int) else None,
        "dph_total": Decimal(str(round(float(info.get("dph_total") or 0), 4))),
        "state": St.RUNNING if running else St.LOADING,
        "actual_status": actual[:20],
        "status_msg": str(info.get("status_msg") or "")[:500],
        "checked_at": now,
        "created_at": _started(info),
        "state_changed_at": now,
        "ready_at": now if running else None,
        "comfyui_url": tied,
        "portal_url": portal_url_of(info) or "",
        "web_password": use_token,
        "template": template,
        "destroy_reason": "",
    }
    try:
        with transaction.atomic():
            if existing is not None:
                # Named again once it runs (its ports are known now), or known from an adoption that ended.
                if live:
                    fields.update(created_at=existing.created_at, auto_destroy=existing.auto_destroy)
                    fields["comfyui_url"] = fields["comfyui_url"] or existing.comfyui_url
                VastInstance.objects.filter(pk=existing.pk).update(destroyed_at=None, error="", **fields)
                instance = VastInstance.objects.get(pk=existing.pk)
            else:
                instance = VastInstance.objects.create(**fields)
    except IntegrityError:
        return VastInstance.objects.get(vast_id=vast_id)  # adopted by a concurrent request
    log.info("adopted vast.ai instance %s (%s, $%s/h)", vast_id, instance.gpu_name, instance.dph_total)
    return instance


def configure(changes: dict, *, user=None, source: str = "api") -> GpuConfig:
    """Apply GpuConfig `changes` (recorded), adopting the instance `vastai_instance_id` names when i2v
    does not track it yet: any instance on the account may be named. Raises AdoptionError."""
    config = GpuConfig.get()
    vast_id = changes.get("vastai_instance_id")
    if vast_id is not None:
        adopt(vast_id, comfyui_url=changes.get("comfyui_url", config.comfyui_url),
              token=changes.get("comfyui_token", config.comfyui_token), user=user)
        if config.gpu_provider == GpuConfig.Provider.NONE and "gpu_provider" not in changes:
            changes["gpu_provider"] = GpuConfig.Provider.VASTAI
    elif changes.get("comfyui_url"):
        instance = configured_instance(config)
        if instance is not None and instance.origin == VastInstance.Origin.ADOPTED:
            retie(instance, changes["comfyui_url"])
    return domain.update_config(changes, user=user, source=source)


def retie(instance: VastInstance, url: str) -> None:
    """The configuration's ComfyUI URL changed while it names this adopted instance: tie the new URL."""
    VastInstance.objects.filter(pk=instance.pk).update(comfyui_url=url)


def set_auto_destroy(instance: VastInstance, on: bool) -> VastInstance:
    """Switch the idle reaper and the daily spend cap on or off for one instance."""
    VastInstance.objects.filter(pk=instance.pk).update(auto_destroy=on)
    instance.auto_destroy = on
    return instance


def configured_instance(config: GpuConfig | None = None) -> VastInstance | None:
    config = config or GpuConfig.get()
    if not config.vastai_instance_id:
        return None
    return VastInstance.objects.filter(vast_id=config.vastai_instance_id).first()
