"""The outbound-connection guard (gpu/netguard.py) against the bypasses an outside tester found:
the unspecified address, IPv4 hidden in IPv6, and a DNS answer that changes between the check and
the connection (rebinding), through every door a user controls: test-connection, image_url,
webhook_url, and the ComfyUI websocket.

A fence on `socket.create_connection` records where each connection goes and refuses anything
but loopback, so no test here can reach another address even if the guard were broken."""

import ipaddress
import socket

import httpx
import pytest

from generation.models import VideoJob
from gpu import netguard
from gpu.comfyui import ComfyUIClient, ComfyUIError
from tests.doubles.comfyui import ComfyUIDouble
from tests.generation.test_runner import make_job
from tests.helpers import StaticServer, png_bytes
from tests.reliability.test_hostile_inputs import enqueued  # noqa: F401 -- fixture

METADATA = "169.254.169.254"


@pytest.fixture
def fence(monkeypatch):
    """Every TCP connection i2v opens, as (host, port); a non-loopback one is refused here."""
    seen = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        seen.append(address[:2])
        try:
            loopback = ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            loopback = False  # a host name: the guard should have resolved it already
        if not loopback:
            raise ConnectionRefusedError(f"test fence: {address[0]} is not loopback")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return seen


class RebindingResolver:
    """A DNS double: `first` on a name's first lookup, `later` on every lookup after it."""

    def __init__(self, first, later):
        self.first, self.later, self.lookups = first, later, []

    def __call__(self, host, port):
        if not host.endswith(".test"):
            return [host]  # IP literals resolve to themselves
        self.lookups.append(host)
        return [self.first if len(self.lookups) == 1 else self.later]


@pytest.fixture
def rebinding(monkeypatch):
    def install(first, later):
        resolver = RebindingResolver(first, later)
        monkeypatch.setattr(netguard, "resolve", resolver)
        return resolver
    return install


@pytest.fixture
def block_private(settings):
    settings.I2V_BLOCK_PRIVATE_NETWORKS = True


EMBEDDED_METADATA = [
    "::a9fe:a9fe",                                  # IPv4-compatible
    "::ffff:a9fe:a9fe",                             # IPv4-mapped
    "64:ff9b::a9fe:a9fe",                           # NAT64
    "2002:a9fe:a9fe::1",                            # 6to4
    "2001:0:4136:e378:8000:63bf:5601:5601",         # Teredo, client 169.254.169.254
]


@pytest.mark.parametrize("address", EMBEDDED_METADATA)
def test_ipv4_embedded_in_ipv6_is_classified_as_the_ipv4_it_reaches(address):
    with pytest.raises(netguard.BlockedURL, match="link-local"):
        netguard.check_url(f"http://[{address}]/latest/meta-data/")


@pytest.mark.parametrize("address, words", [
    ("::", "unspecified"), ("0.0.0.0", "unspecified"), ("ff02::1", "multicast"), ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("fe80::1", "link-local"),
    ("fd00:ec2::254", "metadata"),
])
def test_addresses_refused_even_with_private_networks_allowed(address, words, settings):
    settings.I2V_BLOCK_PRIVATE_NETWORKS = False
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(netguard.BlockedURL, match=words):
        netguard.check_url(f"http://{host}:8188/")


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "10.1.2.3",
                                     "192.168.1.10", "100.64.0.1", "fc00::1", "2002:7f00:1::1"])
def test_private_and_loopback_refused_when_blocking_is_on(address, block_private):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(netguard.BlockedURL, match="private and loopback"):
        netguard.check_url(f"http://{host}:8188/")


def test_public_addresses_pass():
    assert netguard.refusal("8.8.8.8", block_private=True) is None
    assert netguard.refusal("2606:4700:4700::1111", block_private=True) is None


def test_unspecified_address_refused_by_test_connection(staff_api, fence, settings):
    settings.I2V_BLOCK_PRIVATE_NETWORKS = False  # `[::]` is refused even where the LAN is allowed
    with StaticServer({"/": (200, {}, b"ok")}) as srv:
        port = srv.url.rsplit(":", 1)[1]
        resp = staff_api.post("/api/gpu/test-connection", {"url": f"http://[::]:{port}"})
    body = resp.json()
    assert resp.status_code == 200 and body["reachable"] is False, body
    assert "unspecified" in body["details"]["message"]
    assert fence == []


@pytest.mark.parametrize("address", ["::", *EMBEDDED_METADATA])
def test_bypass_addresses_refused_as_image_url(api, fence, address, settings):
    settings.I2V_BLOCK_PRIVATE_NETWORKS = True
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": f"http://[{address}]:80/a.png"})
    assert resp.status_code == 422, resp.content
    assert resp.json()["detail"].startswith("image_url") and "Refused to connect" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0 and fence == []


@pytest.mark.parametrize("address", ["::", "::a9fe:a9fe", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1"])
def test_bypass_addresses_refused_as_webhook_url(api, fence, address, settings):
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": None,
                                            "webhook_url": f"http://[{address}]:9/hook"})
    assert resp.status_code == 422, resp.content
    assert resp.json()["detail"].startswith("webhook_url") and "Refused to connect" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0 and fence == []


def test_webhook_delivery_rechecks_at_send_time(user, fence, rebinding, settings):
    """A webhook host that pointed at loopback when the job was made and at the metadata address
    when the job ends: the delivery is refused, recorded with the reason, and nothing connects."""
    from generation import webhooks
    from i2v.core.webhook_secrets import WebhookSecret

    WebhookSecret.rotate(user)
    rebinding(first=METADATA, later=METADATA)
    job = make_job(user, status=VideoJob.Status.COMPLETED, webhook_url="http://hooks.test:9/in")
    webhooks.deliver(str(job.id), 1)
    delivery = job.webhook_deliveries.get()
    assert delivery.ok is False and "link-local" in delivery.error
    assert fence == []


def test_rebinding_after_the_check_never_reaches_the_second_answer(fence, rebinding):
    """The check sees 127.0.0.1 (allowed), a second lookup would say the metadata address: the
    connection goes where the check looked, with the URL's Host header, and DNS is asked once."""
    with StaticServer({"/x": (200, {}, b"pinned")}) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        resolver = rebinding(first="127.0.0.1", later=METADATA)
        with netguard.http_client(timeout=5) as http:
            resp = http.get(f"http://rebind.test:{port}/x")
    assert resp.status_code == 200 and resp.text == "pinned"
    assert resp.request.headers["host"] == f"rebind.test:{port}"
    assert resolver.lookups == ["rebind.test"]
    assert fence == [("127.0.0.1", port)]


def test_rebinding_between_validation_and_connection_is_refused(staff_api, fence, rebinding):
    """test-connection validates the URL (first answer: loopback, allowed) and then connects (second
    answer: metadata): the connection's own lookup is the one checked, so it is refused."""
    resolver = rebinding(first="127.0.0.1", later=METADATA)
    resp = staff_api.post("/api/gpu/test-connection", {"url": "http://rebind.test:8188"})
    body = resp.json()
    assert body["reachable"] is False and "link-local" in body["details"]["message"], body
    assert len(resolver.lookups) >= 2
    assert fence == []


def test_redirect_hop_to_a_rebinding_name_is_refused(api, fence, rebinding):
    with StaticServer({"/r": (302, {"Location": "http://rebind.test:80/cat.png"}, b"")}) as srv:
        rebinding(first=METADATA, later=METADATA)
        resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": f"{srv.url}/r"})
    assert resp.status_code == 422, resp.content
    assert "link-local" in resp.json()["detail"]
    assert [host for host, _ in fence] == ["127.0.0.1"]  # the first hop only


def test_image_url_through_a_name_connects_to_the_checked_address(api, fence, rebinding, enqueued):
    with StaticServer({"/cat.png": (200, {"Content-Type": "image/png"}, png_bytes())}) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        rebinding(first="127.0.0.1", later="127.0.0.1")
        resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke",
                                                "image_url": f"http://images.test:{port}/cat.png"})
    assert resp.status_code == 202, resp.content
    assert fence == [("127.0.0.1", port)]


def test_websocket_connects_to_the_checked_address(fence, rebinding):
    with ComfyUIDouble() as comfy:
        port = int(comfy.url.rsplit(":", 1)[1])
        resolver = rebinding(first="127.0.0.1", later=METADATA)
        client = ComfyUIClient(f"http://comfy.test:{port}", retries=0)
        with client.events("client-1", open_timeout=5) as events:
            assert events is not None
        client.close()
    assert resolver.lookups == ["comfy.test"]
    assert fence == [("127.0.0.1", port)]


def test_websocket_to_a_name_resolving_to_metadata_is_refused(fence, rebinding):
    rebinding(first=METADATA, later=METADATA)
    client = ComfyUIClient("http://comfy.test:8188", retries=0)
    with pytest.raises(ComfyUIError) as info:
        with client.events("client-1", open_timeout=5):
            pass
    assert info.value.kind == "blocked" and "link-local" in str(info.value)
    assert fence == []


def test_guard_errors_are_httpx_errors_with_the_reason(fence, rebinding):
    rebinding(first=METADATA, later=METADATA)
    with netguard.http_client(timeout=5) as http, pytest.raises(httpx.ConnectError) as info:
        http.get("http://meta.test/")
    assert "link-local" in netguard.blocked_reason(info.value)


def _self_signed(name):
    """A certificate for `name` and its key, as PEM files' contents."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def test_https_to_a_pinned_address_keeps_the_sni_and_checks_the_certificate_name(fence, rebinding, tmp_path):
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = _self_signed("secure.test")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    seen = {}
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    def on_sni(sock, name, ctx):
        seen["sni"] = name  # returns None: carry on with the handshake

    server_ctx.sni_callback = on_sni

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["host"] = self.headers["Host"]
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        rebinding(first="127.0.0.1", later=METADATA)
        trust = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        transport = netguard.GuardedTransport(retries=0, verify=trust)
        with netguard.http_client(transport=transport, timeout=5) as http:
            assert http.get(f"https://secure.test:{port}/").text == "ok"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == {"sni": "secure.test", "host": f"secure.test:{port}"}
    assert fence == [("127.0.0.1", port)]
