import ipaddress
import re
from urllib.parse import urlsplit

import httpx

NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*\.?$", re.IGNORECASE)


def _ambiguous_ipv4(host: str) -> bool:
    """A host made of numbers that is not a plain dotted quad (0177.0.0.1, 0x7f.1, 2130706433):
    inet_aton reads such forms as some address, other parsers refuse or read another one."""
    if not NUMERIC_HOST.match(host):
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def validate_service_url(value: str) -> str:
    """A ComfyUI/SwarmUI base URL: http(s), a host, no credentials; returned without trailing slash."""
    value = value.strip()
    if len(value) > 500:
        raise ValueError("must be at most 500 characters")
    try:
        parts = urlsplit(value)
        parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("must include a host name")
    if _ambiguous_ipv4(parts.hostname):
        raise ValueError(f"has the host {parts.hostname!r}, a numeric address in a form systems read differently "
                         "(octal, hexadecimal or short); write it as four decimal numbers, e.g. 127.0.0.1")
    try:
        httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.username or parts.password:
        raise ValueError("must not contain a user name or password; set comfyui_token instead")
    if any(ch in value for ch in " \r\n\t\x00"):
        raise ValueError("must not contain spaces or control characters")
    return value.rstrip("/")


def split_token(url: str) -> tuple[str, str]:
    """vast.ai "Open" URLs carry `?token=…`: return the URL without it, and the token."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    token = next((v for k, v in query if k == "token"), "")
    rest = urlencode([(k, v) for k, v in query if k != "token"])
    return urlunsplit(parts._replace(query=rest)).rstrip("/") if token else url, token
