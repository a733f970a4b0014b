"""Live availability and health of the configured GPU servers (cached a few seconds)."""

from django.core.cache import cache

from gpu import capacity

AVAILABILITY_TTL = 5


def availability(url: str, api_type: str, token: str = "") -> bool:
    if not url:
        return False
    key = f"gpu-avail:{api_type}:{url}"
    cached = cache.get(key)
    if cached is not None:
        return cached
    from gpu.probe import probe

    result = probe(url, token=token, timeout=3.0)
    ok = bool(result["reachable"] and result["api_type"] == api_type and result["ready"])
    cache.set(key, ok, AVAILABILITY_TTL)
    return ok


def _status(result) -> str:
    if result["ready"]:
        return "available (API ready)"
    if result["status"] in ("not ready", "authentication failed"):
        return result["status"]
    return f"unavailable: {result['message']}"


def model_check(url, token, workflow_slug) -> tuple[list[str], list[str]]:
    """(present, missing) model files of the workflow on the ComfyUI at `url`."""
    from gpu.comfyui import ComfyUIClient, ComfyUIError

    wanted = capacity.workflow_models(workflow_slug)
    present, missing, listings = [], [], {}
    client = ComfyUIClient(url, token=token or None, connect_timeout=3.0, read_timeout=5.0, retries=0)
    try:
        for folder, filename in wanted:
            if folder not in listings:
                try:
                    listings[folder] = client.models(folder) or []
                except ComfyUIError:
                    listings[folder] = []
            (present if filename in listings[folder] else missing).append(f"{folder}/{filename}")
    finally:
        client.close()
    return present, missing


def health_report(config) -> dict:
    from gpu.probe import gpu_label, probe
    from gpu.tunnel import configured_token

    report = {
        "provider": config.gpu_provider,
        "comfyui_status": "not configured",
        "comfyui_url": config.comfyui_url or None,
        "swarmui_status": "not configured",
        "swarmui_url": config.swarmui_url or None,
        "models_available": [],
        "models_missing": [],
        "workflow": config.default_workflow or None,
        "details": {},
    }
    if config.comfyui_url:
        token = configured_token(config)
        result = probe(config.comfyui_url, token=token)
        report["comfyui_status"] = _status(result)
        report["details"]["comfyui"] = result["details"]
        for dev in result["details"].get("devices", []):
            report["models_available"].append(f"GPU: {gpu_label(dev['name'])}")
        if result["ready"]:
            present, missing = model_check(config.comfyui_url, token, config.default_workflow)
            report["models_available"] += present
            report["models_missing"] = missing
    if config.swarmui_url:
        result = probe(config.swarmui_url, token=config.comfyui_token)
        report["swarmui_status"] = _status(result)
        report["details"]["swarmui"] = result["details"]
    return report
