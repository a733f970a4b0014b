"""The one client for vast.ai's REST API (the calls vast-cli makes).

Every failure is a VastAIError whose str() a person can act on and whose `kind`
code can branch on. The API key travels only in the Authorization header and never
into a message or a log line.

Idempotent calls (GET, DELETE, PUT state/label, and the read-only offer search) are
retried a bounded number of times on 429/502/503/504 and connection failures.
Creating an instance is never retried: a lost answer may still have rented a machine,
so the caller looks for the label before trying again.

vast.ai's rate limits are minimum intervals between calls to one endpoint (and it
sends no Retry-After): the client spaces its calls by ENDPOINT_INTERVALS through a
`pace(endpoint, seconds)` callable (gpu.domain shares it between processes through the
database), and after a 429 waits the endpoint's interval (create's penalty) before
trying again.
"""

import json
import logging
import re
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

import httpx

from gpu import netguard
from i2v.core.http import ServiceClient, ServiceError, retry_after, snippet

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
AUTH_MESSAGE = "vast.ai rejected the API key: check VASTAI_API_KEY"
ENV_VALUE_MAX = 256
ENV_TOTAL_MAX = 32768
ONSTART_MAX = 4096
LABEL_MAX = 256
LABEL_SET_MAX = 1024
DISK_MIN_GB = 8
CREATE_READ_TIMEOUT = 120.0  # vast-cli allows slow operations such as creation 120 s
LIST_PAGE_SIZE = 25  # the v1 list's largest page
LIST_MAX_PAGES = 400
RUNTYPES = {"ssh", "ssh_proxy", "ssh_direct", "jupyter", "jupyter_proxy", "jupyter_direct", "args"}
# actual_status values from which an instance "will never reach running" (hello-world.mdx).
DEAD_STATUSES = frozenset({"exited", "unknown", "offline"})
# (method, path pattern after the API version) -> (endpoint, minimum seconds between calls, seconds
# to wait after a 429): vast.ai's documented per-endpoint x-rate-limit values (search: 10 per minute).
ENDPOINT_INTERVALS = (
    ("PUT", "/asks/*", "create", 4.5, 12.0),
    ("POST", "/bundles/", "search", 6.0, 6.0),
    ("GET", "/instances/", "list", 1.0, 1.0),
    ("GET", "/instances/*", "show", 2.0, 2.0),
    ("DELETE", "/instances/*", "destroy", 3.0, 3.0),
    ("PUT", "/instances/*", "manage", 1.0, 1.0),
)


def endpoint_of(method: str, path: str) -> tuple[str, float, float] | None:
    """(endpoint name, minimum interval, wait after a 429) of a call, None for unlimited ones."""
    for m, pattern, name, interval, penalty in ENDPOINT_INTERVALS:
        if m == method and fnmatchcase(path, pattern):
            return name, interval, penalty
    return None


class VastAIError(ServiceError):
    """kind: auth, rate_limited, quota, offer_gone, invalid, not_found, unreachable, timeout, bad_response, http."""


def _body_fields(resp) -> tuple[str, str]:
    """(error code, human message) of a vast.ai error answer, JSON or plain text."""
    try:
        body = resp.json()
    except ValueError:
        return "", snippet(resp.text)
    if not isinstance(body, dict):
        return "", snippet(str(body))
    code = body.get("error")
    message = body.get("msg") or body.get("message") or body.get("detail") or ""
    return (code if isinstance(code, str) else ""), snippet(message if isinstance(message, str) else str(message))


def serves_https(instance: dict) -> bool:
    """Whether the instance's Caddy edge serves HTTPS (the template's ENABLE_HTTPS=true)."""
    env = instance.get("extra_env") if isinstance(instance, dict) else None
    pairs = env.items() if isinstance(env, dict) else (p for p in env or [] if isinstance(p, (list, tuple)) and len(p) == 2)
    return any(str(k) == "ENABLE_HTTPS" and str(v).strip().lower() in ("true", "1", "yes") for k, v in pairs)


def port_url_of(instance: dict, port: int) -> str | None:
    """{scheme}://{public_ipaddr}:{HostPort} of a container port while the instance runs; else None.

    https when the instance serves HTTPS, so the bearer token never crosses the internet in clear text then."""
    if not isinstance(instance, dict) or instance.get("actual_status") != "running":
        return None
    ip = str(instance.get("public_ipaddr") or "").strip()
    ports = instance.get("ports")
    if not ip or not isinstance(ports, dict):
        return None
    for mapping in ports.get(f"{port}/tcp") or []:
        # The by-id yaml wrongly shows bare ints; only a {"HostPort": ...} mapping names the public port.
        host_port = mapping.get("HostPort") if isinstance(mapping, dict) else None
        if host_port is not None and str(host_port).strip().isdigit():
            host = f"[{ip}]" if ":" in ip else ip
            scheme = "https" if serves_https(instance) else "http"
            return f"{scheme}://{host}:{int(str(host_port).strip())}"
    return None


def comfyui_url_of(instance: dict) -> str | None:
    """The direct ComfyUI URL (the Caddy edge on 8188, which wants the bearer token) of a running instance."""
    return port_url_of(instance, 8188)


def portal_url_of(instance: dict) -> str | None:
    """The Instance Portal URL (1111), where the Cloudflare tunnel URLs can be read."""
    return port_url_of(instance, 1111)


class VastAIClient(ServiceClient):
    service = "vast.ai"
    error = VastAIError
    guard = netguard
    hint = " (check VASTAI_API_URL and the network)"
    max_backoff = 10.0

    def __init__(self, api_key, base_url=DEFAULT_BASE_URL, *, connect_timeout=5.0, read_timeout=30.0, retries=3, backoff=0.5,
                 max_retry_wait=30.0, http_client=None, pace=None, pace_scale=1.0, create_timeout=CREATE_READ_TIMEOUT):
        if not api_key or not str(api_key).strip():
            raise VastAIError("No vast.ai API key is configured: set VASTAI_API_KEY", kind="auth")
        self._api_key = str(api_key).strip()
        self.base_url = (base_url or DEFAULT_BASE_URL).strip().rstrip("/")
        # The v1 instance list lives beside v0: .../api/v0 -> .../api/v1.
        self.v1_url = re.sub(r"/v0$", "/v1", self.base_url)
        self._pace = pace
        self.pace_scale = pace_scale  # tests shrink vast.ai's intervals
        self.create_timeout = create_timeout
        super().__init__(connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries, backoff=backoff,
                         max_retry_wait=max_retry_wait, http_client=http_client)

    @property
    def where(self) -> str:
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"

    # ------------------------------------------------------------------ plumbing

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}

    def _secrets(self) -> list[str]:
        return [self._api_key]

    def _before_request(self, method, path):
        endpoint = endpoint_of(method, path)
        if endpoint is not None and self._pace is not None and self.pace_scale > 0:
            name, interval, _ = endpoint
            self._pace(name, interval * self.pace_scale)

    def _status_error(self, resp, method, path, what="") -> VastAIError | None:
        status = resp.status_code
        if status < 300:
            return None
        code, message = _body_fields(resp)
        detail = f": {message}" if message else ""
        if status in (401, 403):
            extra = "" if status == 401 else " (or the key lacks the permission for this call)"
            return self._error(AUTH_MESSAGE + extra, kind="auth", status=status)
        if status == 429:
            wait = retry_after(resp.headers)
            if code == "search_quota_exceeded":
                when = f"; it resets in about {wait / 3600:.1f} h (UTC midnight)" if wait else " (it resets at UTC midnight)"
                return self._error(f"vast.ai's daily offer-search quota is used up{when}; try again later", kind="quota", status=429, retry_after=wait)
            if wait is None:  # vast.ai sends no Retry-After: the endpoint's interval is the wait
                endpoint = endpoint_of(method, path)
                wait = endpoint[2] * self.pace_scale if endpoint else self.backoff
            return self._error(f"vast.ai is rate-limiting {what}{detail}; retry in {wait:.0f}s", kind="rate_limited", status=429,
                               retryable=True, retry_after=wait)
        if status in (404, 410) and ("no_such_ask" in code or "no_such_ask" in message or path.startswith("/asks/")):
            return self._error(f"The vast.ai offer is no longer available{detail}; pick another offer", kind="offer_gone", status=status)
        if status in (404, 410):
            return self._error(f"vast.ai has no such {what}{detail}", kind="not_found", status=status)
        if status in (400, 422):
            hint = ""
            if "billing" in code or "credit" in code or "credit" in message.lower():
                hint = " (add credit at https://cloud.vast.ai/billing/)"
            return self._error(f"vast.ai refused {what}{detail or f' ({code or status})'}{hint}", kind="invalid", status=status)
        if status in (502, 503, 504):
            return self._error(f"vast.ai is having trouble (HTTP {status}) with {what}; try again shortly", kind="http", status=status, retryable=True)
        return self._error(f"vast.ai answered HTTP {status} to {method} {path}{detail}", kind="http", status=status, retryable=False)

    def _request(self, method, path, *, what, idempotent, json=None, params=None, base=None, timeout=None) -> httpx.Response:
        """One API call, retried with backoff when idempotent. Returns a 2xx response or raises VastAIError."""
        return self._call(
            method, (base or self.base_url) + path, path=path, idempotent=idempotent, json=json, params=params, timeout=timeout,
            check=lambda resp: self._status_error(resp, method, path, what),
            unsure="an instance may have been created anyway: look for its label in the instance list before trying again",
        )

    def _json(self, resp, method, path, expect=dict):
        try:
            body = resp.json()
        except ValueError:
            raise self._error(
                f"vast.ai sent a non-JSON answer to {method} {path} ({resp.headers.get('content-type', 'no content type')}): "
                f"{snippet(resp.text, 120)!r}; is VASTAI_API_URL right?",
                kind="bad_response", status=resp.status_code,
            ) from None
        if not isinstance(body, expect):
            raise self._error(f"vast.ai sent an unexpected answer to {method} {path}: {snippet(body, 120)}", kind="bad_response", status=resp.status_code)
        return body

    def _check_success(self, body, what):
        if body.get("success") is False:
            code, message = body.get("error") or "", body.get("msg") or body.get("message") or ""
            raise self._error(f"vast.ai refused {what}: {snippet(message or code or 'no reason given')}", kind="invalid")

    # ------------------------------------------------------------------ offers

    def search_offers(self, *, min_vram_gb=24, gpu_names=(), max_dph=None, min_reliability=None, min_inet_down=None, verified=True,
                      min_direct_ports=None, disk_gb=None, limit=20, exclude_machines=(), num_gpus=1) -> list[dict]:
        """On-demand offers matching the filters, cheapest ($/hour incl. disk) first, excluded machines dropped."""
        excluded = {int(m) for m in exclude_machines}
        query = {
            "external": {"eq": False},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "order": [["dph_total", "asc"]],
            "type": "on-demand",
            # Ask for extra rows so dropping excluded machines still leaves `limit` offers.
            "limit": int(limit) + len(excluded),
        }
        if verified:
            query["verified"] = {"eq": True}
        if num_gpus is not None:
            query["num_gpus"] = {"eq": int(num_gpus)}
        if min_vram_gb:
            query["gpu_ram"] = {"gte": int(round(float(min_vram_gb) * 1000))}  # MB per GPU, as the CLI converts
        names = [str(n).replace("_", " ").strip() for n in gpu_names if str(n).strip()]
        if names:
            query["gpu_name"] = {"in": names}
        if max_dph is not None:
            query["dph_total"] = {"lte": float(max_dph)}
        if min_reliability is not None:
            query["reliability"] = {"gte": float(min_reliability)}
        if min_inet_down is not None:
            query["inet_down"] = {"gte": float(min_inet_down)}
        if min_direct_ports is not None:
            query["direct_port_count"] = {"gte": int(min_direct_ports)}
        if disk_gb is not None:
            query["disk_space"] = {"gte": float(disk_gb)}
            query["allocated_storage"] = float(disk_gb)  # prices dph_total with this much disk
        if excluded:
            query["machine_id"] = {"notin": sorted(excluded)}
        path = "/bundles/"
        resp = self._request("POST", path, what="the offer search", idempotent=True, json=query)
        body = self._json(resp, "POST", path)
        offers = body.get("offers")
        if not isinstance(offers, list):
            raise self._error(f"vast.ai's offer search answer has no offer list: {snippet(body, 120)}", kind="bad_response")
        offers = [o for o in offers if isinstance(o, dict) and o.get("machine_id") not in excluded]
        offers.sort(key=lambda o: (o.get("dph_total") is None, o.get("dph_total") or 0.0))
        return offers[: int(limit)]

    # ------------------------------------------------------------------ instances

    def _validate_create(self, *, image, template_hash, disk_gb, env, onstart, label, runtype):
        if not image and not template_hash:
            raise VastAIError("Creating a vast.ai instance needs a Docker image or a template hash", kind="invalid")
        if not isinstance(env, dict):
            raise VastAIError("env must be a dict of name -> value", kind="invalid")
        total = 0
        for key, value in env.items():
            if not isinstance(value, str):
                raise VastAIError(f"env {key} must be a string (vast.ai only takes string values)", kind="invalid")
            if len(value) > ENV_VALUE_MAX:
                # Name the variable, never its value: values are often secrets.
                raise VastAIError(f"env {key} is {len(value)} characters; vast.ai allows at most {ENV_VALUE_MAX} per value "
                                  "(pass long data by URL, e.g. a provisioning script)", kind="invalid")
            total += len(str(key)) + len(value)
        if total > ENV_TOTAL_MAX:
            raise VastAIError(f"env is {total} characters in total; vast.ai allows at most {ENV_TOTAL_MAX}", kind="invalid")
        if len(onstart or "") > ONSTART_MAX:
            raise VastAIError(f"onstart is {len(onstart)} characters; vast.ai allows at most {ONSTART_MAX} "
                              "(download a script from a URL instead)", kind="invalid")
        if label is not None and len(label) > LABEL_MAX:
            raise VastAIError(f"label is {len(label)} characters; vast.ai allows at most {LABEL_MAX}", kind="invalid")
        if disk_gb is None or float(disk_gb) < DISK_MIN_GB:
            raise VastAIError(f"disk_gb must be at least {DISK_MIN_GB} GB", kind="invalid")
        if runtype is not None and (not runtype.split() or not set(runtype.split()) <= RUNTYPES):
            raise VastAIError(f"runtype {runtype!r} is not one of {', '.join(sorted(RUNTYPES))}", kind="invalid")

    def create_instance(self, offer_id, *, image=None, template_hash=None, disk_gb, env: dict, onstart: str, label: str,
                        runtype="jupyter_direct") -> dict:
        """Rent an offer (PUT /asks/{offer_id}/); never retried.

        Returns {"id", "offer_id", "label", "instance_api_key"}; `instance_api_key` can
        only start, stop or destroy this instance and is a secret. A vanished offer
        raises kind="offer_gone" (pick the next one); limits are checked here first.
        """
        env = dict(env or {})
        self._validate_create(image=image, template_hash=template_hash, disk_gb=disk_gb, env=env, onstart=onstart, label=label, runtype=runtype)
        payload = {
            "client_id": "me",
            "label": label,
            "disk": disk_gb,
            "runtype": runtype,
            "env": env,
            "onstart": onstart,
            "cancel_unavail": True,
            "target_state": "running",
        }
        if image:
            payload["image"] = image
        if template_hash:
            payload["template_hash_id"] = template_hash
        path = f"/asks/{int(offer_id)}/"
        resp = self._request("PUT", path, what=f"creating an instance on offer {int(offer_id)}", idempotent=False, json=payload,
                             timeout=self.timeout(self.create_timeout))
        body = self._json(resp, "PUT", path)
        self._check_success(body, f"creating an instance on offer {int(offer_id)}")
        new_id = body.get("new_contract")
        if isinstance(new_id, bool) or not isinstance(new_id, (int, str)) or not str(new_id).isdigit():
            raise self._error(
                f"vast.ai accepted the create request but sent no instance id; look for label {label!r} in the instance list",
                kind="bad_response",
            )
        return {"id": int(new_id), "offer_id": int(offer_id), "label": label, "instance_api_key": body.get("instance_api_key")}

    def show_instance(self, instance_id) -> dict | None:
        """The instance as vast.ai reports it now, or None if vast.ai does not know it (destroyed)."""
        path = f"/instances/{int(instance_id)}/"
        try:
            resp = self._request("GET", path, what=f"instance {int(instance_id)}", idempotent=True, params={"owner": "me"})
        except VastAIError as exc:
            if exc.kind == "not_found":
                return None
            raise
        body = self._json(resp, "GET", path)
        if "instances" not in body:
            raise self._error(f"vast.ai's answer for instance {int(instance_id)} has no 'instances' key", kind="bad_response")
        found = body["instances"]
        if isinstance(found, list):  # some deployments wrap the one instance in a list
            found = found[0] if found else None
        if found is not None and not isinstance(found, dict):
            raise self._error(f"vast.ai sent an unexpected instance record for {int(instance_id)}", kind="bad_response")
        return found

    def list_instances(self, *, label: str | None = None, instance_id: int | None = None) -> list[dict]:
        """Every instance of the account (or those with this label / id), all pages of the v1 list.

        A page that fails raises VastAIError: the caller never sees part of the list as the
        whole. Only when vast.ai has no v1 list (404) does it read the deprecated v0 list."""
        filters = {}
        if label is not None:
            filters["label"] = {"eq": label}
        if instance_id is not None:
            filters["id"] = {"eq": int(instance_id)}
        params = {"limit": LIST_PAGE_SIZE, "select_cols": json.dumps(["*"]),
                  "order_by": json.dumps([{"col": "id", "dir": "asc"}])}
        if filters:
            params["select_filters"] = json.dumps(filters)
        path, found, seen_tokens = "/instances/", [], set()
        for page in range(LIST_MAX_PAGES):
            try:
                resp = self._request("GET", path, what="the instance list", idempotent=True, params=params, base=self.v1_url)
            except VastAIError as exc:
                if page == 0 and exc.kind == "not_found":
                    return self._list_instances_v0(label=label, instance_id=instance_id)
                raise
            body = self._json(resp, "GET", path)
            instances = body.get("instances")
            if not isinstance(instances, list):
                raise self._error("vast.ai's instance list answer has no instance list", kind="bad_response")
            found.extend(i for i in instances if isinstance(i, dict))
            token = body.get("next_token")
            if not token:
                return found
            if token in seen_tokens:
                raise self._error("vast.ai's instance list sent the same page token twice", kind="bad_response")
            seen_tokens.add(token)
            params["after_token"] = token
        raise self._error(f"vast.ai's instance list has more than {LIST_MAX_PAGES} pages", kind="bad_response")

    def _list_instances_v0(self, *, label=None, instance_id=None) -> list[dict]:
        path = "/instances/"
        resp = self._request("GET", path, what="the instance list", idempotent=True, params={"owner": "me"})
        body = self._json(resp, "GET", path)
        instances = body.get("instances")
        if not isinstance(instances, list):
            raise self._error("vast.ai's instance list answer has no instance list", kind="bad_response")
        return [i for i in instances if isinstance(i, dict) and (label is None or i.get("label") == label)
                and (instance_id is None or i.get("id") == int(instance_id))]

    def destroy_instance(self, instance_id) -> bool:
        """Destroy an instance (billing stops). True if destroyed now, False if vast.ai no longer knows it."""
        path = f"/instances/{int(instance_id)}/"
        try:
            resp = self._request("DELETE", path, what=f"instance {int(instance_id)}", idempotent=True, json={})
        except VastAIError as exc:
            if exc.kind == "not_found":
                return False
            raise
        try:
            body = resp.json()
        except ValueError:
            return True  # a 2xx without JSON still means it was accepted
        if isinstance(body, dict) and body.get("success") is False:
            if "not_found" in str(body.get("error") or "") or "no_such_instance" in str(body.get("error") or ""):
                return False
            self._check_success(body, f"destroying instance {int(instance_id)}")
        return True

    def _manage(self, instance_id, payload, what):
        path = f"/instances/{int(instance_id)}/"
        resp = self._request("PUT", path, what=what, idempotent=True, json=payload)
        body = self._json(resp, "PUT", path)
        self._check_success(body, what)
        return body

    def set_state(self, instance_id, state) -> None:
        """Stop ("stopped": GPU billing stops, storage is still billed) or start ("running") an instance."""
        if state not in ("running", "stopped"):
            raise VastAIError(f"state must be 'running' or 'stopped', not {state!r}", kind="invalid")
        self._manage(instance_id, {"state": state}, f"setting instance {int(instance_id)} to {state}")

    def set_label(self, instance_id, label) -> None:
        if label is not None and len(label) > LABEL_SET_MAX:
            raise VastAIError(f"label is {len(label)} characters; vast.ai allows at most {LABEL_SET_MAX}", kind="invalid")
        self._manage(instance_id, {"label": label}, f"relabelling instance {int(instance_id)}")

    def current_user(self) -> dict:
        """The account behind the key (GET /users/current/): a cheap check that the key works; includes `credit`."""
        path = "/users/current/"
        resp = self._request("GET", path, what="the account", idempotent=True)
        return self._json(resp, "GET", path)
