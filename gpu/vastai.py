"""The one client for vast.ai's REST API (the calls vast-cli makes).

Every failure is a VastAIError whose str() a person can act on and whose `kind`
code can branch on. The API key travels only in the Authorization header and never
into a message or a log line.

Idempotent calls (GET, DELETE, PUT state/label, and the read-only offer search) are
retried a bounded number of times on 429/502/503/504 and connection failures,
honouring Retry-After. Creating an instance is never retried: a lost answer may
still have rented a machine, so the caller looks for the label before trying again.
"""

import email.utils
import logging
import math
import socket
import time
from urllib.parse import urlsplit

import httpx

from gpu import netguard

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
AUTH_MESSAGE = "vast.ai rejected the API key: check VASTAI_API_KEY"
RETRY_STATUSES = {429, 502, 503, 504}
ENV_VALUE_MAX = 256
ENV_TOTAL_MAX = 32768
ONSTART_MAX = 4096
LABEL_MAX = 256
LABEL_SET_MAX = 1024
DISK_MIN_GB = 8
RUNTYPES = {"ssh", "ssh_proxy", "ssh_direct", "jupyter", "jupyter_proxy", "jupyter_direct", "args"}
# actual_status values from which an instance "will never reach running" (hello-world.mdx).
DEAD_STATUSES = frozenset({"exited", "unknown", "offline"})


class VastAIError(Exception):
    """kind: auth, rate_limited, quota, offer_gone, invalid, not_found, unreachable, timeout, bad_response, http."""

    def __init__(self, message, *, kind="error", status=None, retryable=False, retry_after=None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def __str__(self):
        return self.message


def _snippet(text, limit=200) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit] + "…"


def _causes(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _body_fields(resp) -> tuple[str, str]:
    """(error code, human message) of a vast.ai error answer, JSON or plain text."""
    try:
        body = resp.json()
    except ValueError:
        return "", _snippet(resp.text)
    if not isinstance(body, dict):
        return "", _snippet(str(body))
    code = body.get("error")
    message = body.get("msg") or body.get("message") or body.get("detail") or ""
    return (code if isinstance(code, str) else ""), _snippet(message if isinstance(message, str) else str(message))


def port_url_of(instance: dict, port: int) -> str | None:
    """http://{public_ipaddr}:{HostPort} of a container port while the instance runs; else None."""
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
            return f"http://{host}:{int(str(host_port).strip())}"
    return None


def comfyui_url_of(instance: dict) -> str | None:
    """The direct ComfyUI URL (the Caddy edge on 8188, which wants the bearer token) of a running instance."""
    return port_url_of(instance, 8188)


def portal_url_of(instance: dict) -> str | None:
    """The Instance Portal URL (1111), where the Cloudflare tunnel URLs can be read."""
    return port_url_of(instance, 1111)


class VastAIClient:
    def __init__(self, api_key, base_url=DEFAULT_BASE_URL, *, connect_timeout=5.0, read_timeout=30.0, retries=3, backoff=0.5,
                 max_retry_wait=30.0, http_client=None):
        if not api_key or not str(api_key).strip():
            raise VastAIError("No vast.ai API key is configured: set VASTAI_API_KEY", kind="auth")
        self._api_key = str(api_key).strip()
        self.base_url = (base_url or DEFAULT_BASE_URL).strip().rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        # A Retry-After longer than this is not waited out inside a call: the error says how long to wait.
        self.max_retry_wait = max_retry_wait
        self._timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else netguard.http_client(timeout=self._timeout, follow_redirects=False)
        self._sleep = time.sleep  # tests may replace it to observe waits

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._owns_http:
            self._http.close()

    def __repr__(self):
        return f"<VastAIClient {self.where}>"

    @property
    def where(self) -> str:
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"

    # ------------------------------------------------------------------ plumbing

    def _safe(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key in text else text

    def _error(self, message, **kwargs) -> VastAIError:
        return VastAIError(self._safe(message), **kwargs)

    def _transport_error(self, exc, method, path, *, creating=False) -> VastAIError:
        reason = netguard.blocked_reason(exc)
        if reason is not None:
            return self._error(f"Cannot reach vast.ai at {self.where}: {reason} (check VASTAI_API_URL)", kind="unreachable")
        if isinstance(exc, httpx.ConnectTimeout):
            return self._error(f"Cannot reach vast.ai at {self.where}: connection timed out after {self.connect_timeout}s", kind="unreachable", retryable=True)
        if isinstance(exc, httpx.TimeoutException):
            if creating:
                return self._error(
                    f"vast.ai did not answer the create request within {self.read_timeout}s; an instance may have been created anyway: "
                    "look for its label in the instance list before trying again",
                    kind="timeout",
                )
            return self._error(f"vast.ai did not answer {method} {path} within {self.read_timeout}s", kind="timeout", retryable=True)
        if isinstance(exc, httpx.ConnectError):
            return self._error(f"Cannot reach vast.ai at {self.where}: {self._connect_reason(exc)}", kind="unreachable", retryable=True)
        if creating:
            return self._error(
                f"The connection to vast.ai broke during the create request ({type(exc).__name__}); an instance may have been "
                "created anyway: look for its label in the instance list before trying again",
                kind="unreachable",
            )
        return self._error(f"The connection to vast.ai broke during {method} {path} ({type(exc).__name__})", kind="unreachable", retryable=True)

    @staticmethod
    def _connect_reason(exc) -> str:
        for cause in _causes(exc):
            if isinstance(cause, socket.gaierror):
                return "DNS lookup failed (check VASTAI_API_URL and the network)"
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "getaddrinfo" in text or "name resolution" in text:
            return "DNS lookup failed (check VASTAI_API_URL and the network)"
        if "ssl" in text or "certificate" in text:
            return "TLS handshake failed"
        return f"connection failed ({type(exc).__name__})"

    def _status_error(self, resp, method, path, what) -> VastAIError:
        status = resp.status_code
        code, message = _body_fields(resp)
        detail = f": {message}" if message else ""
        if status in (401, 403):
            extra = "" if status == 401 else " (or the key lacks the permission for this call)"
            return self._error(AUTH_MESSAGE + extra, kind="auth", status=status)
        if status == 429:
            wait = _retry_after(resp.headers)
            if code == "search_quota_exceeded":
                when = f"; it resets in about {wait / 3600:.1f} h (UTC midnight)" if wait else " (it resets at UTC midnight)"
                return self._error(f"vast.ai's daily offer-search quota is used up{when}; try again later", kind="quota", status=429, retry_after=wait)
            later = f"; retry in {wait:.0f}s" if wait else "; wait a little and retry"
            return self._error(f"vast.ai is rate-limiting {what}{detail}{later}", kind="rate_limited", status=429, retryable=True, retry_after=wait)
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

    def _delay(self, error, attempt) -> float:
        delay = min(self.backoff * (2**attempt), 10.0)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    def _request(self, method, path, *, what, idempotent, json=None, params=None) -> httpx.Response:
        """One API call, retried with backoff when idempotent. Returns a 2xx response or raises VastAIError."""
        attempts = 1 + (self.retries if idempotent else 0)
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        for attempt in range(attempts):
            try:
                resp = self._http.request(method, self.base_url + path, json=json, params=params, headers=headers, timeout=self._timeout)
            except httpx.HTTPError as exc:
                error = self._transport_error(exc, method, path, creating=not idempotent)
            else:
                if resp.status_code < 300:
                    return resp
                error = self._status_error(resp, method, path, what)
            if not error.retryable or not idempotent or attempt == attempts - 1:
                raise error
            delay = self._delay(error, attempt)
            if delay > self.max_retry_wait:
                raise error
            log.warning("vast.ai %s %s failed (%s); retry %d/%d in %.2fs", method, path, error, attempt + 1, self.retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _json(self, resp, method, path, expect=dict):
        try:
            body = resp.json()
        except ValueError:
            raise self._error(
                f"vast.ai sent a non-JSON answer to {method} {path} ({resp.headers.get('content-type', 'no content type')}): "
                f"{_snippet(resp.text, 120)!r}; is VASTAI_API_URL right?",
                kind="bad_response", status=resp.status_code,
            ) from None
        if not isinstance(body, expect):
            raise self._error(f"vast.ai sent an unexpected answer to {method} {path}: {_snippet(body, 120)}", kind="bad_response", status=resp.status_code)
        return body

    def _check_success(self, body, what):
        if body.get("success") is False:
            code, message = body.get("error") or "", body.get("msg") or body.get("message") or ""
            raise self._error(f"vast.ai refused {what}: {_snippet(message or code or 'no reason given')}", kind="invalid")

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
            raise self._error(f"vast.ai's offer search answer has no offer list: {_snippet(body, 120)}", kind="bad_response")
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
        resp = self._request("PUT", path, what=f"creating an instance on offer {int(offer_id)}", idempotent=False, json=payload)
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

    def list_instances(self) -> list[dict]:
        """Every instance of the account (legacy list, which carries the Docker-style port mappings)."""
        path = "/instances/"
        resp = self._request("GET", path, what="the instance list", idempotent=True, params={"owner": "me"})
        body = self._json(resp, "GET", path)
        instances = body.get("instances")
        if not isinstance(instances, list):
            raise self._error("vast.ai's instance list answer has no instance list", kind="bad_response")
        return [i for i in instances if isinstance(i, dict)]

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
