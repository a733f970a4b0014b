"""A vast.ai REST API test double: a real aiohttp server on 127.0.0.1.

It speaks vast.ai's REST API as vast-cli calls it: Bearer auth, the offer search
(``POST /api/v0/bundles/`` with the eq/neq/gt/lt/gte/lte/in/notin operators, ``order``,
``limit``, ``type``, ``allocated_storage``), instance creation (``PUT /asks/{id}/``
with the documented limits and error shapes), show / legacy list / destroy /
stop-start-label, the 429 rate-limit and daily-quota answers.

    with VastAIDouble(comfyui_port=comfy.port) as vast:
        client = VastAIClient(vast.api_key, vast.url)

The server runs in a background thread with its own asyncio loop. Instance status is
worked out when it is read, from the clock or from ``advance()``, so nothing runs in
the background and a test never has to sleep.

Knobs (constructor keyword arguments and attributes; change them at any time):

- ``api_key``: the key every request must carry as ``Authorization: Bearer <key>``
  (or ``?api_key=``), else 401.
- ``offers``: the offer list (dicts as ``make_offer()`` builds them); defaults to
  ``default_offers()``: RTX 4090 / 5090 / 3090 / 3060 / A100 offers at various
  prices, one unverified, one unreliable, one on a slow line, one 2-GPU box.
  ``add_offer()``, ``take_offer(id)`` (someone else rented it: create answers 410)
  and ``remove_offer(id)`` (create answers 404) change it.
- ``provision_seconds`` (default 0): how long a new instance shows
  ``actual_status: null``; ``boot_seconds`` (default 0): how long it then shows
  ``"loading"`` before ``boot_outcome``. ``boot_seconds=None`` is manual mode:
  instances stay where ``advance(instance_id, status)`` puts them (they start at
  null). ``advance()`` also pins a single instance in automatic mode.
- ``boot_outcome`` (default ``"running"``): set ``"exited"``, ``"offline"`` or
  ``"unknown"`` to make booting instances fail for good; ``fail_status_msg``
  is the ``status_msg`` they show.
- ``comfyui_port`` / ``portal_port``: the HostPort reported for ``8188/tcp`` /
  ``1111/tcp`` (e.g. a ComfyUIDouble's port); other ports get made-up numbers.
- ``public_ipaddr`` (default ``"127.0.0.1"``).
- ``show_shape``: ``"object"`` (default, ``{"instances": {...}}``) or ``"list"``
  (``{"instances": [{...}]}``, which Vast's own QA tool also handles).
- ``show_includes_ports`` (default True): False leaves ``ports`` out of the by-id
  answer, as Vast's QA tool reports; the legacy list always has them.
- ``rate_limit(pattern, times=1, method=None, retry_after=None, plain=False)``:
  answer the next ``times`` matching requests with 429
  ``{"detail":"API requests too frequent endpoint threshold=4.5"}``.
- ``search_quota_exceeded``: while true, ``POST /bundles/`` answers 429
  ``{"success":false,"error":"search_quota_exceeded",...}`` with ``Retry-After``.
- ``fail_http(pattern, times=1, status=500, body=..., content_type=..., method=None)``:
  answer the next matching requests with that status and body (a dict body is JSON).
- ``credit``: what ``GET /users/current/`` reports.
- ``list_page_size`` (default 25, vast.ai's largest page): how many instances one page of
  the v1 list (``GET /api/v1/instances/``, ``limit``, ``after_token`` → ``next_token``,
  ``select_filters`` with ``eq`` on ``label`` or ``id``) holds.
- ``v0_list_gone`` (default False): the deprecated v0 list answers 404; ``v1_list``
  (default True): False makes the v1 list answer 404, as an older vast.ai would.
- ``lose_create_answers`` (default 0): the next N creates rent the machine, then answer
  502 as a gateway that lost vast.ai's answer would.
- ``fail_list_page(n, times=1, status=500)``: page ``n`` (1-based) of the v1 list fails.
- ``heartbeat_gap(instance_id, seconds)``: the instance reports ``unknown`` for that many
  seconds of the double's clock, then what it reported before; ``advance_clock(seconds)``
  moves that clock on without sleeping.
- ``create_console_instance(...)``: an instance rented in the vast.ai console from the
  ComfyUI template (label empty or the user's, the template's env and ports), with a real
  Instance Portal on 1111 and a quick tunnel to ComfyUI (tests/doubles/vast_portal.py);
  ``tunnel_url(id)``, ``rotate_tunnel(id, old="gone"|"refused")``, ``portal(id)``.

Patterns are fnmatch patterns on the path after ``/api/v0``, e.g. ``"/instances/*"``,
``"/asks/*"``, ``"/bundles/"``; v1 paths keep their prefix: ``"/api/v1/instances/"``.

Observation: ``requests`` (method, path, query, headers, json), ``count(method, pattern)``,
``requests_to(method, pattern)``, ``instances`` (id -> the instance as the API shows
it, plus the double-only key ``destroyed``), ``live_instances()``, ``offer(id)``,
``wait_for(predicate)``.
"""

import copy
import fnmatch
import json
import secrets
import shlex
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from tests.doubles.base import LoopServer
from tests.doubles.vast_portal import InstancePortal, QuickTunnel

API_PREFIX = "/api/v0"
V1_PREFIX = "/api/v1"
OPERATORS = {"eq", "neq", "gt", "lt", "gte", "lte", "in", "notin"}
# Keys of the search body that are not filters.
SEARCH_OPTIONS = {"order", "limit", "type", "allocated_storage", "disable_bundling", "extra_ids", "show_incompatible"}
SEARCH_TYPES = {"on-demand", "ondemand", "bid", "interruptible", "reserved"}
RUNTYPES = {"ssh", "ssh_proxy", "ssh_direct", "ssh_direc", "jupyter", "jupyter_proxy", "jupyter_direct", "jupyter_direc", "args"}
STATUSES = {None, "loading", "running", "stopped", "frozen", "exited", "rebooting", "unknown", "offline"}
ENV_VALUE_MAX = 256
ENV_TOTAL_MAX = 32768
ONSTART_MAX = 4096
LABEL_CREATE_MAX = 256
LABEL_SET_MAX = 1024
DISK_MIN = 8
# The ports of Vast's ComfyUI template, used when an instance is created from a template.
TEMPLATE_PORTS = (1111, 8188, 8288)
COMFY_IMAGE = "vastai/comfy:v0.3.64-cuda-12.8-py312"
COMFY_TEMPLATE_HASH = "2188dfd3e0a0b83691bb468ddae0a4e5"
COMFY_PORTAL_CONFIG = ("localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI|"
                       "localhost:8288:18288:/docs:API Wrapper|localhost:8080:18080:/:Jupyter")
RATE_LIMIT_DETAIL = "API requests too frequent endpoint threshold=4.5"
JSON_BODY = web.RequestKey("json_body", object)

# name -> (gpu_ram MB per GPU, compute_cap, total_flops per GPU, dlperf per GPU, cuda_max_good, driver)
GPU_SPECS = {
    "RTX 5090": (32607, 1200, 104.8, 120.0, 12.8, "570.153.02"),
    "RTX 4090": (24564, 890, 82.6, 95.0, 12.4, "550.127.05"),
    "RTX 3090": (24576, 860, 35.6, 45.0, 12.2, "535.183.01"),
    "RTX 3060": (12288, 860, 12.7, 16.0, 12.2, "535.183.01"),
    "A100 SXM4": (81920, 800, 19.5, 110.0, 12.4, "550.90.07"),
    "A100 PCIE": (40960, 800, 19.5, 90.0, 12.2, "535.183.01"),
}


def make_offer(offer_id, gpu_name, dph_base, *, machine_id=None, host_id=None, num_gpus=1, geolocation="Washington, US",
               reliability=0.995, verified=True, inet_down=850.0, inet_up=600.0, direct_port_count=32, disk_space=250.0,
               storage_cost=0.15, public_ipaddr="127.0.0.1", **extra) -> dict:
    """An offer with the fields of providers.md section 1.2; ``extra`` overrides any of them.

    ``dph_base`` is the GPU price per hour; ``dph_total`` is worked out per search from
    ``storage_cost`` ($/GB/month) and the requested ``allocated_storage``.
    """
    gpu_ram, compute_cap, flops, dlperf, cuda, driver = GPU_SPECS.get(gpu_name, (24000, 890, 50.0, 60.0, 12.4, "550.127.05"))
    machine_id = machine_id if machine_id is not None else 10000 + offer_id % 10000
    offer = {
        "id": offer_id,
        "ask_contract_id": offer_id,
        "bundle_id": offer_id,
        "machine_id": machine_id,
        "host_id": host_id if host_id is not None else 200000 + machine_id,
        "gpu_name": gpu_name,
        "num_gpus": num_gpus,
        "gpu_ram": gpu_ram,
        "gpu_total_ram": gpu_ram * num_gpus,
        "gpu_arch": "nvidia",
        "compute_cap": compute_cap,
        "cuda_max_good": cuda,
        "driver_version": driver,
        "cpu_arch": "amd64",
        "cpu_name": "AMD EPYC 7B13 64-Core Processor",
        "cpu_cores_effective": 16.0 * num_gpus,
        "cpu_ram": 64000 * num_gpus,
        "disk_space": disk_space,
        "disk_bw": 3200.0,
        "disk_name": "Samsung SSD 990 PRO 2TB",
        "dph_base": dph_base,
        "dph_total": dph_base,
        "discounted_dph_total": dph_base,
        "storage_cost": storage_cost,
        "inet_up": inet_up,
        "inet_down": inet_down,
        "inet_up_cost": 0.005,
        "inet_down_cost": 0.005,
        "reliability": reliability,
        "reliability2": reliability,
        "verification": "verified" if verified else "unverified",
        "external": False,
        "geolocation": geolocation,
        "public_ipaddr": public_ipaddr,
        "direct_port_count": direct_port_count,
        "static_ip": True,
        "dlperf": dlperf * num_gpus,
        "dlperf_per_dphtotal": 0.0,
        "total_flops": flops * num_gpus,
        "min_bid": round(dph_base * 0.6, 4),
        "is_bid": False,
        "rentable": True,
        "rented": False,
        "vms_enabled": False,
        "score": 0.0,
        "duration": 2592000.0,
        "end_date": time.time() + 90 * 86400,
        "start_date": time.time() - 3600,
        "search": {},
    }
    offer.update(extra)
    return offer


def default_offers() -> list[dict]:
    return [
        make_offer(7310001, "RTX 4090", 0.345, machine_id=41001, geolocation="Washington, US"),
        make_offer(7310002, "RTX 4090", 0.289, machine_id=41002, geolocation="Quebec, CA", verified=False),
        make_offer(7310003, "RTX 5090", 0.612, machine_id=41003, geolocation="Texas, US"),
        make_offer(7310004, "RTX 3090", 0.178, machine_id=41004, geolocation="Mazowieckie, PL", reliability=0.972),
        make_offer(7310005, "A100 SXM4", 1.104, machine_id=41005, geolocation="Oregon, US"),
        make_offer(7310006, "RTX 4090", 0.401, machine_id=41006, geolocation="California, US", inet_down=95.0),
        make_offer(7310007, "RTX 5090", 0.548, machine_id=41007, geolocation="Prague, CZ"),
        make_offer(7310008, "RTX 3060", 0.062, machine_id=41008, geolocation="Ohio, US"),
        make_offer(7310009, "RTX 4090", 0.702, machine_id=41009, geolocation="Virginia, US", num_gpus=2),
        make_offer(7310010, "RTX 4090", 0.221, machine_id=41010, geolocation="Gauteng, ZA", reliability=0.903),
    ]


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict
    headers: CIMultiDict
    json: object = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Meta:
    """What the double knows about an instance beyond what the API shows."""

    offer_id: int
    image: str | None
    phase_started: float
    exposed: list
    api_key: str
    destroyed: bool = False
    pinned: bool = False
    gap_until: float | None = None
    host_ports: dict = field(default_factory=dict)
    portal: object = None  # the InstancePortal of an instance made with create_console_instance
    tunnels: list = field(default_factory=list)  # its QuickTunnels, the current one last


class _Invalid(Exception):
    def __init__(self, msg, error="invalid_args"):
        super().__init__(msg)
        self.msg = msg
        self.error = error


def _json_error(status, error, msg, **extra):
    body = {"success": False, "error": error, "msg": msg, **extra}
    return web.json_response(body, status=status)


def _country(geolocation) -> str:
    return str(geolocation or "").rsplit(",", 1)[-1].strip()


def _exposed_ports(env) -> list[int]:
    ports = []
    for key in env:
        parts = key.split()
        if len(parts) == 2 and parts[0] == "-p":
            container = parts[1].split(":")[-1].split("/")[0]
            if container.isdigit():
                ports.append(int(container))
    return ports


def _parse_env_string(text) -> dict:
    """The docker-flag form of env ("-e A=1 -p 8188:8188") as the dict form."""
    env, tokens = {}, shlex.split(text)
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        if flag in ("-e", "-p") and i + 1 < len(tokens):
            value = tokens[i + 1]
            if flag == "-p":
                env[f"-p {value}"] = "1"
            else:
                name, _, val = value.partition("=")
                env[name] = val
            i += 2
        else:
            i += 1
    return env


class VastAIDouble(LoopServer):
    name = "vastai-double"

    def __init__(
        self,
        *,
        api_key="test-vast-key-5e1c0ffee5e1c0ffee",
        offers=None,
        provision_seconds=0.0,
        boot_seconds=0.0,
        boot_outcome="running",
        fail_status_msg=None,
        comfyui_port=None,
        portal_port=None,
        public_ipaddr="127.0.0.1",
        show_shape="object",
        show_includes_ports=True,
        search_quota_exceeded=False,
        credit=25.0,
        list_page_size=25,
        v0_list_gone=False,
        v1_list=True,
    ):
        self.api_key = api_key
        self.offers = copy.deepcopy(default_offers() if offers is None else list(offers))
        self.provision_seconds = provision_seconds
        self.boot_seconds = boot_seconds
        self.boot_outcome = boot_outcome
        self.fail_status_msg = fail_status_msg
        self.comfyui_port = comfyui_port
        self.portal_port = portal_port
        self.public_ipaddr = public_ipaddr
        self.show_shape = show_shape
        self.show_includes_ports = show_includes_ports
        self.search_quota_exceeded = search_quota_exceeded
        self.credit = credit
        self.list_page_size = list_page_size
        self.v0_list_gone = v0_list_gone
        self.v1_list = v1_list
        self._clock_offset = 0.0
        self.lose_create_answers = 0
        self._failing_pages: dict[int, list] = {}

        # One lock for all state: handlers never await while holding it.
        self._lock = threading.RLock()
        self.requests: list[RecordedRequest] = []
        self._fail_rules: list[dict] = []
        self._instances: dict[int, dict] = {}
        self._meta: dict[int, _Meta] = {}
        self._next_instance_id = 25000001
        self._next_port = 41000


    # ------------------------------------------------------------------ lifecycle

    url_suffix = API_PREFIX

    async def _astart(self):
        app = web.Application(middlewares=[self._middleware])
        self._add_routes(app)
        await self._serve(app)

    # ------------------------------------------------------------------ test-facing helpers

    def fail_http(self, pattern, *, times=1, status=500, body="500 Internal Server Error", content_type="text/plain", method=None,
                  headers=None):
        """Answer the next `times` requests whose path (after /api/v0) matches `pattern` with status and body."""
        if isinstance(body, (dict, list)):
            body, content_type = json.dumps(body), "application/json"
        with self._lock:
            self._fail_rules.append({"pattern": pattern, "times": times, "status": status, "body": body,
                                     "content_type": content_type, "method": method, "headers": dict(headers or {})})

    def rate_limit(self, pattern, *, times=1, method=None, retry_after=None, plain=False):
        """The next `times` matching requests get vast.ai's 429 (JSON, or plain text with plain=True)."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if plain:
            self.fail_http(pattern, times=times, status=429, body="API requests too frequent: endpoint threshold=4.5",
                           method=method, headers=headers)
        else:
            self.fail_http(pattern, times=times, status=429, body={"detail": RATE_LIMIT_DETAIL}, method=method, headers=headers)

    def advance(self, instance_id, status, status_msg=None):
        """Put an instance into `status` (None, "loading", "running", "exited", ...) and keep it there."""
        if status not in STATUSES:
            raise ValueError(f"unknown actual_status {status!r}; one of {sorted(s for s in STATUSES if s)} or None")
        with self._lock:
            inst, meta = self._instances[int(instance_id)], self._meta[int(instance_id)]
            meta.pinned = True
            self._set_status(inst, status, status_msg)

    def now(self) -> float:
        """The double's clock (monotonic, moved on by advance_clock)."""
        return time.monotonic() + self._clock_offset

    def advance_clock(self, seconds):
        with self._lock:
            self._clock_offset += seconds

    def heartbeat_gap(self, instance_id, seconds):
        """The instance reports `unknown` for `seconds` of the double's clock, then what it reported before."""
        with self._lock:
            self._meta[int(instance_id)].gap_until = self.now() + seconds

    def fail_list_page(self, page, *, times=1, status=500):
        """Page `page` (1-based) of the v1 list answers `status` the next `times` times it is asked for."""
        with self._lock:
            self._failing_pages[int(page)] = [times, status]

    def update_instance(self, instance_id, **fields):
        """Change fields of an instance as vast.ai would report them (e.g. gpu_util=97.0)."""
        with self._lock:
            self._instances[int(instance_id)].update(fields)

    def create_console_instance(self, *, gpu_name="RTX 4090", dph_base=0.345, label=None, web_password=None,
                                portal=True, https=False, image=COMFY_IMAGE, status="running", offer_id=None,
                                template_hash=COMFY_TEMPLATE_HASH, disk=40) -> int:
        """An instance rented in the vast.ai console from the ComfyUI template (not through the API's
        create call): its label empty or the user's own, the template's env (OPEN_BUTTON_TOKEN=1,
        PORTAL_CONFIG, ENABLE_HTTPS, WEB_PASSWORD only if the user set one) and ports. Pinned at
        `status`. With `portal`, port 1111 is a real InstancePortal whose quick tunnel to 8188 (a
        QuickTunnel to ``comfyui_port``) a test can rotate; `portal=False` maps no 1111 at all."""
        env = {"-p 8188:8188": "1", "-p 8288:8288": "1", "OPEN_BUTTON_PORT": "1111", "OPEN_BUTTON_TOKEN": "1",
               "ENABLE_HTTPS": "true" if https else "false", "COMFYUI_ARGS": "--disable-auto-launch --port 18188 --enable-cors-header"}
        if portal:
            env = {"-p 1111:1111": "1", **env, "PORTAL_CONFIG": COMFY_PORTAL_CONFIG}
        else:
            env["PORTAL_CONFIG"] = "localhost:8188:18188:/:ComfyUI"
        if web_password:
            env["WEB_PASSWORD"] = web_password
        with self._lock:
            iid = self._next_instance_id
            self._next_instance_id += 1
            offer = make_offer(offer_id or 7390000 + iid % 10000, gpu_name, dph_base)
            body = {"image": image, "env": env, "label": label, "disk": disk, "runtype": "jupyter_direct",
                    "onstart": "entrypoint.sh", "template_hash_id": template_hash}
            inst, meta = self._new_instance(iid, offer, body, env)
            self._instances[iid], self._meta[iid] = inst, meta
            meta.pinned = True
            self._set_status(inst, status)
        if portal:
            tokens = {inst["jupyter_token"], web_password}
            meta.portal = InstancePortal(tokens, self.public_ipaddr).start()
            meta.host_ports[1111] = meta.portal.port
            if self.comfyui_port is not None:
                meta.portal.direct_ports[8188] = self.comfyui_port
                self._open_tunnel(meta)
        return iid

    def _open_tunnel(self, meta):
        tunnel = QuickTunnel(self.comfyui_port).start()
        meta.tunnels.append(tunnel)
        meta.portal.tunnels[:] = [{"targetUrl": "http://localhost:8188", "tunnelUrl": tunnel.url}]
        return tunnel

    def tunnel_url(self, instance_id) -> str:
        """The current quick-tunnel URL of ComfyUI (what the console's Open button leads to)."""
        return self._meta[int(instance_id)].tunnels[-1].url

    def tunnel(self, instance_id) -> QuickTunnel:
        return self._meta[int(instance_id)].tunnels[-1]

    def portal(self, instance_id) -> InstancePortal:
        return self._meta[int(instance_id)].portal

    def rotate_tunnel(self, instance_id, old="gone") -> str:
        """cloudflared restarted: a new quick-tunnel URL, which the portal now lists. The old URL then
        answers Cloudflare's 530 / error 1033 (old="gone") or refuses connections (old="refused")."""
        meta = self._meta[int(instance_id)]
        previous = meta.tunnels[-1]
        if old == "refused":
            previous.stop()
        else:
            previous.gone()
        return self._open_tunnel(meta).url

    def stop(self):
        for meta in list(self._meta.values()):
            for server in [meta.portal, *meta.tunnels]:
                if server is not None:
                    server.stop()
        super().stop()

    def add_offer(self, offer_id, gpu_name, dph_base, **kwargs) -> dict:
        offer = make_offer(offer_id, gpu_name, dph_base, **kwargs)
        with self._lock:
            self.offers.append(offer)
        return offer

    def take_offer(self, offer_id):
        """Someone else rented it: searches stop listing it and create answers 410 no_such_ask."""
        with self._lock:
            self.offer(offer_id)["rented"] = True

    def remove_offer(self, offer_id):
        """The offer vanished: create answers 404 no_such_ask."""
        with self._lock:
            self.offers[:] = [o for o in self.offers if o["id"] != int(offer_id)]

    def offer(self, offer_id) -> dict | None:
        with self._lock:
            return next((o for o in self.offers if o["id"] == int(offer_id)), None)

    @property
    def instances(self) -> dict[int, dict]:
        """Every instance ever created, as the API shows it now, plus the key `destroyed`."""
        with self._lock:
            out = {}
            for iid, inst in self._instances.items():
                view = self._view(iid, with_ports=True)
                view["destroyed"] = self._meta[iid].destroyed
                out[iid] = view
            return out

    def live_instances(self) -> list[dict]:
        with self._lock:
            return [self._view(iid, with_ports=True) for iid in sorted(self._instances) if not self._meta[iid].destroyed]

    def instance_api_key(self, instance_id) -> str:
        with self._lock:
            return self._meta[int(instance_id)].api_key

    def requests_to(self, method, pattern) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method and fnmatch.fnmatchcase(self._route_path(r.path), pattern)]

    def count(self, method, pattern) -> int:
        """How many requests hit `pattern` (fnmatch, path after /api/v0) with `method`."""
        return len(self.requests_to(method, pattern))

    def wait_for(self, predicate, timeout=5.0, interval=0.005):
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError("VastAIDouble.wait_for: condition not met")
            time.sleep(interval)

    # ------------------------------------------------------------------ instance state

    def _set_status(self, inst, status, status_msg=None):
        inst["actual_status"] = status
        if status_msg is None:
            image = inst.get("image_uuid") or "template image"
            status_msg = {
                None: None,
                "loading": f"Pulling image {image}",
                "running": f"success, running {image}/{inst.get('image_runtype') or 'jupyter'}",
                "stopped": "Stopped by user",
                "exited": self.fail_status_msg
                or "Error response from daemon: failed to create task for container: OCI runtime create failed: unable to start container process",
                "offline": self.fail_status_msg or "Machine is offline",
                "unknown": self.fail_status_msg or "Instance status unknown",
                "frozen": "Frozen",
                "rebooting": "Rebooting",
            }.get(status)
        inst["status_msg"] = status_msg
        if status == "running":
            inst["gpu_util"], inst["gpu_temp"] = 0.0, 38.0
        else:
            inst["gpu_util"], inst["gpu_temp"] = None, None

    def _refresh(self, iid):
        """Move an automatically booting instance along the clock."""
        inst, meta = self._instances[iid], self._meta[iid]
        if meta.destroyed or meta.pinned or self.boot_seconds is None or inst["intended_status"] != "running":
            return
        elapsed = time.monotonic() - meta.phase_started
        if elapsed >= (self.provision_seconds or 0) + self.boot_seconds:
            status = self.boot_outcome
        elif elapsed >= (self.provision_seconds or 0):
            status = "loading"
        else:
            status = None
        if status != inst["actual_status"]:
            self._set_status(inst, status)

    def _host_port(self, iid, port) -> str:
        if port in self._meta[iid].host_ports:
            return str(self._meta[iid].host_ports[port])
        if port == 8188 and self.comfyui_port is not None:
            return str(self.comfyui_port)
        if port == 1111 and self.portal_port is not None:
            return str(self.portal_port)
        meta = self._meta[iid]
        if port not in meta.host_ports:
            meta.host_ports[port] = self._next_port
            self._next_port += 1
        return str(meta.host_ports[port])

    def _view(self, iid, *, with_ports):
        self._refresh(iid)
        view = copy.deepcopy(self._instances[iid])
        meta = self._meta[iid]
        if meta.gap_until is not None and not meta.destroyed:
            if self.now() < meta.gap_until:
                view.update(actual_status="unknown", status_msg="Instance status unknown", gpu_util=None, gpu_temp=None)
                return view
            meta.gap_until = None
        if with_ports and view["actual_status"] == "running":
            view["ports"] = {
                f"{port}/tcp": [{"HostIp": "0.0.0.0", "HostPort": self._host_port(iid, port)},
                                {"HostIp": "::", "HostPort": self._host_port(iid, port)}]
                for port in self._meta[iid].exposed
            }
        return view

    def _live(self, iid):
        return iid in self._instances and not self._meta[iid].destroyed

    # ------------------------------------------------------------------ HTTP plumbing

    @staticmethod
    def _route_path(path: str) -> str:
        return path[len(API_PREFIX):] if path.startswith(API_PREFIX) else path

    def _add_routes(self, app):
        routes = [
            ("POST", "/bundles/", self._search),
            ("PUT", "/asks/{offer_id}/", self._create),
            ("GET", "/instances/", self._list),
            ("GET", "/instances/{instance_id}/", self._show),
            ("PUT", "/instances/{instance_id}/", self._manage),
            ("DELETE", "/instances/{instance_id}/", self._destroy),
            ("GET", "/users/current/", self._current_user),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, API_PREFIX + path, handler)
            app.router.add_route(method, API_PREFIX + path.rstrip("/"), handler)
        app.router.add_route("GET", V1_PREFIX + "/instances/", self._list_v1)
        app.router.add_route("GET", V1_PREFIX + "/instances", self._list_v1)

    @web.middleware
    async def _middleware(self, request, handler):
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
        request[JSON_BODY] = body
        with self._lock:
            self.requests.append(RecordedRequest(request.method, request.path, dict(request.rel_url.query), CIMultiDict(request.headers), body))
        path = self._route_path(request.path)

        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}" and request.rel_url.query.get("api_key") != self.api_key:
            return _json_error(401, "unauthorized", "Invalid or missing API key: send Authorization: Bearer <your API key>")

        rule = self._take_fail_rule(path, request.method)
        if rule is not None:
            data = rule["body"].encode() if isinstance(rule["body"], str) else rule["body"]
            return web.Response(status=rule["status"], body=data, content_type=rule["content_type"], headers=rule["headers"])

        if self.search_quota_exceeded and request.method == "POST" and fnmatch.fnmatchcase(path, "/bundles*"):
            now = time.time()
            reset = int(now // 86400 + 1) * 86400
            return web.json_response(
                {"success": False, "error": "search_quota_exceeded", "msg": "Daily search quota exceeded; it resets at 00:00 UTC."},
                status=429, headers={"Retry-After": str(int(reset - now)), "X-RateLimit-Reset": str(reset)},
            )
        return await handler(request)

    # ------------------------------------------------------------------ search

    async def _search(self, request):
        query = await self._json_body(request)
        if not isinstance(query, dict):
            return _json_error(400, "invalid_args", "error 400/3467: the search body must be a JSON object")
        try:
            offers = self._run_search(query)
        except _Invalid as exc:
            return _json_error(400, exc.error, exc.msg)
        return web.json_response({"offers": offers})

    def _run_search(self, query):
        search_type = query.get("type", "on-demand")
        if search_type not in SEARCH_TYPES:
            raise _Invalid(f"error 400/3467: invalid type {search_type!r}")
        try:
            storage = float(query.get("allocated_storage", 5.0))
            limit = query.get("limit")
            limit = None if limit is None else int(limit)
        except (TypeError, ValueError):
            raise _Invalid("error 400/3467: allocated_storage and limit must be numbers") from None
        filters = []
        for key, spec in query.items():
            if key in SEARCH_OPTIONS:
                continue
            if not isinstance(spec, dict):
                raise _Invalid(f"error 400/3467: filter {key!r} must be an object like {{\"gte\": 1}}")
            unknown = set(spec) - OPERATORS
            if unknown:
                raise _Invalid(f"error 400/3467: unknown operator {sorted(unknown)[0]!r} for {key!r}")
            for op, value in spec.items():
                if op in ("in", "notin") and not isinstance(value, list):
                    raise _Invalid(f"error 400/3467: {key} {op} needs a list")
                filters.append((key, op, value))

        with self._lock:
            found = []
            for offer in self.offers:
                priced = self._priced(offer, storage, search_type)
                if all(_matches(priced, key, op, value) for key, op, value in filters):
                    found.append(priced)
        order = query.get("order") or [["score", "desc"]]
        if isinstance(order, list):
            for item in reversed(order):
                if not isinstance(item, (list, tuple)) or not item:
                    raise _Invalid("error 400/3467: order must be a list of [field, \"asc\"|\"desc\"]")
                name = item[0]
                desc = len(item) > 1 and str(item[1]).lower() == "desc"
                present = [o for o in found if o.get(name) is not None]
                missing = [o for o in found if o.get(name) is None]
                present.sort(key=lambda o: o[name], reverse=desc)
                found = present + missing
        return found[:limit] if limit is not None else found

    @staticmethod
    def _priced(offer, storage, search_type):
        priced = copy.deepcopy(offer)
        disk_hour = round(float(offer.get("storage_cost") or 0) * storage / (30 * 24), 6)
        base = float(offer.get("min_bid") if search_type in ("bid", "interruptible") else offer["dph_base"])
        total = round(base + disk_hour, 6)
        priced.update(
            dph_total=total,
            discounted_dph_total=total,
            dlperf_per_dphtotal=round(float(offer.get("dlperf") or 0) / total, 3) if total else 0.0,
            score=round(float(offer.get("dlperf") or 0) / total * float(offer.get("reliability") or 0), 3) if total else 0.0,
            is_bid=search_type in ("bid", "interruptible"),
            search={"gpuCostPerHour": base, "diskHour": disk_hour, "totalHour": total, "discountTotalHour": 0.0,
                    "discountedTotalPerHour": total},
        )
        return priced

    @staticmethod
    async def _json_body(request):
        return request.get(JSON_BODY)

    # ------------------------------------------------------------------ create

    async def _create(self, request):
        try:
            offer_id = int(request.match_info["offer_id"])
        except ValueError:
            return _json_error(400, "invalid_args", "error 400/3467: the offer id must be an integer")
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return _json_error(400, "invalid_args", "error 400/3467: the request body must be a JSON object", ask_id=offer_id)
        try:
            env = self._validate_create(body)
        except _Invalid as exc:
            return _json_error(400, exc.error, exc.msg, ask_id=offer_id)

        with self._lock:
            offer = next((o for o in self.offers if o["id"] == offer_id), None)
            if offer is None:
                return web.json_response({"success": False, "error": "invalid_args",
                                          "msg": f"error 404/3603: no_such_ask  Instance type by id {offer_id} is not available."}, status=404)
            if offer.get("rented") or not offer.get("rentable", True):
                return _json_error(410, "no_such_ask", f"error 410/3907: ask {offer_id} is no longer available", ask_id=offer_id)
            offer["rented"] = True
            iid = self._next_instance_id
            self._next_instance_id += 1
            inst, meta = self._new_instance(iid, offer, body, env)
            self._instances[iid], self._meta[iid] = inst, meta
            if body.get("target_state") == "stopped":
                inst.update(intended_status="stopped", cur_state="stopped", next_state="stopped")
                self._set_status(inst, "stopped")
            if self.lose_create_answers > 0:
                self.lose_create_answers -= 1
                return web.Response(status=502, text="502 Bad Gateway")
        return web.json_response({"success": True, "new_contract": iid, "instance_api_key": meta.api_key})

    def _validate_create(self, body) -> dict:
        image, template = body.get("image"), body.get("template_hash_id")
        if not image and not template:
            raise _Invalid("error 400/3467: either image or template_hash_id is required")
        env = body.get("env") or {}
        if isinstance(env, str):
            env = _parse_env_string(env)
        if not isinstance(env, dict):
            raise _Invalid("error 400/3467: env must be an object of name -> value")
        total = 0
        for key, value in env.items():
            if not isinstance(value, str):
                raise _Invalid(f"error 400/3467: env value of {key} must be a string")
            if len(value) > ENV_VALUE_MAX:
                raise _Invalid(f"error 400/3467: env value of {key} is longer than {ENV_VALUE_MAX} characters")
            total += len(key) + len(value)
        if total > ENV_TOTAL_MAX:
            raise _Invalid(f"error 400/3467: env is longer than {ENV_TOTAL_MAX} characters in total")
        start = sum(len(str(body.get(k) or "")) for k in ("onstart", "args_str")) + sum(len(str(a)) for a in body.get("args") or [])
        if start > ONSTART_MAX:
            raise _Invalid(f"error 400/3467: args + args_str + onstart is longer than {ONSTART_MAX} characters")
        label = body.get("label")
        if label is not None and len(str(label)) > LABEL_CREATE_MAX:
            raise _Invalid(f"error 400/3467: label is longer than {LABEL_CREATE_MAX} characters")
        disk = body.get("disk", 10)
        if isinstance(disk, bool) or not isinstance(disk, (int, float)) or disk < DISK_MIN:
            raise _Invalid(f"error 400/3467: disk must be a number of GB, at least {DISK_MIN}")
        runtype = body.get("runtype")
        if runtype is not None and (not isinstance(runtype, str) or not set(runtype.split()) <= RUNTYPES or not runtype.split()):
            raise _Invalid(f"error 400/3467: invalid runtype {runtype!r}")
        price = body.get("price")
        if price is not None and (not isinstance(price, (int, float)) or not 0.001 <= price <= 128):
            raise _Invalid("error 400/3467: price must be between 0.001 and 128 $/hour", error="invalid_price")
        if body.get("target_state") not in (None, "running", "stopped"):
            raise _Invalid("error 400/3467: target_state must be running or stopped")
        return env

    def _new_instance(self, iid, offer, body, env):
        runtype = body.get("runtype") or "ssh"
        exposed = _exposed_ports(env)
        if body.get("template_hash_id") and not exposed:
            exposed = list(TEMPLATE_PORTS)
        if "ssh" in runtype or "jupyter" in runtype:
            exposed = [22] + exposed
        if "jupyter" in runtype and 8080 not in exposed:
            exposed.append(8080)
        exposed = list(dict.fromkeys(exposed))
        disk = float(body.get("disk", 10))
        disk_hour = round(float(offer.get("storage_cost") or 0) * disk / (30 * 24), 6)
        ssh_port = 20000 + iid % 10000
        inst = {
            "id": iid,
            "label": body.get("label"),
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "status_msg": None,
            "public_ipaddr": self.public_ipaddr,
            "ssh_host": f"ssh{iid % 9 + 1}.vast.ai",
            "ssh_port": ssh_port,
            "ssh_idx": str(iid % 9 + 1),
            "machine_dir_ssh_port": ssh_port + 1,
            "direct_port_start": 40000,
            "direct_port_end": 40000 + int(offer.get("direct_port_count") or 0),
            "jupyter_token": secrets.token_hex(32),
            "image_uuid": body.get("image"),
            "image_runtype": runtype,
            "image_args": [],
            "template_hash_id": body.get("template_hash_id"),
            "extra_env": [[k, v] for k, v in env.items() if not k.startswith("-")],
            "onstart": body.get("onstart"),
            "dph_base": offer["dph_base"],
            "dph_total": round(float(offer["dph_base"]) + disk_hour, 6),
            "storage_cost": offer.get("storage_cost"),
            "inet_up_cost": offer.get("inet_up_cost"),
            "inet_down_cost": offer.get("inet_down_cost"),
            "start_date": time.time(),
            "end_date": offer.get("end_date"),
            "duration": offer.get("duration"),
            "gpu_name": offer["gpu_name"],
            "num_gpus": offer["num_gpus"],
            "gpu_ram": offer["gpu_ram"],
            "gpu_totalram": offer.get("gpu_total_ram"),
            "gpu_util": None,
            "gpu_temp": None,
            "cpu_cores_effective": offer.get("cpu_cores_effective"),
            "cpu_ram": offer.get("cpu_ram"),
            "disk_space": disk,
            "disk_usage": 0.0,
            "inet_up": offer.get("inet_up"),
            "inet_down": offer.get("inet_down"),
            "geolocation": offer.get("geolocation"),
            "reliability2": offer.get("reliability2"),
            "verification": offer.get("verification"),
            "cuda_max_good": offer.get("cuda_max_good"),
            "driver_version": offer.get("driver_version"),
            "machine_id": offer["machine_id"],
            "host_id": offer["host_id"],
            "is_bid": False,
            "min_bid": offer.get("min_bid"),
        }
        meta = _Meta(offer_id=offer["id"], image=body.get("image"), phase_started=time.monotonic(), exposed=exposed,
                     api_key=secrets.token_hex(32))
        return inst, meta

    # ------------------------------------------------------------------ show, list, manage, destroy

    def _instance_id(self, request):
        try:
            return int(request.match_info["instance_id"])
        except ValueError:
            return None

    async def _show(self, request):
        iid = self._instance_id(request)
        with self._lock:
            if iid is None or not self._live(iid):
                return web.json_response({"instances": None})
            view = self._view(iid, with_ports=self.show_includes_ports)
        return web.json_response({"instances": [view] if self.show_shape == "list" else view})

    async def _list(self, request):
        if self.v0_list_gone:
            return web.json_response({"detail": "Not Found"}, status=404)
        with self._lock:
            views = [self._view(iid, with_ports=True) for iid in sorted(self._instances) if self._live(iid)]
        return web.json_response({"instances": views})

    async def _list_v1(self, request):
        """The paginated v1 list: `limit` (at most 25), `after_token` → `next_token`, `select_filters`."""
        if not self.v1_list:
            return web.json_response({"detail": "Not Found"}, status=404)
        query = request.rel_url.query
        try:
            limit = min(int(query.get("limit", 25)), 25, self.list_page_size)
            filters = json.loads(query.get("select_filters") or "{}")
            after = int(query["after_token"].removeprefix("tok-")) if query.get("after_token") else None
        except (ValueError, AttributeError):
            return _json_error(400, "invalid_args", "error 400/3467: limit, select_filters or after_token is malformed")
        if not isinstance(filters, dict) or any(k not in ("label", "id", "actual_status", "gpu_name") or not isinstance(v, dict)
                                                or set(v) - {"eq"} for k, v in filters.items()):
            return _json_error(400, "invalid_args", "error 400/3467: only stored columns can be filtered, with eq")
        with self._lock:
            views = [self._view(iid, with_ports=True) for iid in sorted(self._instances) if self._live(iid)]
            views = [v for v in views if all(v.get(k) == spec["eq"] for k, spec in filters.items())]
            total = len(views)
            if after is not None:
                views = [v for v in views if v["id"] > after]
            page = 1 + (total - len(views)) // max(1, limit)
            failing = self._failing_pages.get(page)
            if failing and failing[0] > 0:
                failing[0] -= 1
                return web.Response(status=failing[1], text="500 Internal Server Error")
            chunk = views[:limit]
        more = len(views) > limit
        return web.json_response({"success": True, "instances_found": len(chunk), "total_instances": total,
                                  "next_token": f"tok-{chunk[-1]['id']}" if more else None, "instances": chunk})

    async def _manage(self, request):
        iid = self._instance_id(request)
        body = await self._json_body(request)
        if not isinstance(body, dict) or not ({"state", "label"} & set(body)):
            return _json_error(400, "invalid_args", "error 400/3467: send {\"state\": \"running\"|\"stopped\"} or {\"label\": ...}")
        with self._lock:
            if iid is None or not self._live(iid):
                return _json_error(404, "no_such_instance", f"Instance {iid} not found.")
            inst, meta = self._instances[iid], self._meta[iid]
            if "label" in body:
                label = body["label"]
                if label is not None and len(str(label)) > LABEL_SET_MAX:
                    return _json_error(400, "label_too_long", f"label is longer than {LABEL_SET_MAX} characters")
                inst["label"] = label
            if "state" in body:
                state = body["state"]
                if state == "stopped":
                    inst.update(intended_status="stopped", cur_state="stopped", next_state="stopped")
                    meta.pinned = False
                    self._set_status(inst, "stopped")
                elif state == "running":
                    if inst["intended_status"] != "running":
                        inst.update(intended_status="running", cur_state="running", next_state="running")
                        meta.pinned, meta.phase_started = False, time.monotonic()
                        self._set_status(inst, "loading")
                else:
                    return _json_error(400, "invalid_args", f"error 400/3467: state must be running or stopped, not {state!r}")
        return web.json_response({"success": True})

    async def _destroy(self, request):
        iid = self._instance_id(request)
        with self._lock:
            if iid is None or not self._live(iid):
                return _json_error(404, "not_found", f"Instance {iid} not found.")
            meta = self._meta[iid]
            meta.destroyed = True
            inst = self._instances[iid]
            inst.update(intended_status="stopped", cur_state="unloaded", next_state="unloaded")
            inst["actual_status"], inst["status_msg"] = "exited", "Destroyed"
            offer = next((o for o in self.offers if o["id"] == meta.offer_id), None)
            if offer is not None:
                offer["rented"] = False  # the machine is back on the market
        return web.json_response({"success": True, "msg": f"Instance {iid} destroyed."})

    async def _current_user(self, request):
        return web.json_response({"id": 424242, "username": "i2v-test", "email": "i2v-test@example.com", "credit": self.credit,
                                  "balance": 0.0, "has_billing": True})


def _matches(offer, key, op, value) -> bool:
    if key == "verified":
        actual = offer.get("verification") == "verified"
    elif key == "external":
        actual = bool(offer.get("external", False))
    else:
        actual = offer.get(key)
    if key == "geolocation":
        # Filters use 2-letter country codes; offers say "Washington, US".
        actual_values = {str(actual), _country(actual)}
        if op == "eq":
            return str(value) in actual_values
        if op == "neq":
            return str(value) not in actual_values
        if op == "in":
            return bool(actual_values & {str(v) for v in value})
        if op == "notin":
            return not (actual_values & {str(v) for v in value})
        return False
    if op == "eq":
        return actual == value
    if op == "neq":
        return actual != value
    if op == "in":
        return actual in value
    if op == "notin":
        return actual not in value
    if actual is None or value is None:
        return False
    try:
        if op == "gt":
            return actual > value
        if op == "lt":
            return actual < value
        if op == "gte":
            return actual >= value
        if op == "lte":
            return actual <= value
    except TypeError:
        return False
    return False
