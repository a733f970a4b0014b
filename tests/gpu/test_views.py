"""The GPU page: config and health, test connection, staff edits, instances, caps, offers, rent/destroy."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from gpu import views
from gpu.models import GpuConfig, GpuConfigChange, VastInstance
from tests.doubles.comfyui import ComfyUIDouble
from tests.doubles.vastai import VastAIDouble

HX = {"HX-Request": "true"}
State = VastInstance.State
pytestmark = pytest.mark.django_db


@pytest.fixture
def comfy():
    with ComfyUIDouble() as double:
        yield double


@pytest.fixture
def as_user(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def as_staff(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def as_staff_client(staff):
    """A staff browser next to `as_user`'s."""
    from django.test import Client

    other = Client()
    other.force_login(staff)
    return other


@pytest.fixture
def vast(db, settings, monkeypatch):
    """The vast.ai double behind settings, a rental policy needing no model download (smoke), tasks not run."""
    monkeypatch.setattr("django_q.tasks.async_task", lambda *args, **kw: None)
    with VastAIDouble(boot_seconds=None) as double:
        settings.VASTAI_API_KEY, settings.VASTAI_API_URL = double.api_key, double.url
        settings.VASTAI_RETRY_BACKOFF = 0.01
        configure(gpu_provider="vastai", default_workflow="smoke", max_instances=2)
        yield double


def rented(staff, offer_id=7310001):
    from gpu import lifecycle

    return lifecycle.create_instance(offer_id=offer_id, user=staff)


def configure(url="", **fields):
    config = GpuConfig.get()
    config.comfyui_url = url
    for key, value in fields.items():
        setattr(config, key, value)
    config.save()
    return config


@pytest.mark.parametrize("method,path", [("get", "/gpu/"), ("get", "/gpu/health"), ("post", "/gpu/test-connection"),
                                         ("post", "/gpu/config"), ("get", "/gpu/offers"), ("post", "/gpu/rent")])
def test_gpu_pages_redirect_anonymous_users_to_login(client, db, method, path):
    resp = getattr(client, method)(path)
    assert resp.status_code == 302 and resp["Location"].startswith("/accounts/login/")


def test_empty_state_on_first_use(as_staff, settings):
    settings.VASTAI_API_KEY = ""
    html = as_staff.get("/gpu/").content.decode()
    assert "No GPU configured yet — configure one or rent one" in html
    assert 'href="#config"' in html and 'href="#rent"' in html
    # Nothing to probe, so the status is there at once instead of loaded after.
    assert "ComfyUI</strong> not configured" in html and 'hx-trigger="load"' not in html
    assert "Set <code>VASTAI_API_KEY</code>" in html
    assert "No rented instances." in html


def test_configured_page_loads_health_after_render(as_staff, comfy):
    configure(comfy.url, gpu_provider="local", comfyui_token="s3cret-token")
    html = as_staff.get("/gpu/").content.decode()
    assert "No GPU configured yet" not in html
    assert 'hx-get="/gpu/health" hx-trigger="load"' in html and comfy.url in html
    assert "s3cret-token" not in html and "<dt>Token</dt><dd>set</dd>" in html
    assert comfy.count("GET", "/system_stats") == 0  # the page itself doesn't wait on the GPU


def test_non_staff_see_that_a_gpu_is_set_not_its_url(as_user, comfy):
    configure(comfy.url, gpu_provider="local")
    html = as_user.get("/gpu/").content.decode()
    assert 'hx-get="/gpu/health" hx-trigger="load"' in html and "<dd>set</dd>" in html
    assert comfy.url not in html and 'name="url"' not in html
    html = as_user.get("/gpu/health", headers=HX).content.decode()
    assert "available (API ready)" in html and comfy.url not in html


def test_health_partial_reports_comfyui_ready_with_its_gpu(as_user, comfy):
    configure(comfy.url)
    resp = as_user.get("/gpu/health", headers=HX)
    html = resp.content.decode()
    assert html.lstrip().startswith('<div id="health"') and "<html" not in html
    assert 'class="dot dot-ok"' in html and "available (API ready)" in html
    assert "GPU: NVIDIA GeForce RTX 5090" in html
    assert "hx-trigger" not in html
    # Without HTMX: the whole page, with the status filled in.
    page = as_user.get("/gpu/health").content.decode()
    assert "<html" in page and "available (API ready)" in page


def test_health_partial_reports_an_unreachable_url(as_user):
    configure("http://127.0.0.1:9")
    html = as_user.get("/gpu/health", headers=HX).content.decode()
    assert 'class="dot dot-bad"' in html and "unavailable" in html


def test_test_connection_shows_the_result_inline(as_staff, comfy):
    resp = as_staff.post("/gpu/test-connection", {"url": comfy.url + "/"}, headers=HX)
    html = resp.content.decode()
    assert resp.status_code == 200 and html.lstrip().startswith('<div id="test-result"')
    assert "ComfyUI is ready" in html and "NVIDIA GeForce RTX 5090" in html and "result-ok" in html
    assert "Queue: 0 running, 0 pending" in html


def test_test_connection_defaults_to_the_configured_url_and_sends_its_token(as_user, as_staff_client):
    with ComfyUIDouble(token="tok-123") as comfy:
        configure(comfy.url, comfyui_token="tok-123")
        html = as_user.post("/gpu/test-connection", {"url": ""}, headers=HX).content.decode()
        assert "ComfyUI is ready" in html
        # Another URL doesn't get the configured token.
        with ComfyUIDouble(token="tok-123") as other:
            html = as_staff_client.post("/gpu/test-connection", {"url": other.url}, headers=HX).content.decode()
            assert "Reachable, but not ready" in html and "Failed to authenticate" in html


def test_non_staff_cannot_probe_another_url(as_user, comfy):
    configure(comfy.url)
    for url in ("http://127.0.0.1:22", "http://10.0.0.1:8188", comfy.url + "/other"):
        resp = as_user.post("/gpu/test-connection", {"url": url}, headers=HX)
        assert resp.status_code == 403, url
    assert comfy.count("GET", "/system_stats") == 0


def test_test_connection_rejects_a_bad_url(as_staff, db):
    resp = as_staff.post("/gpu/test-connection", {"url": "ftp://x"}, headers=HX)
    assert resp.status_code == 422 and "The URL must start with http:// or https://." in resp.content.decode()
    page = as_staff.post("/gpu/test-connection", {"url": "http://127.0.0.1:9"})
    html = page.content.decode()
    assert page.status_code == 200 and "<html" in html and "Unreachable" in html


def test_config_form_is_for_staff_only(as_user, db):
    html = as_user.get("/gpu/").content.decode()
    assert 'id="config-form"' not in html and "Only staff can change the GPU configuration." in html
    assert as_user.post("/gpu/config", {"comfyui_url": "http://127.0.0.1:8188"}).status_code == 403
    assert GpuConfig.get().comfyui_url == "" and not GpuConfigChange.objects.exists()


def test_staff_sets_the_urls_and_the_change_is_recorded(as_staff, staff):
    resp = as_staff.post("/gpu/config", {"comfyui_url": "https://abc.trycloudflare.com/?token=open-tok",
                                         "swarmui_url": "http://127.0.0.1:7801/"}, headers=HX)
    assert resp.status_code == 200 and resp["HX-Redirect"] == "/gpu/"
    config = GpuConfig.get()
    assert (config.comfyui_url, config.swarmui_url, config.comfyui_token, config.gpu_provider) == (
        "https://abc.trycloudflare.com", "http://127.0.0.1:7801", "open-tok", "local")
    changes = {c.field: (c.new_value, c.source, c.user) for c in GpuConfigChange.objects.all()}
    assert changes["comfyui_url"] == ("https://abc.trycloudflare.com", "web", staff)
    assert changes["comfyui_token"][0] == "(set)"  # the secret itself is never recorded
    page = as_staff.get("/gpu/").content.decode()
    assert "GPU configuration saved." in page and "open-tok" not in page


def test_staff_url_errors_are_shown_next_to_the_field(as_staff):
    resp = as_staff.post("/gpu/config", {"comfyui_url": "http://user:pw@host", "swarmui_url": "nope"}, headers=HX)
    html = resp.content.decode()
    assert resp.status_code == 422 and html.lstrip().startswith('<form id="config-form"')
    assert re.search(r'id="error-comfyui_url">The URL must not contain a user name or password', html)
    assert re.search(r'id="error-swarmui_url">The URL must start with http:// or https://', html)
    assert 'value="http://user:pw@host"' in html
    assert GpuConfig.get().comfyui_url == "" and not GpuConfigChange.objects.exists()
    page = as_staff.post("/gpu/config", {"comfyui_url": "nope"})
    assert page.status_code == 422 and "<html" in page.content.decode()


def test_staff_can_remove_the_token(as_staff):
    configure("http://127.0.0.1:8188", comfyui_token="old")
    as_staff.post("/gpu/config", {"comfyui_url": "http://127.0.0.1:8188", "clear_token": "1"})
    assert GpuConfig.get().comfyui_token == ""


def test_instances_table_shows_rate_uptime_cost_and_time_left(as_staff, user):
    from generation.models import VideoJob

    now = timezone.now()
    configure(idle_minutes=15, max_instances=3)
    idle = VastInstance.objects.create(vast_id=111, gpu_name="RTX 4090", dph_total=Decimal("0.40"), state=State.RUNNING,
                                       created_at=now - timedelta(hours=2), ready_at=now - timedelta(hours=1),
                                       last_busy_at=now - timedelta(minutes=5))
    busy = VastInstance.objects.create(vast_id=222, gpu_name="RTX 5090", dph_total=Decimal("0.60"), state=State.RUNNING,
                                       created_at=now - timedelta(minutes=30), ready_at=now - timedelta(minutes=20))
    VideoJob.objects.create(owner=user, prompt="p", workflow_slug="wan22-i2v", width=16, height=16, frames=17, fps=8,
                            status="running", instance=busy)
    VastInstance.objects.create(vast_id=333, gpu_name="RTX 3090", state=State.DESTROYED, destroyed_at=now)
    html = as_staff.get("/gpu/").content.decode()
    # Newest first: the busy one, then the idle one.
    assert html.index(f'id="instance-{busy.id}"') < html.index(f'id="instance-{idle.id}"')
    row = html[html.index(f'id="instance-{idle.id}"'):html.index("</tbody>")]
    assert "RTX 4090" in row and "$0.40" in row and "2h 00m" in row and "$0.80" in row
    assert re.search(r"in (9|10)m \d\ds", row) and f'id="destroy-{idle.id}"' in row
    assert "busy (a job is running)" in html
    assert "RTX 3090" not in html  # destroyed ones are gone
    assert 'hx-get="/gpu/instances"' not in html  # nothing is changing state: no polling


def test_instances_poll_while_one_is_booting(as_staff):
    VastInstance.objects.create(vast_id=1, gpu_name="RTX 4090", state=State.LOADING, status_msg="pulling image")
    html = as_staff.get("/gpu/").content.decode()
    assert 'hx-get="/gpu/instances" hx-trigger="every 3s"' in html and "pulling image" in html
    part = as_staff.get("/gpu/instances", headers=HX).content.decode()
    assert part.lstrip().startswith('<section id="instances"') and "<html" not in part
    assert as_staff.get("/gpu/instances")["Location"] == "/gpu/"


def test_banners_when_instance_count_and_spend_are_at_their_caps(as_user):
    configure(max_instances=1, max_daily_spend=Decimal("0.01"))
    assert "cap reached" not in as_user.get("/gpu/").content.decode()
    # $36/hour: past a cent within a second of midnight UTC, whenever the test runs.
    VastInstance.objects.create(vast_id=1, gpu_name="A100", dph_total=Decimal("36.00"), state=State.RUNNING,
                                created_at=timezone.now() - timedelta(hours=6))
    html = as_user.get("/gpu/").content.decode()
    assert "Instance cap reached:</strong> 1 of 1 instance running." in html
    assert re.search(r"Daily spending cap reached:</strong> \$[\d,.]+ of \$0.01 spent on vast.ai today \(UTC\).", html)


def test_destroy_goes_through_provisioning_to_vast(as_staff, staff, vast):
    inst = rented(staff)
    assert [i["id"] for i in vast.live_instances()] == [inst.vast_id]
    html = as_staff.get("/gpu/").content.decode()
    assert f'id="destroy-{inst.id}"' in html and "RTX 4090" in html
    resp = as_staff.post(f"/gpu/instances/{inst.id}/destroy", headers=HX)
    html = resp.content.decode()
    inst.refresh_from_db()
    assert inst.state == State.DESTROYED and inst.destroy_reason == "destroyed by carol from the GPU page"
    assert vast.live_instances() == []
    assert html.lstrip().startswith('<section id="instances"') and f"Instance {inst.vast_id} is being destroyed." in html
    again = as_staff.post(f"/gpu/instances/{inst.id}/destroy", follow=True)
    assert f"Instance {inst.vast_id} is already destroyed." in again.content.decode()


def test_destroy_failure_is_reported(as_staff, staff, vast):
    inst = rented(staff)
    vast.fail_http("/instances/*", times=10, status=500, method="DELETE")
    html = as_staff.post(f"/gpu/instances/{inst.id}/destroy", follow=True).content.decode()
    assert f"Could not destroy instance {inst.vast_id}: Destroying vast.ai instance" in html
    inst.refresh_from_db()
    assert inst.state == State.DESTROYING  # the reconciler retries


def test_destroy_without_provisioning_says_so(as_staff, monkeypatch):
    monkeypatch.setattr(views, "_provisioning", lambda: None)
    inst = VastInstance.objects.create(vast_id=7, state=State.RUNNING)
    html = as_staff.post(f"/gpu/instances/{inst.id}/destroy", follow=True).content.decode()
    assert "needs the provisioning module" in html
    inst.refresh_from_db()
    assert inst.state == State.RUNNING


def test_destroy_is_for_staff_only(as_user):
    inst = VastInstance.objects.create(vast_id=8, state=State.RUNNING)
    assert as_user.post(f"/gpu/instances/{inst.id}/destroy").status_code == 403
    assert 'id="destroy-' not in as_user.get("/gpu/").content.decode()
    inst.refresh_from_db()
    assert inst.state == State.RUNNING


def test_offers_lists_the_cheapest_matching_ones(as_staff, vast):
    configure(max_dph=Decimal("0.50"), min_vram_gb=24)
    page = as_staff.get("/gpu/").content.decode()
    assert 'hx-get="/gpu/offers"' in page and vast.count("POST", "/bundles/") == 0
    html = as_staff.get("/gpu/offers", headers=HX).content.decode()
    assert html.lstrip().startswith('<div id="offers"')
    prices = re.findall(r'<td class="num">\$(\d+\.\d\d)</td>', html)
    assert prices and prices == sorted(prices) and all(Decimal(p) <= Decimal("0.50") for p in prices)
    assert "RTX 4090" in html and "RTX 3060" not in html  # 12 GB is under the VRAM floor
    assert 'name="offer_id" value="7310001"' in html and "Rent" in html


def test_offers_without_a_vast_key_or_with_a_refusal(as_staff, vast, settings):
    settings.VASTAI_API_KEY = ""
    assert "Set VASTAI_API_KEY" in as_staff.get("/gpu/offers", headers=HX).content.decode()
    settings.VASTAI_API_KEY = "wrong-key"
    html = as_staff.get("/gpu/offers").content.decode()
    assert "<html" in html and "vast.ai rejected the API key" in html and "wrong-key" not in html


def test_rent_goes_through_provisioning(as_staff, staff, vast):
    resp = as_staff.post("/gpu/rent", {"offer_id": "7310001"}, headers=HX)
    assert resp["HX-Redirect"] == "/gpu/"
    inst = VastInstance.objects.get()
    assert (inst.offer_id, inst.created_by, inst.gpu_name) == (7310001, staff, "RTX 4090")
    assert [i["id"] for i in vast.live_instances()] == [inst.vast_id]
    assert "Renting RTX 4090" in as_staff.get("/gpu/").content.decode()


def test_rent_of_a_vanished_offer_says_why(as_staff, vast):
    vast.take_offer(7310001)
    html = as_staff.post("/gpu/rent", {"offer_id": "7310001"}, follow=True).content.decode()
    assert "Could not rent the GPU: Offer 7310001 is not available" in html
    assert vast.live_instances() == []


def test_rent_is_refused_at_a_cap_and_for_non_staff(client, user, staff, vast):
    configure(max_instances=1)
    VastInstance.objects.create(vast_id=1, state=State.RUNNING)
    client.force_login(staff)
    html = client.post("/gpu/rent", {"offer_id": "7310001"}, follow=True).content.decode()
    assert "A cap is reached" in html and vast.live_instances() == []
    client.force_login(user)
    assert client.post("/gpu/rent", {"offer_id": "7310001"}).status_code == 403


def test_rent_without_provisioning_says_so(as_staff, monkeypatch):
    monkeypatch.setattr(views, "_provisioning", lambda: None)
    html = as_staff.post("/gpu/rent", {"offer_id": "1"}, follow=True).content.decode()
    assert "needs the provisioning module" in html and not VastInstance.objects.exists()


def test_staff_adopt_an_instance_rented_in_the_console_and_see_what_i2v_can_do(as_staff, vast):
    vast_id = vast.create_console_instance(portal=False, label="mine")

    resp = as_staff.post("/gpu/adopt", {"vastai_instance_id": str(vast_id)}, follow=True)

    html = resp.content.decode()
    inst = VastInstance.objects.get(vast_id=vast_id)
    assert inst.origin == "adopted" and not inst.auto_destroy
    assert f"Using vast.ai instance {vast_id}: its cost is tracked here." in html
    assert "No portal on 1111: i2v cannot follow the tunnel; paste the URL when it changes." in html
    assert f'id="auto-destroy-{inst.id}"' in html and "rented by you" in html
    assert GpuConfigChange.objects.filter(field="vastai_instance_id", source="web").exists()


def test_adopting_an_id_that_is_not_on_the_account_shows_the_error_in_the_form(as_staff, vast):
    resp = as_staff.post("/gpu/adopt", {"vastai_instance_id": "31337"}, headers=HX)

    assert resp.status_code == 422
    html = resp.content.decode()
    assert html.lstrip().startswith('<form id="adopt-form"') and "vast.ai has no instance 31337 on this account" in html
    assert not VastInstance.objects.exists() and GpuConfig.get().vastai_instance_id is None


def test_adopting_is_for_staff_only(as_user, vast):
    vast_id = vast.create_console_instance(portal=False)
    assert as_user.post("/gpu/adopt", {"vastai_instance_id": str(vast_id)}).status_code == 403
    assert not VastInstance.objects.exists()


def test_auto_destroy_is_switched_on_in_one_click(as_staff, vast):
    vast_id = vast.create_console_instance(portal=False)
    as_staff.post("/gpu/adopt", {"vastai_instance_id": str(vast_id)})
    inst = VastInstance.objects.get(vast_id=vast_id)

    html = as_staff.post(f"/gpu/instances/{inst.id}/auto-destroy", {"on": "1"}, headers=HX).content.decode()

    inst.refresh_from_db()
    assert inst.auto_destroy and f"Auto-destroy is on for instance {vast_id}" in html and "Turn off" in html
    as_staff.post(f"/gpu/instances/{inst.id}/auto-destroy", {"on": "0"})
    inst.refresh_from_db()
    assert not inst.auto_destroy
