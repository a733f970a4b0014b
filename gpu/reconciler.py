"""Make vast.ai and the database agree: adopt or destroy unknown rentals, mark vanished ones gone."""

import logging
import uuid
from datetime import timedelta
from decimal import Decimal

from django.db.models import Q
from django.utils import timezone

from gpu.domain import vast_client, vast_error
from gpu.lifecycle import LABEL_PREFIX, ProvisioningError, destroy_instance, mark_gone, save_cost, update_instance
from gpu.models import VastInstance
from gpu.vastai import DEAD_STATUSES, VastAIError, portal_url_of

log = logging.getLogger(__name__)
St = VastInstance.State

ORPHAN_GRACE = 120  # seconds before a rental missing from vast.ai's list is believed gone
STALE_WAIT = 180  # seconds without a status check before the reconciler restarts the wait task
UNKNOWN_GRACE = 600  # seconds a running instance may report `unknown` before it is believed dead


def _dead_while_running(row: VastInstance, actual: str | None, now) -> bool:
    """Whether a running instance is gone for good. `unknown` is a missed heartbeat: it counts
    only once it has lasted UNKNOWN_GRACE (a job on the instance usually carries on meanwhile)."""
    if actual == "unknown":
        if row.unknown_since is None:
            update_instance(row, unknown_since=now)
            log.warning("reconcile: vast.ai instance %s reports unknown; kept for %d s", row.vast_id, UNKNOWN_GRACE)
            return False
        return (now - row.unknown_since).total_seconds() >= UNKNOWN_GRACE
    if row.unknown_since is not None:
        update_instance(row, unknown_since=None)
    return actual in DEAD_STATUSES


def _row_for_label(label) -> VastInstance | None:
    try:
        pk = uuid.UUID(str(label)[len(LABEL_PREFIX):])
    except ValueError:
        return None
    return VastInstance.objects.filter(pk=pk).first()


def _follow_adopted(row: VastInstance, info: dict, now) -> None:
    """Record what vast.ai says of an instance the user rented (no boot to wait for, nothing to destroy):
    its status and price, and `running` once it runs."""
    actual = str(info.get("actual_status") or "")
    fields = {"actual_status": actual[:20], "checked_at": now, "status_msg": str(info.get("status_msg") or "")[:500]}
    if info.get("dph_total") is not None:
        fields["dph_total"] = Decimal(str(round(float(info["dph_total"]), 4)))
    portal = portal_url_of(info)
    if portal:
        fields["portal_url"] = portal
    update_instance(row, **fields)
    if actual == "running" and row.state == St.LOADING:
        row.transition(St.RUNNING)


def reconcile(now=None) -> dict:
    """Make vast.ai and the database agree; every change is listed in the returned report.

    - vast.ai instances labelled `i2v:` that the database doesn't know, or knows as
      destroyed, are destroyed (a rental whose row never learned its id is adopted);
    - rows vast.ai no longer has are marked destroyed;
    - unfinished destroys are retried, a running instance that died is destroyed;
    - reservations that never got a rental are failed, stalled wait tasks restarted;
    - instances the user rented in the console (adopted) only have their status recorded.
    """
    from i2v.core.queue import async_task

    now = now or timezone.now()
    report = {"destroyed": [], "adopted": [], "marked_gone": [], "retried": [], "failed_reservations": [], "restarted_waits": []}
    with vast_client() as client:
        try:
            listed = client.list_instances()
        except VastAIError as exc:
            raise vast_error(exc, "Listing vast.ai instances failed") from None
        by_id = {i["id"]: i for i in listed if isinstance(i.get("id"), int)}
        adopted = {r.vast_id: r for r in VastInstance.objects.filter(origin=VastInstance.Origin.ADOPTED,
                                                                      state__in=VastInstance.LIVE, vast_id__in=list(by_id))}

        for vast_id, info in by_id.items():
            if vast_id in adopted:
                _follow_adopted(adopted[vast_id], info, now)
                continue  # the user's own rental: never relabelled, never destroyed as an orphan
            label = str(info.get("label") or "")
            if not label.startswith(LABEL_PREFIX):
                continue  # not ours
            row = VastInstance.objects.filter(vast_id=vast_id).first()
            if row is None:
                row = _row_for_label(label)
                if row is not None and row.vast_id is None and row.state in VastInstance.BOOTING:
                    update_instance(row, vast_id=vast_id, status_msg="Rented; vast.ai is starting it")
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
            elif row.state == St.RUNNING and _dead_while_running(row, info.get("actual_status"), now):
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
        mark_gone(row, "vast.ai no longer has this instance", failed=False)
        report["marked_gone"].append(row.vast_id)

    stuck = VastInstance.objects.filter(vast_id__isnull=True, state__in=VastInstance.BOOTING,
                                        created_at__lt=now - timedelta(seconds=ORPHAN_GRACE))
    for row in stuck:
        if row.transition(St.FAILED, error="The rental was never confirmed by vast.ai.", destroyed_at=now,
                          status_msg="Nothing was rented"):
            report["failed_reservations"].append(str(row.pk))

    stale = now - timedelta(seconds=STALE_WAIT)
    for row in VastInstance.objects.reconcilable().filter(state__in=VastInstance.BOOTING, vast_id__isnull=False).filter(
            Q(checked_at__lt=stale) | Q(checked_at__isnull=True, created_at__lt=stale)):
        async_task("gpu.tasks.wait_for_instance", str(row.pk), group="gpu")
        report["restarted_waits"].append(row.vast_id)
    for row in VastInstance.objects.filter(state__in=VastInstance.LIVE):
        save_cost(row, now)
    return report
