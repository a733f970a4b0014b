"""Following a vast.ai instance's Cloudflare quick tunnel when its URL changes.

A quick tunnel (`https://four-random-words.trycloudflare.com`, behind the console's Open
button) is "ephemeral, rate-limited, and lost on restart" (vast.ai base-image docs): when
cloudflared restarts, the old URL answers Cloudflare's 530 / error 1033 or nothing at all,
and the instance's portal (port 1111) lists the new one at `/get-all-quick-tunnels`. The job
runner calls `follow_tunnel(url)` when ComfyUI stops answering at `url`; it returns the URL
where the same ComfyUI answers now, having switched the configuration to it, or None.
"""

import logging
from datetime import timedelta

import httpx
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from gpu import domain, netguard
from gpu.comfyui import ComfyUIClient, ComfyUIError
from gpu.domain import ProvisioningError, vast_client
from gpu.models import GpuConfig, VastInstance
from gpu.vastai import VastAIError, comfyui_url_of, portal_url_of

log = logging.getLogger(__name__)

# One look at the portal per instance this often, however many jobs find the URL dead at once.
FOLLOW_EVERY = timedelta(seconds=10)
# Short timeouts: the runner asks from inside a job's slice, which must end well before the task timeout.
PORTAL_TIMEOUT = httpx.Timeout(5.0, connect=3.0)
COMFYUI_PORT_SUFFIX = ":8188"


def same_url(a: str, b: str) -> bool:
    return (a or "").rstrip("/") == (b or "").rstrip("/")


def instance_for_url(url: str, config: GpuConfig | None = None, live: list[VastInstance] | None = None
                     ) -> VastInstance | None:
    """The live instance whose ComfyUI is at `url` (its direct port or its tunnel), if any.
    `config`, `live`: the GPU configuration and the live instances when the caller has just read them."""
    if not url:
        return None
    url = url.rstrip("/")
    if live is None:
        live = VastInstance.objects.live_list()
    found = max((i for i in live if i.comfyui_url in (url, url + "/")), key=lambda i: i.created_at, default=None)
    if found is not None:
        return found
    config = config or GpuConfig.get()
    if config.vastai_instance_id and same_url(config.comfyui_url, url):
        return next((i for i in live if i.vast_id == config.vastai_instance_id), None)
    return None


def token_for(instance: VastInstance) -> str:
    """The token vast.ai's Caddy accepts on every port of the instance: its WEB_PASSWORD (or the
    Open button's token) as recorded on the row, else the one configured with the URL."""
    return instance.web_password or GpuConfig.get().comfyui_token


def configured_token(config: GpuConfig) -> str:
    """The token for the configured ComfyUI URL: the one configured with it, else (the URL being a
    vast.ai instance's) the instance's own."""
    if config.comfyui_token or not config.comfyui_url:
        return config.comfyui_token
    instance = instance_for_url(config.comfyui_url, config)
    return instance.web_password if instance is not None else ""


def quick_tunnels(portal_url: str, token: str) -> list[dict] | None:
    """The portal's `/get-all-quick-tunnels` list ({"targetUrl", "tunnelUrl"}), or None when it
    cannot be read (no portal, refused, wrong token)."""
    try:
        with netguard.http_client(timeout=PORTAL_TIMEOUT, follow_redirects=False) as http:
            resp = http.get(f"{portal_url.rstrip('/')}/get-all-quick-tunnels", headers={"Authorization": f"Bearer {token}"})
        body = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, netguard.BlockedURL):
        return None
    if not isinstance(body, list):
        return None
    return [e for e in body if isinstance(e, dict)]


def comfyui_tunnel(tunnels: list[dict] | None) -> str | None:
    """The tunnel URL pointing at ComfyUI's edge (port 8188) in a portal's list."""
    for entry in tunnels or []:
        if str(entry.get("targetUrl", "")).rstrip("/").endswith(COMFYUI_PORT_SUFFIX):
            url = str(entry.get("tunnelUrl") or "").rstrip("/")
            if url.startswith(("https://", "http://")):
                return url
    return None


def comfyui_answers(url: str, token: str) -> bool:
    try:
        with ComfyUIClient(url, token=token or None, connect_timeout=3.0, read_timeout=5.0, retries=0) as comfy:
            comfy.system_stats()
    except ComfyUIError:
        return False
    return True


def _where_now(instance: VastInstance) -> tuple[str | None, str | None]:
    """(portal URL, direct ComfyUI URL) of the instance as vast.ai reports it now (the public port
    changes when the instance restarts); (None, None) when vast.ai cannot tell."""
    try:
        with vast_client(retries=0) as client:
            info = client.show_instance(instance.vast_id)
            if info is not None and not info.get("ports"):
                # The by-id answer may lack the port mappings; the list carries them.
                info = next((i for i in client.list_instances() if i.get("id") == instance.vast_id), info)
    except (VastAIError, ProvisioningError) as exc:
        log.info("instance %s: cannot ask vast.ai where it is now: %s", instance.vast_id, exc)
        return None, None
    if info is None:
        return None, None
    return portal_url_of(info), comfyui_url_of(info)


def _candidates(instance: VastInstance, token: str) -> list[str]:
    """Where the instance's ComfyUI may be now: the portal's current quick tunnel first (what the
    user configured, HTTPS), then the direct port (plain HTTP) unless the template serves it with a
    self-signed certificate."""
    portal = instance.portal_url
    tunnels = quick_tunnels(portal, token) if portal else None
    direct = None
    if tunnels is None and instance.vast_id:
        portal, direct = _where_now(instance)
        if portal and portal != instance.portal_url:
            VastInstance.objects.filter(pk=instance.pk).update(portal_url=portal)
        tunnels = quick_tunnels(portal, token) if portal else None
    found = [comfyui_tunnel(tunnels)]
    if not (instance.template or {}).get("https"):
        found.append(direct)
    return [u for u in dict.fromkeys(found) if u]


def follow_tunnel(url: str) -> str | None:
    """ComfyUI stopped answering at `url`: if it is a vast.ai instance's and the instance's portal
    names another URL (its current quick tunnel, or its direct port) where ComfyUI answers, switch to
    it and return it; else None.

    The switch moves the instance's comfyui_url and, when the configuration uses `url`, GpuConfig's
    comfyui_url (recorded in the config history, source "tunnel"). At most one look per instance
    per FOLLOW_EVERY, so many jobs finding the URL dead at once cost the portal one request."""
    instance = instance_for_url(url)
    if instance is None:
        return None
    now = timezone.now()
    claimed = VastInstance.objects.filter(pk=instance.pk).filter(
        Q(tunnel_checked_at__isnull=True) | Q(tunnel_checked_at__lt=now - FOLLOW_EVERY)).update(tunnel_checked_at=now)
    if not claimed:
        return None
    token = token_for(instance)
    for candidate in _candidates(instance, token):
        if same_url(candidate, url) or not comfyui_answers(candidate, token):
            continue
        switch_url(instance, url, candidate)
        return candidate
    return None


@transaction.atomic
def switch_url(instance: VastInstance, old: str, new: str) -> None:
    """Point the instance, and the configuration if it used `old`, at `new` (recorded)."""
    VastInstance.objects.filter(pk=instance.pk).update(
        comfyui_url=new, status_msg=f"The tunnel URL changed; i2v switched to {new}"[:500])
    config = GpuConfig.objects.select_for_update().get(pk=GpuConfig.get().pk)
    if same_url(config.comfyui_url, old):
        domain.update_config({"comfyui_url": new}, source="tunnel")
    log.warning("vast.ai instance %s: ComfyUI moved from %s to %s; switched", instance.vast_id, old, new)
