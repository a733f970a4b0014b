"""The vast.ai GPU lifecycle: rent, wait until ready, destroy (gpu.reconciler ties up what goes astray).

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
"""

import logging
import secrets
from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from gpu import capacity
from gpu.comfyui import ComfyUIClient, ComfyUIError
from gpu.domain import ProvisioningError, vast_client, vast_error
from gpu.models import BadMachine, GpuConfig, VastInstance
from gpu.offers import BAD_MACHINE_DAYS, bad_machines, check_spend, policy_filters, policy_text
from gpu.onstart import build_onstart, drop_provisioning_script, instance_env, manifest, require_r2_for
from gpu.tunnel import comfyui_tunnel, quick_tunnels
from gpu.vastai import DEAD_STATUSES, VastAIError, comfyui_url_of, portal_url_of

log = logging.getLogger(__name__)
St = VastInstance.State
Origin = VastInstance.Origin

LABEL_PREFIX = "i2v:"
MAX_BOOT_ATTEMPTS = 3  # rentals per need before giving up (dead machines are replaced)
MAX_OFFER_TRIES = 5  # offers tried when the cheapest ones are rented away under us
POLL_MIN, POLL_MAX = 2.0, 30.0
RATE_LIMIT_WAIT = 10.0  # seconds to wait after a 429 that gave no Retry-After
MODELS_GRACE = 120  # seconds ComfyUI may answer while model files are still missing


@dataclass
class Step:
    """One look at a booting instance: done (ready, failed or gone), else wait `delay` seconds."""

    done: bool
    delay: float = 0.0
    message: str = ""


def _comfy(url, token) -> ComfyUIClient:
    return ComfyUIClient(url, token=token or None, connect_timeout=5.0, read_timeout=10.0, retries=0)


def save_cost(instance, now=None):
    cost = instance.accrued_cost(now)
    VastInstance.objects.filter(pk=instance.pk).update(cost_usd=cost)
    instance.cost_usd = cost


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
        check_spend(config, offer.get("dph_total"))
        return VastInstance.objects.create(
            web_password=secrets.token_urlsafe(24), origin=origin, created_by=user, attempt=attempt,
            status_msg="Renting a GPU on vast.ai", **_offer_fields(offer),
        )


def _candidates(client, config, offer_id) -> list[dict]:
    bad = bad_machines()
    try:
        offers = client.search_offers(limit=20 if offer_id is None else 200, exclude_machines=bad, **policy_filters(config))
    except VastAIError as exc:
        raise vast_error(exc, "Searching vast.ai offers failed") from None
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
        require_r2_for(manifest(config), config)
        offers = _candidates(client, config, offer_id)
        check_spend(config, offers[0].get("dph_total"))
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
            check_spend(config, offer.get("dph_total"))
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
            raise vast_error(exc, f"Renting offer {offer['id']} failed") from None
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
        listed = client.list_instances(label=instance.label)
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
        drop_provisioning_script(instance)


def _enqueue_wait(instance_id):
    from i2v.core.queue import async_task

    transaction.on_commit(lambda: async_task("gpu.tasks.wait_for_instance", str(instance_id), group="gpu"))


# ---------------------------------------------------------------------- wait until ready


def _poll_delay(instance, now) -> float:
    """Backoff by age: every 2 s at first, every 30 s for an instance booting for 10 minutes."""
    elapsed = (now - instance.created_at).total_seconds()
    return min(POLL_MAX, max(POLL_MIN, elapsed / 20))


def update_instance(instance, **fields):
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
    """The instance from the list, which carries the port mappings the by-id answer may lack."""
    try:
        with vast_client(retries=0) as client:
            return next((i for i in client.list_instances(instance_id=vast_id) if i.get("id") == vast_id), None)
    except (VastAIError, ProvisioningError):
        return None


def tunnel_url(portal_url, token) -> str | None:
    """The Cloudflare quick-tunnel URL of ComfyUI (port 8188), read from the instance portal."""
    return comfyui_tunnel(quick_tunnels(portal_url, token))


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
    save_cost(instance, now)
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
    drop_provisioning_script(instance)
    return Step(True, message="ready")


def _boot_failed(instance, message, *, retry, gone=False):
    """End a boot that went wrong (destroying the rental), then rent a replacement when one is wanted."""
    if gone:
        mark_gone(instance, message, failed=True)
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
    if instance.origin == Origin.MANUAL:
        return True
    return capacity.jobs_waiting()


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
            update_instance(instance, status_msg=f"Destroy failed, will retry: {exc}"[:500])
            raise vast_error(exc, f"Destroying vast.ai instance {instance.vast_id} failed") from None
        note = "Destroyed" if existed else "Destroyed (vast.ai no longer had it)"
    else:
        note = "Nothing was rented"
    now = timezone.now()
    final = St.FAILED if (failed or instance.error) else St.DESTROYED
    instance.destroyed_at = now
    instance.transition(final, destroyed_at=now, cost_usd=instance.accrued_cost(now), status_msg=f"{note}: {reason}"[:500])
    drop_provisioning_script(instance)
    log.info("vast.ai instance %s destroyed (%s)", instance.vast_id, reason)
    return instance


def mark_gone(instance, message, *, failed):
    """vast.ai has no such instance any more: record that without calling it."""
    now = timezone.now()
    instance.refresh_from_db()
    instance.destroyed_at = now
    fields = {"destroyed_at": now, "cost_usd": instance.accrued_cost(now), "status_msg": message[:500],
              "destroy_reason": message[:300]}
    if instance.state == St.FAILED:
        update_instance(instance, **fields)
    else:
        if instance.state != St.DESTROYING:
            instance.transition(St.DESTROYING)
        if failed:
            fields["error"] = message[:4000]
        instance.transition(St.FAILED if (failed or instance.error) else St.DESTROYED, **fields)
    drop_provisioning_script(instance)


# ---------------------------------------------------------------------- description


def instance_json(instance, now=None) -> dict:
    """A row as the API and the commands show it (never the WEB_PASSWORD)."""
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
        "auto_destroy": instance.auto_destroy,
        "can": list((instance.template or {}).get("can") or []),
        "cannot": list((instance.template or {}).get("cannot") or []),
        "active_jobs": capacity.active_jobs(instance.pk),
        "created_at": instance.created_at,
        "ready_at": instance.ready_at,
        "last_busy_at": instance.last_busy_at,
        "destroyed_at": instance.destroyed_at,
        "destroy_reason": instance.destroy_reason or None,
    }
