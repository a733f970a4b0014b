"""SSRF guard for every connection the server opens on a user's behalf (httpx and websockets).

Only http and https. Every address a host name resolves to is classified with `ipaddress`, IPv4
embedded in IPv6 unwrapped first (mapped, compatible, NAT64, 6to4, Teredo), and the connection is
then made to the address that was checked, never to a second DNS answer: the resolution happens
once, inside the transport's connect, on every redirect hop and for the websocket. Host header and
TLS SNI stay the URL's host name.

Unspecified, link-local (cloud metadata), multicast, reserved and broadcast addresses are always
refused. Loopback and private ranges stay allowed by default (a ComfyUI on the LAN is legitimate);
``I2V_BLOCK_PRIVATE_NETWORKS=1`` refuses every address that is not globally routable.
"""

import functools
import ipaddress
import socket
import ssl
import typing
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses Python's flags miss that still reach a cloud's metadata service.
METADATA = [ipaddress.ip_network("fd00:ec2::254/128")]  # AWS IPv6 metadata
NAT64 = [ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48")]
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: private in practice


class BlockedURL(ValueError):
    """The URL may not be fetched; str() says why, in words a person can act on."""


def _block_private() -> bool:
    return settings.I2V_BLOCK_PRIVATE_NETWORKS


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (and a packet to it would reach), if any."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped:
        return addr.ipv4_mapped
    if addr.sixtofour:
        return addr.sixtofour
    if addr.teredo:
        return addr.teredo[1]  # the client behind the relay is where the packet lands
    if any(addr in net for net in NAT64):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in IPV4_COMPATIBLE and int(addr) > 1:  # ::a.b.c.d (deprecated), not :: or ::1
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def refusal(ip: str, block_private: bool | None = None) -> str | None:
    """Why a connection to `ip` is refused, or None when it is allowed."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    addr = embedded_ipv4(addr) or addr
    if block_private is None:
        block_private = _block_private()
    if addr.is_unspecified or addr in THIS_NETWORK:
        return "the unspecified address is not allowed (it connects to this machine)"
    if addr.is_link_local or any(addr in net for net in METADATA):
        return "link-local and cloud-metadata addresses are not allowed"
    if addr.is_multicast:
        return "multicast addresses are not allowed"
    if addr.is_loopback or (addr.is_private and not addr.is_reserved) or addr in SHARED or getattr(addr, "is_site_local", False):
        return "private and loopback addresses are disabled on this server" if block_private else None
    if addr.is_reserved or not addr.is_global:
        return "reserved addresses are not allowed"
    return None


def check_address(ip: str, host: str = "") -> None:
    reason = refusal(ip)
    if reason:
        label = f"{host} ({ip})" if host and host.strip("[]") != ip else ip
        raise BlockedURL(f"Refused to connect to {label}: {reason}.")


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the one DNS lookup a connection makes)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedURL(f"Could not resolve host {host!r}: check the URL for typos.") from exc
    seen = []
    for info in infos:
        if info[4][0] not in seen:
            seen.append(info[4][0])
    return seen


def checked_addresses(host: str, port: int) -> list[str]:
    """Resolve `host` once and check every answer; the addresses to connect to, in DNS order.
    One refused answer refuses them all: a name that also points inside is not trusted."""
    addresses = resolve(host.strip("[]"), port)
    for ip in addresses:
        check_address(ip, host)
    return addresses


def _split(url: str) -> tuple[str, str, int]:
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
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def check_url(url: str) -> str:
    """Validate scheme and host, resolve DNS and check every address. Returns the URL.
    Early validation for a form; the connection itself checks again (see PinnedBackend)."""
    _, host, port = _split(url)
    checked_addresses(host, port)
    return url


def connect_socket(host: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP socket to the first reachable address of `host` that passed the check."""
    last_error: OSError | None = None
    for ip in checked_addresses(host, port):
        try:
            # An IP literal: create_connection makes no second DNS lookup.
            sock = socket.create_connection((ip, port), timeout)
        except OSError as exc:
            last_error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last_error or OSError(f"no address to connect to for {host}")


class PinnedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting to the address the guard checked. httpcore still
    does TLS with the URL's host as SNI and sends its Host header; only the TCP target is pinned."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable | None = None) -> httpcore.NetworkStream:
        try:
            addresses = checked_addresses(host, port)
        except BlockedURL as exc:
            # httpx turns httpcore's ConnectError into its own; blocked_reason finds the cause.
            raise httpcore.ConnectError(str(exc)) from exc
        error: Exception | None = None
        for ip in addresses:
            try:
                # An IP literal: create_connection makes no second DNS lookup.
                return super().connect_tcp(ip, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} has no address")


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over PinnedBackend: every new connection, redirect hops included, resolves
    once, checks every address and connects to a checked one."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # HTTPTransport takes no network_backend argument; its pool reads this attribute per connection.
        self._pool._network_backend = PinnedBackend()


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # Building a context loads the CA bundle (~0.1 s); one shared context makes clients cheap.
    return ssl.create_default_context(cafile=certifi.where())


def warm() -> None:
    """Build the shared TLS context now (a process about to serve jobs, not its first job, pays for it)."""
    _ssl_context()


def http_client(**kwargs) -> httpx.Client:
    """An httpx.Client whose every connection (and redirect hop) goes to an address that passed
    the guard. Environment proxies are not used (an explicit transport turns them off in httpx)."""
    kwargs.setdefault("transport", GuardedTransport(retries=0, verify=_ssl_context()))
    return httpx.Client(**kwargs)


def blocked_reason(exc: BaseException) -> str | None:
    """The BlockedURL message behind an httpx error, if that is what it was."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
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
