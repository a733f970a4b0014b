"""SSRF guard for every URL the server fetches on a user's behalf.

Only http and https. Link-local and cloud-metadata addresses are refused before
connecting, after DNS resolution, and on every redirect hop. Loopback and private
ranges stay allowed by default (a ComfyUI on the LAN is legitimate); set
``I2V_BLOCK_PRIVATE_NETWORKS=1`` to refuse them too.
"""

import functools
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

import certifi
import httpx
from django.conf import settings

ALWAYS_BLOCKED = [
    ipaddress.ip_network("169.254.0.0/16"),  # link-local, includes 169.254.169.254 metadata
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS IPv6 metadata
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("224.0.0.0/4"),  # multicast
    ipaddress.ip_network("ff00::/8"),
]
PRIVATE = [
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fc00::/7"),
]


class BlockedURL(ValueError):
    """The URL may not be fetched; str() says why, in words a person can act on."""


def _block_private():
    return settings.I2V_BLOCK_PRIVATE_NETWORKS


def check_address(ip: str, host: str = "") -> None:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    label = f"{host} ({addr})" if host and host != str(addr) else str(addr)
    if any(addr in net for net in ALWAYS_BLOCKED):
        raise BlockedURL(f"Refused to connect to {label}: link-local and cloud-metadata addresses are not allowed.")
    if _block_private() and any(addr in net for net in PRIVATE):
        raise BlockedURL(f"Refused to connect to {label}: private and loopback addresses are disabled on this server.")


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedURL(f"Could not resolve host {host!r}: check the URL for typos.") from exc
    return sorted({info[4][0] for info in infos})


def check_url(url: str) -> str:
    """Validate scheme and host, resolve DNS and check every address. Returns the URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BlockedURL(f"Not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise BlockedURL("Only http:// and https:// URLs are allowed.")
    host = parts.hostname
    if not host:
        raise BlockedURL("The URL has no host name.")
    port = port or (443 if parts.scheme == "https" else 80)
    for ip in resolve(host, port):
        check_address(ip, host)
    return url


class GuardedTransport(httpx.HTTPTransport):
    """Checks the target of every request, redirects included, right before it is sent."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            check_url(str(request.url))
        except BlockedURL as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        return super().handle_request(request)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~0.1 s); one shared context makes clients cheap.
    return ssl.create_default_context(cafile=certifi.where())


def http_client(**kwargs) -> httpx.Client:
    """An httpx.Client whose every connection (and redirect hop) passes check_url."""
    kwargs.setdefault("transport", GuardedTransport(retries=0, verify=_ssl_context()))
    return httpx.Client(**kwargs)


def blocked_reason(exc: BaseException) -> str | None:
    """The BlockedURL message behind an httpx error, if that is what it was."""
    while exc is not None:
        if isinstance(exc, BlockedURL):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


class StreamErrors(httpx.SyncByteStream):
    """A response body stream whose transport failures part-way through become the caller's
    own exception: `make_error("stalled" | "interrupted", exc)` returns what to raise."""

    def __init__(self, stream, make_error):
        self._stream = stream
        self._make_error = make_error

    def __iter__(self):
        try:
            yield from self._stream
        except httpx.TimeoutException as exc:
            raise self._make_error("stalled", exc) from None
        except httpx.TransportError as exc:
            raise self._make_error("interrupted", exc) from None

    def close(self):
        self._stream.close()
