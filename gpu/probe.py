"""Tell what answers at a URL: ComfyUI, SwarmUI, vast.ai's placeholder, or nothing, and why."""

import httpx

from gpu import netguard
from gpu.comfyui import ComfyUIClient, ComfyUIError
from gpu.urls_check import validate_service_url

NOT_READY = "Instance not ready: ComfyUI is still starting (2-5 min)"
AUTH_FAILED = "Failed to authenticate: the tunnel URL may have expired or the token is wrong"


def _shown(url):
    """The URL as answers show it: without a `?token=` (a secret must not be echoed back)."""
    from gpu.urls_check import split_token

    try:
        return split_token(url)[0] if isinstance(url, str) else url
    except ValueError:
        return url


def _result(url, *, reachable, api_type=None, ready=False, message="", status="", details=None):
    return {
        "url": _shown(url),
        "reachable": reachable,
        "api_type": api_type,
        "ready": ready,
        "status": status,
        "message": message,
        "details": details or {},
    }


def comfyui_details(stats: dict, queue=None) -> dict:
    system = stats.get("system") or {}
    devices = []
    for dev in stats.get("devices") or []:
        devices.append(
            {
                "name": dev.get("name"),
                "type": dev.get("type"),
                "vram_total_gb": round((dev.get("vram_total") or 0) / 1024**3, 1),
                "vram_free_gb": round((dev.get("vram_free") or 0) / 1024**3, 1),
            }
        )
    details = {
        "comfyui_version": system.get("comfyui_version"),
        "python_version": (system.get("python_version") or "").split(" ")[0] or None,
        "pytorch_version": system.get("pytorch_version"),
        "devices": devices,
    }
    if queue is not None:
        running, pending = queue
        details["queue_running"] = len(running)
        details["queue_pending"] = len(pending)
    return details


def gpu_label(device_name: str) -> str:
    """'cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync' → 'NVIDIA GeForce RTX 5090'."""
    name = device_name or ""
    if " : " in name:
        name = name.split(" : ", 1)[0]
    head, _, rest = name.partition(" ")
    if head.startswith("cuda:") and rest:
        name = rest
    return name.strip()


def _probe_swarmui(url, token, timeout):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with netguard.http_client(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), headers=headers) as http:
        resp = http.post(f"{url}/API/GetNewSession", json={}, follow_redirects=False)
        if resp.status_code != 200:
            return None
        try:
            body = resp.json()
        except ValueError:
            return None
        if not isinstance(body, dict) or "session_id" not in body:
            return None
        return {"swarmui_version": body.get("version"), "user_id": body.get("user_id")}


def probe(url: str, *, token: str = "", timeout: float = 5.0) -> dict:
    """Detect the API at `url`. Never raises; every failure mode has its own message."""
    try:
        url = validate_service_url(url)
        netguard.check_url(url)
    except (ValueError, netguard.BlockedURL) as exc:
        return _result(url, reachable=False, status="unavailable", message=str(exc))

    # Follow redirects (an http → https proxy is common); every hop passes the SSRF guard.
    http = netguard.http_client(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), follow_redirects=True,
                                max_redirects=5)
    client = ComfyUIClient(url, token=token or None, connect_timeout=min(timeout, 5.0), read_timeout=timeout,
                           retries=0, http_client=http)
    try:
        try:
            stats = client.system_stats()
            if isinstance(stats, dict) and (stats.get("system") or {}).get("comfyui_version"):
                try:
                    queue = client.queue()
                except ComfyUIError:
                    queue = None
                return _result(
                    url, reachable=True, api_type="comfyui", ready=True, status="available",
                    message="ComfyUI API ready", details=comfyui_details(stats, queue),
                )
        except ComfyUIError as exc:
            if exc.kind == "not_ready":
                return _result(url, reachable=True, status="not ready", message=NOT_READY)
            if exc.kind == "auth":
                return _result(url, reachable=True, status="authentication failed", message=AUTH_FAILED)
            if exc.kind in ("unreachable", "timeout", "blocked"):
                return _result(url, reachable=False, status="unavailable", message=str(exc))
            # Something answered, but not ComfyUI: maybe SwarmUI.
        try:
            swarm = _probe_swarmui(url, token, timeout)
        except httpx.HTTPError as exc:
            reason = netguard.blocked_reason(exc)
            message = "The server answered, but not as ComfyUI or SwarmUI"
            return _result(url, reachable=True, status="unavailable", message=f"{message} ({reason})." if reason else f"{message}.")
        if swarm:
            return _result(url, reachable=True, api_type="swarmui", ready=True, status="available",
                           message="SwarmUI API ready", details=swarm)
        return _result(
            url, reachable=True, status="unavailable",
            message="The server answered, but it is neither ComfyUI (no /system_stats) nor SwarmUI (no /API/GetNewSession). Check the URL and port.",
        )
    finally:
        client.close()
        http.close()
