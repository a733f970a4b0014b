"""The GPU page: configuration and connection status, instances, renting and destroying."""

from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from gpu import adoption, capacity
from gpu.domain import PROBE_STAFF_ONLY, may_probe
from gpu.models import GpuConfig, VastInstance
from gpu.urls_check import split_token, validate_service_url

State = VastInstance.State
OFFER_LIMIT = 5
NO_PROVISIONING = (
    "Renting and destroying from this page needs the provisioning module, which this server does not have yet; "
    "use the vast.ai console meanwhile."
)


def _provisioning():
    """gpu.lifecycle, or None while it is not installed (the page then says so)."""
    try:
        from gpu import lifecycle
    except ImportError:
        return None
    return lifecycle


def _require_staff(request):
    if not request.user.is_staff:
        raise PermissionDenied("Only staff can change GPUs.")


def spent_today():
    """What vast.ai rentals have cost today, as the provisioning cap counts it (None without provisioning)."""
    from gpu import offers

    return offers.spend_today() if _provisioning() is not None else None


def instance_rows(config, now=None):
    """The instances not yet gone, with uptime, cost so far and time left before the idle reaper destroys them."""
    now = now or timezone.now()
    rows = []
    gone = Q(state=State.DESTROYED) | Q(state=State.FAILED, destroyed_at__isnull=False)
    for inst in VastInstance.objects.exclude(gone).order_by("-created_at"):
        busy = capacity.active_jobs(inst.pk) > 0
        left = None
        if inst.state == State.RUNNING and not busy and inst.auto_destroy:
            # The scheduler's idle clock: the latest of busy, ready, last job, created.
            since = capacity.idle_since(inst)
            left = max(0.0, (since + timedelta(minutes=config.idle_minutes) - now).total_seconds())
        rows.append({
            "inst": inst,
            "uptime": ((inst.destroyed_at or now) - inst.created_at).total_seconds(),
            "cost": inst.accrued_cost(now),
            "busy": busy,
            "time_left": left,
            "destroyable": inst.state not in (State.DESTROYING, State.DESTROYED),
            "adopted": inst.origin == VastInstance.Origin.ADOPTED,
        })
    return rows


def caps(config):
    live = VastInstance.objects.filter(state__in=VastInstance.LIVE).count()
    spent = spent_today()
    return {
        "live": live,
        "max_instances": config.max_instances,
        "instances_capped": live >= config.max_instances,
        "spent": spent,
        "max_spend": config.max_daily_spend,
        "spend_capped": spent is not None and spent >= config.max_daily_spend,
    }


def _context(request, **extra):
    config = GpuConfig.get()
    rows = instance_rows(config)
    limits = caps(config)
    context = {
        "config": config,
        "rows": rows,
        "caps": limits,
        "polling": any(r["inst"].state in (State.CREATING, State.LOADING, State.DESTROYING) for r in rows),
        "can_rent": bool(settings.VASTAI_API_KEY) and _provisioning() is not None,
        "vast_configured": bool(settings.VASTAI_API_KEY),
        "has_provisioning": _provisioning() is not None,
        "no_provisioning": NO_PROVISIONING,
        "configured": bool(config.comfyui_url or config.swarmui_url or rows),
        "config_form": {"comfyui_url": config.comfyui_url, "swarmui_url": config.swarmui_url},
        "config_errors": {},
        "adopt_form": {"vastai_instance_id": "", "comfyui_url": ""},
        "adopt_error": "",
        "configured_instance": _configured_instance(config),
        "test_url": (config.comfyui_url or config.swarmui_url) if request.user.is_staff else "",
        # Nothing to probe: the report is instant, so the page shows it at once.
        "health": None if (config.comfyui_url or config.swarmui_url) else _health(),
    }
    context.update(extra)
    return context


def _configured_instance(config):
    """The vast.ai instance the configuration names, while it is live (for "what i2v can do with it")."""
    inst = adoption.configured_instance(config)
    return inst if inst is not None and inst.state in VastInstance.LIVE else None


def _tone(status):
    """ok / warn / off / bad for a health status line."""
    if status.startswith("available"):
        return "ok"
    if status in ("not ready", "authentication failed"):
        return "warn"
    if status == "not configured":
        return "off"
    return "bad"


def _health():
    from gpu.health import health_report

    report = health_report(GpuConfig.get())
    report["comfyui_tone"] = _tone(report["comfyui_status"])
    report["swarmui_tone"] = _tone(report["swarmui_status"])
    return report


@require_GET
@login_required
def index(request):
    return render(request, "gpu/gpu.html", _context(request))


@require_GET
@login_required
def health(request):
    """Connection status, loaded after the page (probing can take seconds); without HTMX, the page with it."""
    report = _health()
    if request.htmx:
        return render(request, "gpu/gpu.html#health", {"health": report, "config": GpuConfig.get()})
    return render(request, "gpu/gpu.html", _context(request, health=report))


@require_POST
@login_required
def test_connection(request):
    """Probe a URL (the configured one by default) and show what answers there."""
    from gpu.probe import gpu_label, probe

    config = GpuConfig.get()
    url = (request.POST.get("url") or "").strip() or config.comfyui_url or config.swarmui_url
    result, error = None, ""
    if url and not may_probe(request.user, url, config):
        raise PermissionDenied(PROBE_STAFF_ONLY)
    if not url:
        error = "Enter a URL to test, e.g. the ComfyUI URL behind vast.ai's Open button."
    else:
        try:
            url, token = split_token(validate_service_url(url))
        except ValueError as exc:
            error = f"The URL {exc}."
        else:
            # The configured token goes only to the configured URLs.
            if not token and url in (config.comfyui_url, config.swarmui_url):
                token = config.comfyui_token
            result = probe(url, token=token)
            for dev in result["details"].get("devices") or []:
                dev["label"] = gpu_label(dev.get("name") or "")
    context = {"test_result": result, "test_error": error, "test_url": url}
    if request.htmx:
        return render(request, "gpu/gpu.html#test-result", context, status=422 if error else 200)
    return render(request, "gpu/gpu.html", _context(request, **context), status=422 if error else 200)


@require_POST
@login_required
def config_update(request):
    """Staff change the ComfyUI/SwarmUI URLs; recorded through gpu.domain.update_config."""
    from gpu import domain

    _require_staff(request)
    form = {key: (request.POST.get(key) or "").strip() for key in ("comfyui_url", "swarmui_url")}
    token = request.POST.get("comfyui_token") or ""
    errors, changes = {}, {}
    for key, value in form.items():
        if not value:
            changes[key] = ""
            continue
        try:
            url, url_token = split_token(validate_service_url(value))
        except ValueError as exc:
            errors[key] = f"The URL {exc}."
            continue
        changes[key] = url
        # vast.ai's Open URL carries ?token=…: keep it as the (write-only) token.
        if url_token and not token:
            token = url_token
    if token:
        if len(token) > 500 or any(c in token for c in "\r\n\x00"):
            errors["comfyui_token"] = "The token must be at most 500 characters, on one line."
        else:
            changes["comfyui_token"] = token
    if request.POST.get("clear_token"):
        changes["comfyui_token"] = ""
    saved = False
    if not errors:
        config = GpuConfig.get()
        if changes.get("comfyui_url") and config.gpu_provider == GpuConfig.Provider.NONE:
            # A first URL is a GPU the user runs: say so, so the health report names it.
            changes["gpu_provider"] = GpuConfig.Provider.LOCAL
        domain.update_config(changes, user=request.user, source="web")
        saved = True
    if saved:
        # The summary, the health and the empty state all change: reload the page.
        messages.success(request, "GPU configuration saved.")
        return HttpResponseClientRedirect(reverse("gpu:index")) if request.htmx else redirect("gpu:index")
    context = {"config": GpuConfig.get(), "config_form": form, "config_errors": errors}
    if request.htmx:
        return render(request, "gpu/gpu.html#config-form", context, status=422)
    return render(request, "gpu/gpu.html", _context(request, **context), status=422)


@require_GET
@login_required
def instances(request):
    """The instances table (polled while one is changing state); without HTMX, the page."""
    if not request.htmx:
        return redirect("gpu:index")
    return render(request, "gpu/gpu.html#instances", _context(request))


def _staff_instance(request, instance_id) -> VastInstance:
    _require_staff(request)
    inst = VastInstance.objects.filter(pk=instance_id).first()
    if inst is None:
        raise Http404("No such instance.")
    return inst


def _instances_notice(request, level, text):
    """The instances table with `text` above it (HTMX), else the page with the message."""
    if request.htmx:
        tag = messages.DEFAULT_TAGS.get(level, "info")
        return render(request, "gpu/gpu.html#instances", _context(request, notice=text, notice_level=tag))
    messages.add_message(request, level, text)
    return redirect("gpu:index")


@require_POST
@login_required
def destroy(request, instance_id):
    inst = _staff_instance(request, instance_id)
    provisioning = _provisioning()
    if provisioning is None:
        level, text = messages.ERROR, NO_PROVISIONING
    elif inst.state in (State.DESTROYING, State.DESTROYED):
        level, text = messages.INFO, f"Instance {inst.vast_id or inst.id} is already {inst.state}."
    else:
        try:
            provisioning.destroy_instance(inst, reason=f"destroyed by {request.user.get_username()} from the GPU page")
        except provisioning.ProvisioningError as exc:  # vast.ai unreachable: the row stays destroying, retried
            level, text = messages.ERROR, f"Could not destroy instance {inst.vast_id or inst.id}: {exc}"
        else:
            level, text = messages.SUCCESS, f"Instance {inst.vast_id or inst.id} is being destroyed."
    return _instances_notice(request, level, text)


def _offers(config):
    """The cheapest vast.ai offers matching the rental policy, or (None, why not)."""
    from gpu.vastai import VastAIClient, VastAIError

    if not settings.VASTAI_API_KEY:
        return None, "Set VASTAI_API_KEY in the server's environment to rent GPUs from vast.ai."
    from gpu import offers as vast_offers

    provisioning = _provisioning()
    try:
        if provisioning is not None:
            # The same search create_instance makes: the policy, machines that failed lately left out.
            found = vast_offers.search_offers(limit=OFFER_LIMIT, config=config)
        else:
            names = [n.strip() for n in (config.gpu_names or "").split(",") if n.strip()]
            with VastAIClient(settings.VASTAI_API_KEY, settings.VASTAI_API_URL, read_timeout=15.0, retries=1) as client:
                found = client.search_offers(
                    min_vram_gb=config.min_vram_gb, gpu_names=names, max_dph=config.max_dph,
                    min_reliability=config.min_reliability, min_inet_down=config.min_inet_down_mbps,
                    verified=config.verified_only, min_direct_ports=config.min_direct_ports, disk_gb=config.disk_gb,
                    limit=OFFER_LIMIT,
                )
    except VastAIError as exc:
        return None, str(exc)
    except Exception as exc:
        if provisioning is not None and isinstance(exc, provisioning.ProvisioningError):
            return None, str(exc)
        raise
    for offer in found:
        offer["vram_gb"] = round((offer.get("gpu_ram") or 0) / 1024)
        offer["reliability_pct"] = f"{(offer.get('reliability') or 0) * 100:.1f}"
    return found, ""


@require_GET
@login_required
def offers(request):
    config = GpuConfig.get()
    found, error = _offers(config)
    extra = {"offers": found, "offers_error": error, "offers_loaded": True}
    if request.htmx:
        return render(request, "gpu/gpu.html#offers", {**_context(request), **extra})
    return render(request, "gpu/gpu.html", _context(request, **extra))


@require_POST
@login_required
def rent(request):
    _require_staff(request)
    provisioning = _provisioning()
    offer_id = request.POST.get("offer_id") or ""
    limits = caps(GpuConfig.get())
    if provisioning is None:
        messages.error(request, NO_PROVISIONING)
    elif not offer_id.isdigit():
        messages.error(request, "Choose an offer to rent.")
    elif limits["instances_capped"] or limits["spend_capped"]:
        messages.error(request, "A cap is reached: no new GPU can be rented now (see the banner).")
    else:
        try:
            inst = provisioning.create_instance(offer_id=int(offer_id), user=request.user)
        except provisioning.ProvisioningError as exc:  # no key, a cap, the offer is gone, vast.ai refused
            messages.error(request, f"Could not rent the GPU: {exc}")
        else:
            label = getattr(inst, "gpu_name", "") or "the GPU"
            messages.success(request, f"Renting {label}: it boots and loads the models in a few minutes.")
    return HttpResponseClientRedirect(reverse("gpu:index")) if request.htmx else redirect("gpu:index")


@require_POST
@login_required
def adopt(request):
    """Staff name an instance they rented in the vast.ai console: i2v tracks its cost and can destroy it."""
    _require_staff(request)
    form = {key: (request.POST.get(key) or "").strip() for key in ("vastai_instance_id", "comfyui_url")}
    changes, error = {}, ""
    if not form["vastai_instance_id"].isdigit():
        error = "Enter the instance's number from the vast.ai console (Instances page), e.g. 29829389."
    else:
        changes["vastai_instance_id"] = int(form["vastai_instance_id"])
    if not error and form["comfyui_url"]:
        try:
            changes["comfyui_url"], token = split_token(validate_service_url(form["comfyui_url"]))
        except ValueError as exc:
            error = f"The URL {exc}."
        else:
            if token:
                changes["comfyui_token"] = token
    if not error:
        try:
            adoption.configure(changes, user=request.user, source="web")
        except adoption.AdoptionError as exc:
            error = str(exc).removeprefix("vastai_instance_id: ")
    if error:
        context = {"adopt_form": form, "adopt_error": error}
        if request.htmx:
            return render(request, "gpu/gpu.html#adopt-form", context, status=422)
        return render(request, "gpu/gpu.html", _context(request, **context), status=422)
    messages.success(request, f"Using vast.ai instance {changes['vastai_instance_id']}: its cost is tracked here.")
    return HttpResponseClientRedirect(reverse("gpu:index")) if request.htmx else redirect("gpu:index")


@require_POST
@login_required
def auto_destroy(request, instance_id):
    """Switch the idle reaper and the daily spend cap on or off for one instance."""

    inst = _staff_instance(request, instance_id)
    on = request.POST.get("on") == "1"
    adoption.set_auto_destroy(inst, on)
    text = (f"Auto-destroy is on for instance {inst.vast_id}: it is destroyed after {GpuConfig.get().idle_minutes} idle "
            "minutes." if on else f"Auto-destroy is off for instance {inst.vast_id}: i2v will not destroy it.")
    return _instances_notice(request, messages.SUCCESS, text)
