"""The vast.ai GPU lifecycle: rent, wait for, hand to jobs, reap, reconcile and destroy.

Every instance is a VastInstance row first and a vast.ai rental second: the row is
reserved (under a lock on the GpuConfig row, so two workers never rent past
`max_instances`) before `PUT /asks/{offer}/`, and the rental carries the label
`i2v:<row uuid>`. Whatever goes wrong between the two, the reconciler can tie a
rented machine back to its row, or destroy it.

States (VastInstance.State): creating (rented, vast.ai has not started it) →
loading (vast.ai is pulling/booting, or the container runs but ComfyUI is not ready)
→ running (ComfyUI answers /system_stats with the instance's WEB_PASSWORD and the
default workflow's model files are present) → destroying → destroyed. A boot that
fails ends `failed` with `destroyed_at` set once the rental is gone; a `failed` row
without `destroyed_at` may still exist on vast.ai and the reconciler destroys it.

Models reach the instance like this (vast.ai allows env values of at most 256
characters and an onstart of at most 4096): a bash provisioning script is generated
from the manifest (the ModelFile rows of the default workflow): it installs
ComfyUI-GGUF if missing and downloads each model from R2 by a presigned URL into
`ComfyUI/models/<folder>/`, checking size and sha256 when known and skipping files
already there. The vast.ai base image runs `/provisioning.sh` once at boot while its
portal serves the "not ready" placeholder (env `PROVISIONING_SCRIPT` must be set, and
an existing /provisioning.sh is not downloaded again). When the script fits, onstart
writes it inline; when the presigned URLs make it too long (the usual case: one R2
presigned URL is ~500 characters), the script is stored as a short-lived R2 object
(`i2v/provisioning/<uuid>.sh`, deleted once the instance is ready or destroyed) and
onstart downloads it by a single presigned URL. Either way onstart ends by starting
the image's usual `entrypoint.sh`.
"""

import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from gpu import r2
from gpu.comfyui import ComfyUIClient, ComfyUIError
from gpu.models import BadMachine, GpuConfig, VastInstance
from gpu.vastai import DEAD_STATUSES, ONSTART_MAX, VastAIClient, VastAIError, comfyui_url_of, portal_url_of

log = logging.getLogger(__name__)
St = VastInstance.State
Origin = VastInstance.Origin

LABEL_PREFIX = "i2v:"
MAX_BOOT_ATTEMPTS = 3  # rentals per need before giving up (dead machines are replaced)
MAX_OFFER_TRIES = 5  # offers tried when the cheapest ones are rented away under us
BAD_MACHINE_DAYS = 7
POLL_MIN, POLL_MAX = 2.0, 30.0
RATE_LIMIT_WAIT = 10.0  # seconds to wait after a 429 that gave no Retry-After
MODELS_GRACE = 120  # seconds ComfyUI may answer while model files are still missing
ORPHAN_GRACE = 120  # seconds before a rental missing from vast.ai's list is believed gone
STALE_WAIT = 180  # seconds without a status check before the reconciler restarts the wait task
TRANSIENT_GRACE = 600  # seconds a job waits through vast.ai outages before it fails
SPEND_HORIZON_HOURS = Decimal(1)  # a new instance is assumed to run at least this long
PORTAL_CONFIG = "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI"
COMFYUI_ARGS = "--disable-auto-launch --port 18188 --enable-cors-header"
PROVISIONING_PATH = "/provisioning.sh"
PROVISIONING_PREFIX = "i2v/provisioning/"
COMFYUI_GGUF = "https://github.com/city96/ComfyUI-GGUF"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SAFE_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
NO_KEY = ("vast.ai is not configured: set VASTAI_API_KEY (an API key from https://cloud.vast.ai/manage-keys/) "
          "and restart the server and the worker.")


class ProvisioningError(Exception):
    """A GPU could not be rented, readied or destroyed; str() says what to do.

    `status` is the HTTP code the API answers with; `transient` errors (vast.ai
    unreachable, rate-limited) are worth retrying later."""

    def __init__(self, message, *, status=409, transient=False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.transient = transient

    def __str__(self):
        return self.message


@dataclass
class Step:
    """One look at a booting instance: done (ready, failed or gone), else wait `delay` seconds."""

    done: bool
    delay: float = 0.0
    message: str = ""


# ---------------------------------------------------------------------- vast.ai plumbing


def vast_client(*, retries=3) -> VastAIClient:
    if not settings.VASTAI_API_KEY:
        raise ProvisioningError(NO_KEY, status=503)
    return VastAIClient(settings.VASTAI_API_KEY, settings.VASTAI_API_URL, retries=retries,
                        backoff=settings.VASTAI_RETRY_BACKOFF)


def _vast_error(exc: VastAIError, doing: str) -> ProvisioningError:
    if exc.kind in ("unreachable", "timeout", "rate_limited", "quota", "http", "bad_response"):
        return ProvisioningError(f"{doing}: {exc}", status=503, transient=exc.kind != "quota")
    if exc.kind == "auth":
        return ProvisioningError(f"{doing}: {exc}", status=503)
    return ProvisioningError(f"{doing}: {exc}", status=409)


def _comfy(url, token) -> ComfyUIClient:
    return ComfyUIClient(url, token=token or None, connect_timeout=5.0, read_timeout=10.0, retries=0)


# ---------------------------------------------------------------------- offers


def policy_filters(config) -> dict:
    """GpuConfig's GPU policy as VastAIClient.search_offers keyword arguments."""
    return {
        "min_vram_gb": config.min_vram_gb or None,
        "gpu_names": [n.strip() for n in (config.gpu_names or "").split(",") if n.strip()],
        "max_dph": float(config.max_dph) if config.max_dph else None,
        "min_reliability": config.min_reliability or None,
        "min_inet_down": config.min_inet_down_mbps or None,
        "verified": config.verified_only,
        "min_direct_ports": config.min_direct_ports or None,
        "disk_gb": config.disk_gb,
    }


def policy_text(config) -> str:
    parts = [f"≥ {config.min_vram_gb} GB VRAM"]
    if config.gpu_names.strip():
        parts.append(f"GPU one of {config.gpu_names.strip()}")
    if config.max_dph:
        parts.append(f"≤ ${config.max_dph:.2f}/h")
    if config.min_reliability:
        parts.append(f"reliability ≥ {config.min_reliability}")
    if config.min_inet_down_mbps:
        parts.append(f"≥ {config.min_inet_down_mbps} Mbps down")
    if config.verified_only:
        parts.append("verified hosts")
    if config.min_direct_ports:
        parts.append(f"≥ {config.min_direct_ports} direct ports")
    parts.append(f"{config.disk_gb} GB disk")
    return ", ".join(parts)


def bad_machines(now=None) -> list[int]:
    since = (now or timezone.now()) - timedelta(days=BAD_MACHINE_DAYS)
    return list(BadMachine.objects.filter(created_at__gte=since).values_list("machine_id", flat=True))


def search_offers(*, limit=10, config=None, **overrides) -> list[dict]:
    """The cheapest offers matching the GPU policy (overrides replace policy fields), bad machines left out."""
    config = config or GpuConfig.get()
    filters = policy_filters(config)
    filters.update({key: value for key, value in overrides.items() if value is not None})
    with vast_client() as client:
        try:
            return client.search_offers(limit=limit, exclude_machines=bad_machines(), **filters)
        except VastAIError as exc:
            raise _vast_error(exc, "Searching vast.ai offers failed") from None


def offer_json(offer: dict) -> dict:
    gpu_ram = offer.get("gpu_ram") or 0
    return {
        "id": offer.get("id"),
        "gpu_name": offer.get("gpu_name") or "",
        "num_gpus": offer.get("num_gpus") or 1,
        "vram_gb": round(gpu_ram / 1024, 1) if gpu_ram else None,
        "dph": round(float(offer.get("dph_total") or 0), 4),
        "reliability": offer.get("reliability2", offer.get("reliability")),
        "location": offer.get("geolocation") or "",
        "inet_down": offer.get("inet_down"),
        "machine_id": offer.get("machine_id"),
        "verified": offer.get("verification") == "verified",
    }


# ---------------------------------------------------------------------- money


def spend_today(now=None) -> Decimal:
    """What vast.ai rentals have cost since midnight UTC: $/hour × time rented today."""
    now = now or timezone.now()
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    total = Decimal(0)
    rows = VastInstance.objects.filter(vast_id__isnull=False, created_at__lt=now).filter(
        Q(destroyed_at__isnull=True) | Q(destroyed_at__gt=start))
    for inst in rows:
        begin, end = max(inst.created_at, start), min(inst.destroyed_at or now, now)
        if end > begin:
            total += inst.dph_total * Decimal((end - begin).total_seconds()) / Decimal(3600)
    return total.quantize(Decimal("0.0001"))


def _check_spend(config, dph, now=None):
    spent = spend_today(now)
    dph = Decimal(str(dph or 0))
    if spent + dph * SPEND_HORIZON_HOURS > config.max_daily_spend:
        raise ProvisioningError(
            f"Daily spend cap: ${spent:.2f} already spent on vast.ai today (UTC) of the ${config.max_daily_spend:.2f} "
            f"cap, and a new instance at ${dph:.3f}/h for an hour would pass it. Raise max_daily_spend "
            "(admin → GPU configuration) or wait until midnight UTC.",
            status=409,
        )


def _save_cost(instance, now=None):
    cost = instance.accrued_cost(now)
    VastInstance.objects.filter(pk=instance.pk).update(cost_usd=cost)
    instance.cost_usd = cost


# ---------------------------------------------------------------------- the onstart script


def manifest(config=None) -> list:
    """The ModelFile rows an instance must have: those of the default workflow."""
    from generation.models import Workflow

    config = config or GpuConfig.get()
    wf = Workflow.objects.filter(slug=config.default_workflow).first()
    return list(wf.model_files.order_by("folder", "filename")) if wf else []


def _quote(value: str) -> str:
    if "'" in value:
        raise ProvisioningError(f"Cannot put {value[:40]!r} in a shell script (it contains a quote).")
    return f"'{value}'"


def provisioning_script(models, urls: dict) -> str:
    """The bash script an instance runs once at boot: ComfyUI-GGUF, then each model (urls: name → URL)."""
    lines = [
        "#!/bin/bash",
        "# i2v provisioning (generated): ComfyUI-GGUF if missing, then each model file of the manifest",
        "# from R2, size and sha256 checked when known; files already there are kept.",
        "set -u",
        'COMFY=""',
        'for d in "${COMFYUI_DIR:-}" "${WORKSPACE:-/workspace}/ComfyUI" /opt/workspace-internal/ComfyUI /workspace/ComfyUI; do',
        '  if [ -n "$d" ] && [ -d "$d" ]; then COMFY="$d"; break; fi',
        "done",
        '[ -n "$COMFY" ] || { echo "i2v: ComfyUI directory not found"; exit 1; }',
        'PIP=pip; [ -x /venv/main/bin/pip ] && PIP=/venv/main/bin/pip',
        'if [ ! -d "$COMFY/custom_nodes/ComfyUI-GGUF" ]; then',
        f'  git clone --depth 1 {COMFYUI_GGUF} "$COMFY/custom_nodes/ComfyUI-GGUF" &&',
        '    "$PIP" install -q -r "$COMFY/custom_nodes/ComfyUI-GGUF/requirements.txt" || { echo "i2v: ComfyUI-GGUF install failed"; exit 1; }',
        "fi",
        "failed=0",
        "fetch() {",
        '  local url="$1" rel="$2" size="$3" sha="$4" dest="$COMFY/models/$2"',
        '  if [ -f "$dest" ] && { [ -z "$size" ] || [ "$(stat -c %s "$dest")" = "$size" ]; }; then',
        '    echo "i2v: $rel is already there"; return 0',
        "  fi",
        '  mkdir -p "$(dirname "$dest")"',
        '  echo "i2v: downloading $rel"',
        '  curl -fL --retry 5 --retry-delay 5 --retry-all-errors -C - -o "$dest.part" "$url" ||',
        '    { echo "i2v: download of $rel failed"; return 1; }',
        '  if [ -n "$size" ] && [ "$(stat -c %s "$dest.part")" != "$size" ]; then',
        '    echo "i2v: $rel has the wrong size"; rm -f "$dest.part"; return 1',
        "  fi",
        '  if [ -n "$sha" ] && ! echo "$sha  $dest.part" | sha256sum -c --status; then',
        '    echo "i2v: $rel has the wrong sha256"; rm -f "$dest.part"; return 1',
        "  fi",
        '  mv -f "$dest.part" "$dest"',
        "}",
    ]
    for model in models:
        if not SAFE_NAME.match(model.folder or "") or not SAFE_NAME.match(model.filename or ""):
            raise ProvisioningError(f"Model {model.name}: folder {model.folder!r} and file name {model.filename!r} may only "
                                    "contain letters, digits and . _ + - (fix it in admin → Model files).")
        sha = model.sha256 or ""
        if sha and not SAFE_HEX.match(sha):
            raise ProvisioningError(f"Model {model.name}: sha256 {sha[:20]!r}… is not 64 hex digits.")
        size = str(model.size) if model.size else ""
        lines.append(f"fetch {_quote(urls[model.name])} {_quote(f'{model.folder}/{model.filename}')} "
                     f"{_quote(size)} {_quote(sha.lower())} || failed=1")
    lines.append('[ "$failed" = 0 ] && echo "i2v: provisioning complete"')
    lines.append('exit "$failed"')
    return "\n".join(lines) + "\n"


def _inline_onstart(script: str) -> str:
    return (
        "#!/bin/bash\n"
        "# i2v: write the provisioning script the base image runs at boot, then boot as usual.\n"
        f"cat > {PROVISIONING_PATH} <<'I2V_PROVISIONING'\n{script}I2V_PROVISIONING\n"
        f"chmod +x {PROVISIONING_PATH}\n"
        "entrypoint.sh\n"
    )


def _fetching_onstart(url: str) -> str:
    return (
        "#!/bin/bash\n"
        "# i2v: fetch this instance's provisioning script (a short-lived R2 object), then boot as usual.\n"
        f"[ -s {PROVISIONING_PATH} ] || curl -fsSL --retry 5 --retry-delay 5 -o {PROVISIONING_PATH} {_quote(url)}\n"
        f"chmod +x {PROVISIONING_PATH}\n"
        "entrypoint.sh\n"
    )


def url_lifetime(config) -> int:
    """Seconds the presigned URLs stay valid: the whole boot window plus an hour."""
    return config.boot_timeout_minutes * 60 + 3600


def _require_r2_for(models, config):
    if models and not r2.configured():
        raise ProvisioningError(
            f"The workflow {config.default_workflow!r} needs {len(models)} model file(s), which vast.ai instances download "
            "from R2: set R2_BUCKET, R2_ENDPOINT_URL (or R2_ACCOUNT_ID), R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY, "
            "then run `python manage.py upload_models_to_r2`.",
            status=409,
        )


def build_onstart(instance, config, models=None) -> tuple[str, str]:
    """(onstart, R2 key of the stored script or ""). See the module docstring for the choice."""
    models = manifest(config) if models is None else models
    _require_r2_for(models, config)
    lifetime = url_lifetime(config)
    urls = {}
    s3 = r2.client() if models else None
    for model in models:
        urls[model.name] = r2.presigned_get(model.r2_key, lifetime, s3=s3)
    script = provisioning_script(models, urls)
    inline = _inline_onstart(script)
    if len(inline) <= ONSTART_MAX:
        return inline, ""
    key = f"{PROVISIONING_PREFIX}{instance.id}.sh"
    try:
        r2.put_text(key, script, s3=s3)
        url = r2.presigned_get(key, lifetime, s3=s3)
    except r2.R2Error as exc:
        raise ProvisioningError(f"Could not store the provisioning script in R2: {exc}", status=503, transient=True) from None
    onstart = _fetching_onstart(url)
    if len(onstart) > ONSTART_MAX:
        raise ProvisioningError(f"The onstart script is {len(onstart)} characters; vast.ai allows {ONSTART_MAX}.")
    return onstart, key


def instance_env(instance) -> dict:
    """The container environment: the portal's ports, the per-instance password, the provisioning hook."""
    return {
        "-p 1111:1111": "1",
        "-p 8188:8188": "1",
        "OPEN_BUTTON_PORT": "1111",
        "OPEN_BUTTON_TOKEN": "1",
        "WEB_PASSWORD": instance.web_password,
        "PORTAL_CONFIG": PORTAL_CONFIG,
        "COMFYUI_ARGS": COMFYUI_ARGS,
        # Any value makes the base image run /provisioning.sh; onstart has already put it there.
        "PROVISIONING_SCRIPT": f"file://{PROVISIONING_PATH}",
    }


def _drop_provisioning_script(instance):
    if not instance.provisioning_key or not r2.configured():
        return
    try:
        r2.delete(instance.provisioning_key)
    except r2.R2Error as exc:
        log.warning("could not delete %s: %s", instance.provisioning_key, exc)
        return
    VastInstance.objects.filter(pk=instance.pk).update(provisioning_key="")
    instance.provisioning_key = ""


# ---------------------------------------------------------------------- create


def _offer_fields(offer) -> dict:
    return {
        "offer_id": offer["id"],
        "machine_id": offer.get("machine_id"),
        "gpu_name": (offer.get("gpu_name") or "")[:100],
        "num_gpus": offer.get("num_gpus") or 1,
        "gpu_ram_mb": offer.get("gpu_ram"),
        "dph_total": Decimal(str(round(float(offer.get("dph_total") or 0), 4))),
    }


def _at_cap_message(config, live) -> str:
    if config.max_instances == 0:
        return "max_instances is 0, so vast.ai rentals are switched off: raise it in admin → GPU configuration."
    return (f"At the limit of {config.max_instances} vast.ai instance(s) (max_instances): {live} running or starting. "
            "Destroy one or raise max_instances in admin → GPU configuration.")


def _reserve(config, offer, *, user, origin, attempt, live_below):
    """The row for a new rental, made under a lock so concurrent workers never pass max_instances.

    None when `live_below` is given and that many instances are already live (another
    worker just started what this one wanted)."""
    with transaction.atomic():
        GpuConfig.objects.select_for_update().filter(pk=config.pk).first()
        live = VastInstance.objects.filter(state__in=VastInstance.LIVE).count()
        if live_below is not None and live >= live_below:
            return None
        if live >= config.max_instances:
            raise ProvisioningError(_at_cap_message(config, live), status=409)
        _check_spend(config, offer.get("dph_total"))
        return VastInstance.objects.create(
            web_password=secrets.token_urlsafe(24), origin=origin, created_by=user, attempt=attempt,
            status_msg="Renting a GPU on vast.ai", **_offer_fields(offer),
        )


def _candidates(client, config, offer_id) -> list[dict]:
    bad = bad_machines()
    try:
        offers = client.search_offers(limit=20 if offer_id is None else 200, exclude_machines=bad, **policy_filters(config))
    except VastAIError as exc:
        raise _vast_error(exc, "Searching vast.ai offers failed") from None
    if offer_id is not None:
        offers = [o for o in offers if o.get("id") == int(offer_id)]
        if not offers:
            raise ProvisioningError(f"Offer {offer_id} is not available or does not match the GPU policy "
                                    f"({policy_text(config)}); pick one from GET /api/vastai/offers.", status=409)
    if not offers:
        skipped = f"; {len(bad)} machine(s) where instances died in the last {BAD_MACHINE_DAYS} days are skipped" if bad else ""
        raise ProvisioningError(f"No vast.ai offer matches the GPU policy ({policy_text(config)}{skipped}); widen it in "
                                "admin → GPU configuration or try again later.", status=409)
    return offers


def create_instance(*, offer_id=None, user=None, origin=Origin.MANUAL, attempt=1, live_below=None) -> VastInstance | None:
    """Rent a GPU: the given offer, else the cheapest matching the policy (the next one if it is gone).

    Returns the new `creating` row; its wait task is enqueued on commit. Raises
    ProvisioningError (no API key, at max_instances, spend cap, no offer, vast.ai
    refused or unreachable). With `live_below`, returns None instead of renting when
    that many instances are already live.
    """
    config = GpuConfig.get()
    with vast_client() as client:
        live = VastInstance.objects.filter(state__in=VastInstance.LIVE).count()
        if live_below is not None and live >= live_below:
            return None
        if live >= config.max_instances:
            raise ProvisioningError(_at_cap_message(config, live), status=409)
        _require_r2_for(manifest(config), config)
        offers = _candidates(client, config, offer_id)
        _check_spend(config, offers[0].get("dph_total"))
        instance = _reserve(config, offers[0], user=user, origin=origin, attempt=attempt, live_below=live_below)
        if instance is None:
            return None
        try:
            return _rent(client, config, instance, offers)
        except ProvisioningError as exc:
            _abandon(instance, str(exc))
            raise
        except Exception as exc:
            _abandon(instance, f"Renting failed unexpectedly: {type(exc).__name__}")
            raise


def _rent(client, config, instance, offers) -> VastInstance:
    onstart, key = build_onstart(instance, config)
    if key:
        VastInstance.objects.filter(pk=instance.pk).update(provisioning_key=key)
        instance.provisioning_key = key
    env = instance_env(instance)
    image = None if config.template_hash else config.docker_image
    gone = []
    for offer in offers[:MAX_OFFER_TRIES]:
        if offer is not offers[0]:
            _check_spend(config, offer.get("dph_total"))
            fields = _offer_fields(offer)
            VastInstance.objects.filter(pk=instance.pk).update(**fields)
            for name, value in fields.items():
                setattr(instance, name, value)
        try:
            created = client.create_instance(offer["id"], image=image, template_hash=config.template_hash or None,
                                             disk_gb=config.disk_gb, env=env, onstart=onstart, label=instance.label)
        except VastAIError as exc:
            if exc.kind == "offer_gone":
                log.info("vast.ai offer %s is gone; trying the next one", offer["id"])
                gone.append(offer["id"])
                continue
            if exc.kind in ("timeout", "unreachable", "http", "bad_response"):
                # The answer was lost, not necessarily the rental: look for our label.
                adopted = _adopt_by_label(client, instance)
                if adopted is not None:
                    return adopted
            raise _vast_error(exc, f"Renting offer {offer['id']} failed") from None
        VastInstance.objects.filter(pk=instance.pk).update(
            vast_id=created["id"],
            status_msg=f"Rented offer {offer['id']} ({instance.gpu_name}, ${instance.dph_total:.3f}/h); vast.ai is starting it",
        )
        instance.refresh_from_db()
        log.info("rented vast.ai instance %s (offer %s, %s, $%s/h) for %s", created["id"], offer["id"], instance.gpu_name,
                 instance.dph_total, instance.label)
        _enqueue_wait(instance.pk)
        return instance
    raise ProvisioningError(f"The {len(gone)} cheapest matching offers were rented by someone else first "
                            f"({', '.join(map(str, gone))}); try again.", status=409, transient=True)


def _adopt_by_label(client, instance) -> VastInstance | None:
    try:
        listed = client.list_instances()
    except VastAIError:
        return None  # the reconciler ties it up later by its label
    found = next((i for i in listed if i.get("label") == instance.label), None)
    if found is None or not isinstance(found.get("id"), int):
        return None
    VastInstance.objects.filter(pk=instance.pk).update(vast_id=found["id"], status_msg="Rented; vast.ai is starting it")
    instance.refresh_from_db()
    _enqueue_wait(instance.pk)
    return instance


def _abandon(instance, message):
    """A reservation that rented nothing: failed, and gone (destroyed_at) as far as we know."""
    instance.refresh_from_db()
    if instance.state in VastInstance.BOOTING and instance.vast_id is None:
        instance.transition(St.FAILED, error=message[:4000], status_msg="Nothing was rented", destroyed_at=timezone.now())
        _drop_provisioning_script(instance)


def _enqueue_wait(instance_id):
    from django_q.tasks import async_task

    transaction.on_commit(lambda: async_task("gpu.tasks.wait_for_instance", str(instance_id), group="gpu"))


# ---------------------------------------------------------------------- wait until ready


def _poll_delay(instance, now) -> float:
    """Backoff by age: every 2 s at first, every 30 s for an instance booting for 10 minutes."""
    elapsed = (now - instance.created_at).total_seconds()
    return min(POLL_MAX, max(POLL_MIN, elapsed / 20))


def _update(instance, **fields):
    VastInstance.objects.filter(pk=instance.pk).update(**fields)
    for name, value in fields.items():
        setattr(instance, name, value)


def _note(instance, **fields) -> bool:
    """Record what the wait step saw, unless the instance stopped booting meanwhile (e.g. an operator destroyed it)."""
    won = VastInstance.objects.filter(pk=instance.pk, state__in=VastInstance.BOOTING).update(**fields) == 1
    if won:
        for name, value in fields.items():
            setattr(instance, name, value)
    return won


def _list_entry(vast_id) -> dict | None:
    """The instance from the legacy list, which carries the port mappings the by-id answer may lack."""
    try:
        with vast_client(retries=0) as client:
            return next((i for i in client.list_instances() if i.get("id") == vast_id), None)
    except (VastAIError, ProvisioningError):
        return None


def tunnel_url(portal_url, token) -> str | None:
    """The Cloudflare quick-tunnel URL of ComfyUI (port 8188), read from the instance portal."""
    from gpu import netguard

    import httpx

    try:
        with netguard.http_client(timeout=httpx.Timeout(10.0, connect=5.0), follow_redirects=False) as http:
            resp = http.get(f"{portal_url}/get-all-quick-tunnels", headers={"Authorization": f"Bearer {token}"})
        tunnels = resp.json() if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        return None
    for entry in tunnels if isinstance(tunnels, list) else []:
        if isinstance(entry, dict) and str(entry.get("targetUrl", "")).rstrip("/").endswith(":8188"):
            url = str(entry.get("tunnelUrl") or "").rstrip("/")
            if url.startswith(("https://", "http://")):
                return url
    return None


def wait_until_ready(instance) -> Step:
    """One look at a booting instance (the wait task calls this with pauses in between).

    Polls vast.ai (a 429 is honoured: the step says how long to wait), records the
    state, and once the container runs checks ComfyUI at public_ipaddr:HostPort(8188)
    with Bearer WEB_PASSWORD (or the portal's tunnel when the direct port does not
    answer). Ready only when /system_stats answers and the default workflow's model
    files are present. A dead machine (exited/offline/unknown) is destroyed, remembered
    and replaced on another machine; past the boot timeout the instance is destroyed
    and ends `failed`.
    """
    instance.refresh_from_db()
    if instance.state not in VastInstance.BOOTING:
        return Step(True, message=f"The instance is {instance.state}.")
    config = GpuConfig.get()
    now = timezone.now()
    _save_cost(instance, now)
    if (now - instance.created_at).total_seconds() > config.boot_timeout_minutes * 60:
        last = instance.status_msg or instance.actual_status or "no status"
        _boot_failed(instance, f"The vast.ai instance did not become ready within {config.boot_timeout_minutes} minutes "
                               f"(last status: {last}); it was destroyed.", retry=False)
        return Step(True, message="boot timeout")
    if instance.vast_id is None:
        return Step(False, POLL_MIN, "The rental is being made.")
    try:
        with vast_client(retries=0) as client:
            info = client.show_instance(instance.vast_id)
    except ProvisioningError as exc:
        return Step(False, POLL_MAX, str(exc))
    except VastAIError as exc:
        if exc.kind == "rate_limited":
            delay = exc.retry_after if exc.retry_after is not None else max(RATE_LIMIT_WAIT, _poll_delay(instance, now))
        else:
            delay = _poll_delay(instance, now)
        log.info("instance %s: %s; next look in %.0fs", instance.vast_id, exc, delay)
        return Step(False, delay, str(exc))
    if info is None:
        _boot_failed(instance, f"vast.ai no longer knows instance {instance.vast_id} (destroyed outside i2v?).",
                     retry=True, gone=True)
        return Step(True, message="gone")

    actual = info.get("actual_status") or ""
    fields = {"actual_status": actual[:20], "checked_at": now, "status_msg": str(info.get("status_msg") or "")[:500]}
    if info.get("dph_total") is not None:
        fields["dph_total"] = Decimal(str(round(float(info["dph_total"]), 4)))
    if isinstance(info.get("machine_id"), int):
        fields["machine_id"] = info["machine_id"]
    if not _note(instance, **fields):
        return Step(True, message="no longer booting")

    if actual in DEAD_STATUSES:
        reason = (f"vast.ai instance {instance.vast_id} went {actual} on machine {instance.machine_id} "
                  f"({fields['status_msg'] or 'no message'}); it was destroyed")
        if instance.machine_id:
            BadMachine.objects.update_or_create(machine_id=instance.machine_id,
                                                defaults={"reason": reason[:500], "created_at": now})
        _boot_failed(instance, reason + ".", retry=True)
        return Step(True, message=actual)
    if actual != "running":
        if actual == "loading" and instance.state == St.CREATING:
            instance.transition(St.LOADING)
        return Step(False, _poll_delay(instance, now), f"vast.ai says {actual or 'provisioning'}")

    if instance.state == St.CREATING:
        instance.transition(St.LOADING)
    url, portal = comfyui_url_of(info), portal_url_of(info)
    if url is None:
        entry = _list_entry(instance.vast_id)
        url, portal = comfyui_url_of(entry or {}), portal or portal_url_of(entry or {})
    if url is None:
        return Step(False, _poll_delay(instance, now), "Waiting for vast.ai to report the ComfyUI port")
    return _check_comfyui(instance, config, url, portal, now)


def _check_comfyui(instance, config, url, portal, now) -> Step:
    from gpu.health import model_check

    delay = _poll_delay(instance, now)
    target = url
    try:
        with _comfy(url, instance.web_password) as comfy:
            comfy.system_stats()
    except ComfyUIError as exc:
        if exc.kind == "not_ready":
            _note(instance, status_msg="ComfyUI is still starting (installing nodes, downloading models)")
            return Step(False, delay, exc.message)
        if exc.kind == "auth":
            _boot_failed(instance, "ComfyUI on the instance rejected its WEB_PASSWORD (the image may not honour it); "
                                   "it was destroyed.", retry=False)
            return Step(True, message="auth")
        target = tunnel_url(portal, instance.web_password) if portal else None
        if target is None:
            _note(instance, status_msg=f"ComfyUI does not answer yet: {exc}"[:500])
            return Step(False, delay, exc.message)
        try:
            with _comfy(target, instance.web_password) as comfy:
                comfy.system_stats()
        except ComfyUIError as tunnel_exc:
            _note(instance, status_msg=f"ComfyUI does not answer yet (direct or tunnel): {tunnel_exc}"[:500])
            return Step(False, delay, tunnel_exc.message)
    if instance.comfyui_seen_at is None:
        _note(instance, comfyui_seen_at=now)
    _, missing = model_check(target, instance.web_password, config.default_workflow)
    if missing:
        if (now - (instance.comfyui_seen_at or now)).total_seconds() >= MODELS_GRACE:
            _boot_failed(instance, f"ComfyUI started without {len(missing)} model file(s) ({', '.join(missing)}): the "
                                   "provisioning script could not download them. Check that they are in R2 (`python "
                                   "manage.py upload_models_to_r2`); the instance was destroyed.", retry=False)
            return Step(True, message="models missing")
        _note(instance, status_msg=f"ComfyUI is up; waiting for model files: {', '.join(missing)}"[:500])
        return Step(False, POLL_MIN, "models missing")
    if not instance.transition(St.RUNNING, comfyui_url=target, portal_url=portal or "",
                               status_msg="Ready: ComfyUI answers and the model files are present"):
        instance.refresh_from_db()
        return Step(instance.state not in VastInstance.BOOTING, POLL_MIN, f"The instance is {instance.state}.")
    log.info("vast.ai instance %s is ready at %s", instance.vast_id, target)
    _drop_provisioning_script(instance)
    return Step(True, message="ready")


def _boot_failed(instance, message, *, retry, gone=False):
    """End a boot that went wrong (destroying the rental), then rent a replacement when one is wanted."""
    if gone:
        _mark_gone(instance, message, failed=True)
    else:
        try:
            destroy_instance(instance, message, failed=True)
        except ProvisioningError as exc:
            log.warning("instance %s: %s (the reconciler retries the destroy)", instance.vast_id, exc)
    if not retry or instance.attempt >= MAX_BOOT_ATTEMPTS or not _replacement_wanted(instance):
        return None
    try:
        replacement = create_instance(user=instance.created_by, origin=instance.origin, attempt=instance.attempt + 1)
    except ProvisioningError as exc:
        VastInstance.objects.filter(pk=instance.pk).update(error=f"{message} No replacement: {exc}"[:4000])
        return None
    log.info("instance %s replaced by %s on another machine", instance.vast_id, replacement.vast_id)
    return replacement


def _replacement_wanted(instance) -> bool:
    from generation.models import VideoJob

    if instance.origin == Origin.MANUAL:
        return True
    return VideoJob.objects.filter(backend=VideoJob.Backend.COMFYUI,
                                   status__in=(VideoJob.Status.QUEUED, VideoJob.Status.PROVISIONING)).exists()


# ---------------------------------------------------------------------- destroy


def destroy_instance(instance, reason, *, failed=False) -> VastInstance:
    """Destroy the rental on vast.ai (billing stops) and record it. Idempotent.

    Ends `destroyed`, or `failed` (with destroyed_at) for a failed boot. vast.ai saying
    it has no such instance counts as destroyed. When vast.ai cannot be reached the row
    stays `destroying` (the reconciler retries) and ProvisioningError is raised.
    """
    for _ in range(5):
        instance.refresh_from_db()
        if instance.state == St.DESTROYED or (instance.state == St.FAILED and instance.destroyed_at):
            return instance
        if instance.state == St.DESTROYING:
            break
        fields = {"destroy_reason": reason[:300]}
        if failed:
            fields["error"] = reason[:4000]
        if instance.transition(St.DESTROYING, **fields):
            break
    else:
        raise ProvisioningError("The instance kept changing state; try again.", status=409, transient=True)
    if instance.vast_id is not None:
        try:
            with vast_client() as client:
                existed = client.destroy_instance(instance.vast_id)
        except VastAIError as exc:
            _update(instance, status_msg=f"Destroy failed, will retry: {exc}"[:500])
            raise _vast_error(exc, f"Destroying vast.ai instance {instance.vast_id} failed") from None
        note = "Destroyed" if existed else "Destroyed (vast.ai no longer had it)"
    else:
        note = "Nothing was rented"
    now = timezone.now()
    final = St.FAILED if (failed or instance.error) else St.DESTROYED
    instance.destroyed_at = now
    instance.transition(final, destroyed_at=now, cost_usd=instance.accrued_cost(now), status_msg=f"{note}: {reason}"[:500])
    _drop_provisioning_script(instance)
    log.info("vast.ai instance %s destroyed (%s)", instance.vast_id, reason)
    return instance


def _mark_gone(instance, message, *, failed):
    """vast.ai has no such instance any more: record that without calling it."""
    now = timezone.now()
    instance.refresh_from_db()
    instance.destroyed_at = now
    fields = {"destroyed_at": now, "cost_usd": instance.accrued_cost(now), "status_msg": message[:500],
              "destroy_reason": message[:300]}
    if instance.state == St.FAILED:
        _update(instance, **fields)
    else:
        if instance.state != St.DESTROYING:
            instance.transition(St.DESTROYING)
        if failed:
            fields["error"] = message[:4000]
        instance.transition(St.FAILED if (failed or instance.error) else St.DESTROYED, **fields)
    _drop_provisioning_script(instance)


# ---------------------------------------------------------------------- use


def ensure_capacity_for(job) -> VastInstance | None:
    """A ready instance for `job` (the least busy), or None while one boots.

    Starts an instance when none is live, and scales out when jobs have waited longer
    than scale_out_wait_seconds and fewer than max_instances are live. Raises
    ProvisioningError when no GPU can be had (no API key, spend cap, no offer, or
    MAX_BOOT_ATTEMPTS failed boots while this job waited).
    """
    from generation.models import VideoJob

    if not settings.VASTAI_API_KEY:
        raise ProvisioningError(NO_KEY, status=503)
    config = GpuConfig.get()
    now = timezone.now()
    active = VideoJob.ACTIVE
    ready = (VastInstance.objects.filter(state=St.RUNNING).exclude(comfyui_url="")
             .annotate(busy=Count("jobs", filter=Q(jobs__status__in=active) & ~Q(jobs__pk=job.pk)))
             .order_by("busy", "created_at"))
    instance = ready.first()
    if instance is not None:
        _update(instance, last_busy_at=now)
        if job.note.startswith(WAITING_NOTE):
            VideoJob.objects.filter(pk=job.pk, note=job.note).update(note="")
        if instance.busy:
            scale_out_if_needed(config=config, now=now)
        return instance
    booting = VastInstance.objects.filter(state__in=VastInstance.BOOTING).order_by("created_at").first()
    if booting is not None:
        _note_waiting(job, booting)
        return None
    since = job.created_at  # the whole wait, including the rental the job's first slice started
    failures = list(VastInstance.objects.filter(created_at__gte=since).exclude(error="").order_by("-created_at")[:MAX_BOOT_ATTEMPTS])
    if len(failures) >= MAX_BOOT_ATTEMPTS:
        raise ProvisioningError(f"No vast.ai GPU could be readied for this job in {MAX_BOOT_ATTEMPTS} attempts; the last: "
                                f"{failures[0].error}")
    try:
        started = create_instance(user=job.owner, origin=Origin.JOB, live_below=1)
    except ProvisioningError as exc:
        if exc.transient and (now - since).total_seconds() < TRANSIENT_GRACE:
            log.warning("job %s: no GPU yet (%s); will retry", job.pk, exc)
            return None
        raise
    if started is not None:
        _note_waiting(job, started)
    return None


WAITING_NOTE = "Waiting for a vast.ai GPU"


def _note_waiting(job, instance):
    """Show on a waiting job which instance it waits for and how far that one is (claiming the job
    later records the instance it runs on)."""
    from generation.models import VideoJob

    where = f"instance {instance.vast_id}" if instance.vast_id else "renting"
    gpu = f", {instance.gpu_name} at ${instance.dph_total:.3f}/h" if instance.gpu_name else ""
    note = f"{WAITING_NOTE} ({where}{gpu}): {instance.state}" + (f", {instance.status_msg}" if instance.status_msg else "")
    VideoJob.objects.filter(pk=job.pk, prompt_id="").update(instance=instance, note=note[:300])
    job.instance_id, job.note = instance.pk, note[:300]


def scale_out_if_needed(*, config=None, now=None) -> VastInstance | None:
    """Rent one more instance when jobs have waited longer than scale_out_wait_seconds.

    Only with at least one instance live and none booting, and below max_instances."""
    from generation.models import VideoJob

    config = config or GpuConfig.get()
    now = now or timezone.now()
    if config.gpu_provider != GpuConfig.Provider.VASTAI or not settings.VASTAI_API_KEY:
        return None
    live = VastInstance.objects.filter(state__in=VastInstance.LIVE)
    count = live.count()
    if count == 0 or count >= config.max_instances or live.filter(state__in=VastInstance.BOOTING).exists():
        return None
    cutoff = now - timedelta(seconds=config.scale_out_wait_seconds)
    waiting = VideoJob.objects.filter(backend=VideoJob.Backend.COMFYUI).filter(
        Q(status=VideoJob.Status.PROVISIONING, provisioning_at__lt=cutoff)
        | Q(status=VideoJob.Status.SUBMITTED, started_at__isnull=True, instance__isnull=False, submitted_at__lt=cutoff)
    )
    if not waiting.exists():
        return None
    try:
        return create_instance(origin=Origin.SCALE_OUT, live_below=count + 1)
    except ProvisioningError as exc:
        log.warning("scale-out: %s", exc)
        return None


# ---------------------------------------------------------------------- housekeeping


def reap_idle(now=None) -> list[VastInstance]:
    """Destroy running instances idle longer than idle_minutes (no job active on them, none waiting)."""
    from generation.models import VideoJob

    config = GpuConfig.get()
    now = now or timezone.now()
    idle = timedelta(minutes=config.idle_minutes)
    someone_waits = VideoJob.objects.filter(backend=VideoJob.Backend.COMFYUI, status=VideoJob.Status.PROVISIONING).exists()
    reaped = []
    for instance in VastInstance.objects.filter(state__in=VastInstance.LIVE):
        _save_cost(instance, now)
        if instance.state != St.RUNNING:
            continue
        if instance.jobs.filter(status__in=VideoJob.ACTIVE, backend=VideoJob.Backend.COMFYUI).exists():
            _update(instance, last_busy_at=now)
            continue
        if someone_waits:
            continue  # a waiting job is about to be given this GPU
        last_job = instance.jobs.aggregate(last=Max("finished_at"))["last"]
        since = max(t for t in (instance.last_busy_at, instance.ready_at, last_job, instance.created_at) if t)
        if now - since < idle:
            continue
        try:
            reaped.append(destroy_instance(instance, f"idle for more than {config.idle_minutes} min"))
        except ProvisioningError as exc:
            log.warning("could not reap instance %s: %s", instance.vast_id, exc)
    return reaped


def _row_for_label(label) -> VastInstance | None:
    try:
        pk = uuid.UUID(str(label)[len(LABEL_PREFIX):])
    except ValueError:
        return None
    return VastInstance.objects.filter(pk=pk).first()


def reconcile(now=None) -> dict:
    """Make vast.ai and the database agree; every change is listed in the returned report.

    - vast.ai instances labelled `i2v:` that the database doesn't know, or knows as
      destroyed, are destroyed (a rental whose row never learned its id is adopted);
    - rows vast.ai no longer has are marked destroyed;
    - unfinished destroys are retried, a running instance that died is destroyed;
    - reservations that never got a rental are failed, stalled wait tasks restarted.
    """
    from django_q.tasks import async_task

    now = now or timezone.now()
    report = {"destroyed": [], "adopted": [], "marked_gone": [], "retried": [], "failed_reservations": [], "restarted_waits": []}
    with vast_client() as client:
        try:
            listed = client.list_instances()
        except VastAIError as exc:
            raise _vast_error(exc, "Listing vast.ai instances failed") from None
        by_id = {i["id"]: i for i in listed if isinstance(i.get("id"), int)}

        for vast_id, info in by_id.items():
            label = str(info.get("label") or "")
            if not label.startswith(LABEL_PREFIX):
                continue  # not ours
            row = VastInstance.objects.filter(vast_id=vast_id).first()
            if row is None:
                row = _row_for_label(label)
                if row is not None and row.vast_id is None and row.state in VastInstance.BOOTING:
                    _update(row, vast_id=vast_id, status_msg="Rented; vast.ai is starting it")
                    report["adopted"].append(vast_id)
                    async_task("gpu.tasks.wait_for_instance", str(row.pk), group="gpu")
                    continue
                if row is not None and row.vast_id not in (None, vast_id):
                    row = None  # the label points at a row that rented something else
            if row is None or row.state == St.DESTROYED or (row.state == St.FAILED and row.destroyed_at):
                try:
                    client.destroy_instance(vast_id)
                except VastAIError as exc:
                    log.warning("reconcile: could not destroy unknown instance %s: %s", vast_id, exc)
                    continue
                log.warning("reconcile: destroyed vast.ai instance %s (%s)", vast_id,
                            "unknown to the database" if row is None else f"known as {row.state}")
                report["destroyed"].append(vast_id)
            elif row.state == St.RUNNING and info.get("actual_status") in DEAD_STATUSES:
                try:
                    destroy_instance(row, f"vast.ai instance {vast_id} went {info['actual_status']} while in use",
                                     failed=True)
                    report["retried"].append(vast_id)
                except ProvisioningError as exc:
                    log.warning("reconcile: %s", exc)

    unfinished = VastInstance.objects.filter(vast_id__isnull=False).filter(
        Q(state__in=VastInstance.LIVE + (St.DESTROYING,)) | Q(state=St.FAILED, destroyed_at__isnull=True))
    for row in unfinished:
        if row.vast_id in by_id:
            if row.state == St.DESTROYING or row.state == St.FAILED:
                try:
                    destroy_instance(row, row.destroy_reason or row.error or "unfinished destroy", failed=row.state == St.FAILED)
                    report["retried"].append(row.vast_id)
                except ProvisioningError as exc:
                    log.warning("reconcile: %s", exc)
            continue
        if row.state == St.CREATING and (now - row.created_at).total_seconds() < ORPHAN_GRACE:
            continue  # just rented: the list may lag
        _mark_gone(row, "vast.ai no longer has this instance", failed=False)
        report["marked_gone"].append(row.vast_id)

    stuck = VastInstance.objects.filter(vast_id__isnull=True, state__in=VastInstance.BOOTING,
                                        created_at__lt=now - timedelta(seconds=ORPHAN_GRACE))
    for row in stuck:
        if row.transition(St.FAILED, error="The rental was never confirmed by vast.ai.", destroyed_at=now,
                          status_msg="Nothing was rented"):
            report["failed_reservations"].append(str(row.pk))

    stale = now - timedelta(seconds=STALE_WAIT)
    for row in VastInstance.objects.filter(state__in=VastInstance.BOOTING, vast_id__isnull=False).filter(
            Q(checked_at__lt=stale) | Q(checked_at__isnull=True, created_at__lt=stale)):
        async_task("gpu.tasks.wait_for_instance", str(row.pk), group="gpu")
        report["restarted_waits"].append(row.vast_id)
    for row in VastInstance.objects.filter(state__in=VastInstance.LIVE):
        _save_cost(row, now)
    return report


# ---------------------------------------------------------------------- description


def instance_json(instance, now=None) -> dict:
    """A row as the API and the commands show it (never the WEB_PASSWORD)."""
    from generation.models import VideoJob

    active = VideoJob.ACTIVE
    cost = instance.accrued_cost(now) if instance.state in VastInstance.LIVE + (St.DESTROYING,) else instance.cost_usd
    return {
        "id": str(instance.id),
        "vast_id": instance.vast_id,
        "label": instance.label,
        "state": instance.state,
        "actual_status": instance.actual_status or None,
        "status_msg": instance.status_msg or None,
        "error": instance.error or None,
        "offer_id": instance.offer_id,
        "machine_id": instance.machine_id,
        "gpu_name": instance.gpu_name,
        "num_gpus": instance.num_gpus,
        "vram_gb": instance.vram_gb,
        "dph": float(instance.dph_total),
        "cost_usd": float(cost),
        "comfyui_url": instance.comfyui_url or None,
        "origin": instance.origin,
        "active_jobs": instance.jobs.filter(status__in=active).count(),
        "created_at": instance.created_at,
        "ready_at": instance.ready_at,
        "last_busy_at": instance.last_busy_at,
        "destroyed_at": instance.destroyed_at,
        "destroy_reason": instance.destroy_reason or None,
    }
