"""What runs on a vast.ai instance started from the ComfyUI template, beside ComfyUI itself:
the Instance Portal on port 1111 and the Cloudflare quick tunnels it opens (providers.md 1.7).

- ``InstancePortal``: a real aiohttp server answering ``GET /get-all-quick-tunnels``
  (``[{"targetUrl": "http://localhost:8188", "tunnelUrl": "https://…"}]``) and
  ``GET /get-direct-url/{port}`` (``{"result": "http://ip:port"}``) behind Caddy's token
  auth: ``Authorization: Bearer <token>``, ``?token=<token>`` or Basic ``vastai:<token>``;
  anything else is a 401. Both WEB_PASSWORD and OPEN_BUTTON_TOKEN are valid tokens.
- ``QuickTunnel``: a ``https://four-random-words.trycloudflare.com`` stand-in: a TCP
  forwarder on 127.0.0.1 to the ComfyUI double (HTTP and the websocket pass through, and
  so does Caddy's token check). ``gone()`` plays what Cloudflare does once the tunnel's
  cloudflared has gone: every request is answered ``530`` with ``error code: 1033``;
  stopping it plays a refused connection.
"""

import base64
import itertools

from aiohttp import web

from tests.doubles.base import LoopServer, RecordedRequest
from tests.doubles.tcp_proxy import TcpProxy

CLOUDFLARE_1033 = b"error code: 1033"
_ray = itertools.count(0x7E3A1F00C0DE0000)


class QuickTunnel(TcpProxy):
    """A Cloudflare quick tunnel to one port of the instance (see the module docstring)."""

    def __init__(self, upstream_port, target_port=8188):
        super().__init__("127.0.0.1", upstream_port)
        self.target_port = target_port
        self._gone = False
        self.answered_530 = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gone(self):
        """From now on Cloudflare answers 530 / error 1033 (its connections drop first)."""

        def do():
            self._gone = True
            self._abort_all()

        self._call(do)

    async def _handle(self, reader, writer):
        if not self._gone:
            return await super()._handle(reader, writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
        except Exception:  # the client gave up: nothing to answer
            writer.transport.abort()
            return
        self.answered_530 += 1
        head = ("HTTP/1.1 530 \r\nContent-Type: text/plain; charset=UTF-8\r\n"
                f"Cf-Ray: {next(_ray):x}-AMS\r\nServer: cloudflare\r\nContent-Length: {len(CLOUDFLARE_1033)}\r\n"
                "Connection: close\r\n\r\n")
        writer.write(head.encode() + CLOUDFLARE_1033)
        try:
            await writer.drain()
        finally:
            writer.close()


class InstancePortal(LoopServer):
    """The Instance Portal of one instance (its external port 1111)."""

    name = "vast-portal"

    def __init__(self, tokens, public_ipaddr="127.0.0.1"):
        self.tokens = {t for t in tokens if t}
        self.public_ipaddr = public_ipaddr
        self.tunnels: list[dict] = []  # {"targetUrl", "tunnelUrl"}
        self.direct_ports: dict[int, int] = {}  # container port -> host port
        self.requests: list[RecordedRequest] = []

    async def _astart(self):
        app = web.Application()
        app.router.add_get("/get-all-quick-tunnels", self._tunnels)
        app.router.add_get("/get-direct-url/{port}", self._direct)
        await self._serve(app)

    def _authorized(self, request) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.tokens:
            return True
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return False
            return user == "vastai" and password in self.tokens
        return request.rel_url.query.get("token") in self.tokens

    def _check(self, request):
        self.requests.append(RecordedRequest(request.method, request.path, dict(request.rel_url.query),
                                             request.headers.copy()))
        if not self._authorized(request):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="restricted"'})

    async def _tunnels(self, request):
        self._check(request)
        return web.json_response(list(self.tunnels))

    async def _direct(self, request):
        self._check(request)
        port = request.match_info["port"]
        host_port = self.direct_ports.get(int(port)) if port.isdigit() else None
        if host_port is None:
            return web.json_response({"detail": f"port {port} is not mapped"}, status=404)
        return web.json_response({"result": f"http://{self.public_ipaddr}:{host_port}"})
