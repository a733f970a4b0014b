"""Live availability of the configured GPU servers, cached for a few seconds."""

from django.core.cache import cache

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
    ok = bool(result["reachable"] and result["api_type"] == api_type and result.get("ready", True))
    cache.set(key, ok, AVAILABILITY_TTL)
    return ok
