"""Adopting an instance the user rented in the vast.ai console: POST /api/gpu/config with its id,
its cost and destroy through the API, what the template lets i2v do, and auto-destroy by consent."""

import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from gpu.models import GpuConfig, GpuConfigChange, VastInstance
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)

pytestmark = pytest.mark.django_db
PASSWORD = "console-web-password-1"


@pytest.fixture
def console(vast, comfy):
    """An instance rented in the console an hour ago from the ComfyUI template, with the user's label and
    WEB_PASSWORD; ComfyUI is up behind it."""
    comfy.placeholder, comfy.token = False, PASSWORD
    vast_id = vast.create_console_instance(web_password=PASSWORD, label="my wan box", dph_base=0.412)
    vast.update_instance(vast_id, start_date=time.time() - 3600)
    return vast_id


def test_an_instance_rented_in_the_console_is_adopted_listed_with_its_cost_and_destroyed(staff_api, policy, vast,
                                                                                          console):
    tunnel = vast.tunnel_url(console)

    resp = staff_api.post("/api/gpu/config", {"vastai_instance_id": console, "comfyui_url": tunnel})

    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert body["vastai_instance_id"] == console and body["comfyui_url"] == tunnel
    assert body["comfyui_available"] is True  # with the instance's own WEB_PASSWORD: no token was pasted
    adopted = body["vastai_instance"]
    dph = round(vast.instances[console]["dph_total"], 4)
    assert adopted["origin"] == "adopted" and adopted["auto_destroy"] is False and adopted["state"] == "running"
    assert adopted["gpu_name"] == "RTX 4090" and adopted["dph"] == dph and adopted["comfyui_url"] == tunnel
    assert abs(adopted["cost_usd"] - dph) < 0.01  # an hour at its $/hour, counted from vast.ai's start time
    assert "i2v follows the tunnel: when its URL changes, it reads the new one from the portal on 1111." in adopted["can"]
    assert "i2v authenticates with the instance's WEB_PASSWORD (read from its record)." in adopted["can"]
    assert PASSWORD not in resp.content.decode()

    listed = staff_api.get("/api/vastai/instances").json()
    item = next(i for i in listed["items"] if i["vast_id"] == console)
    assert item["origin"] == "adopted" and item["dph"] == dph and item["cost_usd"] > 0.4 and item["auto_destroy"] is False
    assert PASSWORD not in str(listed)

    gone = staff_api.delete(f"/api/vastai/instances/{console}")
    assert gone.status_code == 200 and gone.json()["state"] == "destroyed"
    assert vast.instances[console]["destroyed"] and vast.instances[console]["label"] == "my wan box"


def test_an_id_that_is_not_on_the_account_is_a_422_naming_it(staff_api, policy, vast):
    resp = staff_api.post("/api/gpu/config", {"vastai_instance_id": 31337})

    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("vastai_instance_id: vast.ai has no instance 31337 on this account")
    assert GpuConfig.get().vastai_instance_id is None and not VastInstance.objects.exists()


def test_naming_it_twice_keeps_one_row_and_its_switch(staff_api, policy, vast, console):
    staff_api.post("/api/gpu/config", {"vastai_instance_id": console})
    VastInstance.objects.filter(vast_id=console).update(auto_destroy=True)

    again = staff_api.post("/api/gpu/config", {"vastai_instance_id": console}).json()

    assert VastInstance.objects.filter(vast_id=console).count() == 1 and again["vastai_instance"]["auto_destroy"] is True
    assert GpuConfig.get().gpu_provider == "vastai"


def test_a_template_without_the_portal_says_the_tunnel_cannot_be_followed(staff_api, policy, vast, comfy):
    vast_id = vast.create_console_instance(portal=False, label="")

    adopted = staff_api.post("/api/gpu/config", {"vastai_instance_id": vast_id}).json()["vastai_instance"]

    assert "No portal on 1111: i2v cannot follow the tunnel; paste the URL when it changes." in adopted["cannot"]
    assert "i2v authenticates with the token vast.ai generated for the Open button (OPEN_BUTTON_TOKEN)." in adopted["can"]
    row = VastInstance.objects.get(vast_id=vast_id)
    assert row.web_password == vast.instances[vast_id]["jupyter_token"] and row.template["portal"] is False


def test_a_foreign_image_with_https_and_no_token_is_described_plainly(staff_api, policy, vast):
    vast_id = vast.create_console_instance(image="pytorch/pytorch:latest", https=True, label="")
    vast.update_instance(vast_id, extra_env=[["ENABLE_HTTPS", "true"]], jupyter_token=None)

    cannot = staff_api.post("/api/gpu/config", {"vastai_instance_id": vast_id}).json()["vastai_instance"]["cannot"]

    assert any(c.startswith("pytorch/pytorch:latest is not vast.ai's ComfyUI image") for c in cannot)
    assert any(c.startswith("ENABLE_HTTPS serves the direct port") for c in cannot)
    assert any(c.startswith("Neither WEB_PASSWORD nor OPEN_BUTTON_TOKEN is set") for c in cannot)
    assert any(c.startswith("The portal on 1111 needs a token i2v does not have") for c in cannot)


def test_auto_destroy_is_switched_on_through_the_api_by_staff_only(api, staff_api, policy, vast, console):
    staff_api.post("/api/gpu/config", {"vastai_instance_id": console})

    refused = api.patch(f"/api/vastai/instances/{console}", {"auto_destroy": True})
    switched = staff_api.patch(f"/api/vastai/instances/{console}", {"auto_destroy": True})

    assert refused.status_code == 403 and switched.status_code == 200 and switched.json()["auto_destroy"] is True
    assert VastInstance.objects.get(vast_id=console).auto_destroy is True


def test_the_idle_reaper_leaves_an_adopted_instance_alone_until_auto_destroy_is_on(staff_api, policy, vast, console):
    from generation.tasks import schedule

    staff_api.post("/api/gpu/config", {"vastai_instance_id": console, "comfyui_url": vast.tunnel_url(console)})
    row = VastInstance.objects.get(vast_id=console)
    long_ago = timezone.now() - timedelta(minutes=policy.idle_minutes + 30)
    VastInstance.objects.filter(pk=row.pk).update(ready_at=long_ago, last_busy_at=long_ago)

    assert schedule().endswith("destroyed 0")
    assert vast.instances[console]["destroyed"] is False

    VastInstance.objects.filter(pk=row.pk).update(auto_destroy=True)
    assert schedule().endswith("destroyed 1")
    row.refresh_from_db()
    assert vast.instances[console]["destroyed"] is True and "idle" in row.destroy_reason


def test_the_spend_cap_counts_an_adopted_instance_only_with_auto_destroy_on(staff_api, policy, vast, console):
    from gpu.offers import spend_today

    staff_api.post("/api/gpu/config", {"vastai_instance_id": console})
    assert spend_today() == Decimal("0")
    VastInstance.objects.filter(vast_id=console).update(auto_destroy=True)
    assert spend_today() > 0


def test_the_reconciler_never_destroys_or_relabels_an_adopted_instance(staff_api, policy, vast, console):
    from gpu.reconciler import reconcile

    staff_api.post("/api/gpu/config", {"vastai_instance_id": console})
    vast.advance(console, "unknown")

    report = reconcile()

    assert console not in report["destroyed"] + report["retried"] + report["marked_gone"]
    assert vast.instances[console]["destroyed"] is False and vast.instances[console]["label"] == "my wan box"
    assert vast.count("PUT", f"/instances/{console}/") == 0
    assert VastInstance.objects.get(vast_id=console).actual_status == "unknown"
    vast.advance(console, "running")


def test_a_comfyui_url_that_is_not_the_instances_is_not_tied_to_it(staff_api, policy, vast, console, comfy):
    resp = staff_api.post("/api/gpu/config", {"vastai_instance_id": console, "comfyui_url": "http://127.0.0.1:9"})

    adopted = resp.json()["vastai_instance"]
    assert adopted["comfyui_url"] is None
    assert adopted["cannot"][0].startswith("The configured ComfyUI URL http://127.0.0.1:9 is neither its direct port")
    assert GpuConfigChange.objects.filter(field="vastai_instance_id", new_value=str(console)).exists()


def _admin_config_post(client, **fields):
    from django.forms.models import model_to_dict

    config = GpuConfig.get()
    data = {k: v for k, v in model_to_dict(config).items() if v is not None}
    data.update(comfyui_token="", **fields)
    return client.post(f"/admin/gpu/gpuconfig/{config.pk}/change/", data)


def test_the_admin_adopts_the_named_instance_and_destroys_it(client, staff, policy, vast, console):
    client.force_login(staff)

    resp = _admin_config_post(client, vastai_instance_id=console)

    assert resp.status_code == 302, resp.content.decode()[:2000]
    inst = VastInstance.objects.get(vast_id=console)
    assert inst.origin == "adopted" and inst.created_by == staff and GpuConfig.get().vastai_instance_id == console
    page = client.get(f"/admin/gpu/vastinstance/{inst.pk}/change/").content.decode()
    assert "i2v follows the tunnel: when its URL changes" in page
    resp = client.post("/admin/gpu/vastinstance/", {"action": "auto_destroy_on", "_selected_action": [str(inst.pk)]},
                       follow=True)
    assert "Auto-destroy is on for 1 instance(s)." in resp.content.decode()
    client.post("/admin/gpu/vastinstance/", {"action": "destroy_selected", "_selected_action": [str(inst.pk)]})
    inst.refresh_from_db()
    assert inst.auto_destroy and inst.state == "destroyed" and vast.instances[console]["destroyed"]


def test_the_admin_shows_an_id_that_is_not_on_the_account_next_to_the_field(client, staff, policy, vast):
    client.force_login(staff)

    resp = _admin_config_post(client, vastai_instance_id=31337)

    assert resp.status_code == 200 and "vast.ai has no instance 31337 on this account" in resp.content.decode()
    assert GpuConfig.get().vastai_instance_id is None


def test_ports_missing_from_the_by_id_answer_are_read_from_the_list(staff_api, policy, vast, console):
    vast.show_includes_ports = False  # as Vast's QA tool reports of GET /instances/{id}/

    adopted = staff_api.post("/api/gpu/config", {"vastai_instance_id": console}).json()["vastai_instance"]

    row = VastInstance.objects.get(vast_id=console)
    assert row.portal_url == f"http://127.0.0.1:{vast.portal(console).port}" and row.template["ports"]
    assert "i2v follows the tunnel: when its URL changes, it reads the new one from the portal on 1111." in adopted["can"]
    assert vast.count("GET", "/api/v1/instances/") == 1  # the list, asked for this one id
