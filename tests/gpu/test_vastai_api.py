"""GET /api/vastai/offers, GET/POST /api/vastai/instances, DELETE /api/vastai/instances/{id} against the vast.ai double."""

from datetime import timedelta

import pytest
from django.utils import timezone

from gpu import lifecycle
from gpu.models import VastInstance
from tests.conftest import free_port
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)
from tests.gpu.vast_helpers import CHEAPEST_MATCHING, NEXT_CHEAPEST, live_vast_ids, rent

pytestmark = pytest.mark.django_db
OFFER_KEYS = {"id", "gpu_name", "num_gpus", "vram_gb", "dph", "reliability", "location", "inet_down", "machine_id", "verified"}


def test_offers_list_the_cheapest_matching_ones(api, policy, vast):
    resp = api.get("/api/vastai/offers?limit=3")

    assert resp.status_code == 200
    offers = resp.json()
    assert len(offers) == 3 and set(offers[0]) == OFFER_KEYS
    assert offers[0]["id"] == CHEAPEST_MATCHING and offers[0]["gpu_name"] == "RTX 4090" and offers[0]["vram_gb"] == 24.0
    assert offers[0]["location"] == "Washington, US" and offers[0]["inet_down"] == 850.0
    assert [o["dph"] for o in offers] == sorted(o["dph"] for o in offers)


def test_offers_take_gpu_and_price_filters(api, policy, vast):
    resp = api.get("/api/vastai/offers?gpu_names=RTX%205090&max_dph=0.6")

    assert resp.status_code == 200
    assert [o["id"] for o in resp.json()] == [NEXT_CHEAPEST]


@pytest.mark.parametrize("query, field", [("limit=0", "limit"), ("limit=abc", "limit"), ("max_dph=-1", "max_dph"),
                                          ("min_vram_gb=0", "min_vram_gb")])
def test_offers_bad_query_is_422_naming_the_field(api, policy, vast, query, field):
    resp = api.get(f"/api/vastai/offers?{query}")

    assert resp.status_code == 422 and field in resp.json()["detail"]


def test_offers_when_vast_is_unreachable_are_503(api, policy, settings):
    settings.VASTAI_API_URL = f"http://127.0.0.1:{free_port()}/api/v0"

    resp = api.get("/api/vastai/offers")

    assert resp.status_code == 503 and "Cannot reach vast.ai" in resp.json()["detail"]


def test_offers_without_an_api_key_say_what_to_set(api, policy, settings):
    settings.VASTAI_API_KEY = ""

    resp = api.get("/api/vastai/offers")

    assert resp.status_code == 503 and "set VASTAI_API_KEY" in resp.json()["detail"]


def test_offers_need_authentication(anon_api, policy, vast):
    assert anon_api.get("/api/vastai/offers").status_code == 401
    assert vast.count("POST", "/bundles/") == 0


def test_rent_is_staff_only(api, policy, vast):
    resp = api.post("/api/vastai/instances", {})

    assert resp.status_code == 403 and "Only staff" in resp.json()["detail"]
    assert vast.count("PUT", "/asks/*") == 0 and not VastInstance.objects.exists()


def test_rent_answers_202_with_the_booting_instance(staff_api, api, policy, vast):
    resp = staff_api.post("/api/vastai/instances", {})

    assert resp.status_code == 202
    body = resp.json()
    row = VastInstance.objects.get()
    assert body["id"] == str(row.id) and body["vast_id"] == row.vast_id and body["state"] == "creating"
    assert body["offer_id"] == CHEAPEST_MATCHING and body["label"] == f"i2v:{row.id}" and body["dph"] == 0.3617
    assert "web_password" not in body and row.web_password not in resp.content.decode()
    assert live_vast_ids(vast) == [row.vast_id]
    listed = api.get("/api/vastai/instances").json()
    assert [i["id"] for i in listed["items"]] == [str(row.id)] and listed["max_daily_spend_usd"] == 20.0


def test_rent_a_given_offer(staff_api, policy, vast):
    resp = staff_api.post("/api/vastai/instances", {"offer_id": NEXT_CHEAPEST})

    assert resp.status_code == 202 and resp.json()["gpu_name"] == "RTX 5090"


def test_rent_at_the_instance_limit_is_409(staff_api, policy, vast):
    assert staff_api.post("/api/vastai/instances", {}).status_code == 202

    resp = staff_api.post("/api/vastai/instances", {})

    assert resp.status_code == 409 and "At the limit of 1 vast.ai instance" in resp.json()["detail"]
    assert len(live_vast_ids(vast)) == 1


def test_rent_over_the_spend_cap_is_409(staff_api, policy, vast):
    policy.max_daily_spend = 0.1
    policy.save()

    resp = staff_api.post("/api/vastai/instances", {})

    assert resp.status_code == 409 and "Daily spend cap" in resp.json()["detail"]


@pytest.mark.parametrize("body", [{"offer_id": "abc"}, {"offer_id": -5}, {"offer_id": 1.5}, {"nope": 1}, [1, 2]])
def test_rent_with_bad_input_is_422(staff_api, policy, vast, body):
    resp = staff_api.post("/api/vastai/instances", body)

    assert resp.status_code == 422 and resp.json()["detail"]
    assert vast.count("PUT", "/asks/*") == 0


def test_rent_with_a_broken_json_body_is_a_4xx(client, staff_token, policy, vast):
    resp = client.post("/api/vastai/instances", data="{not json", content_type="application/json",
                       headers={"Authorization": f"Bearer {staff_token}"})

    assert 400 <= resp.status_code < 500 and resp.json()["detail"]


def test_rent_when_vast_is_unreachable_is_503(staff_api, policy, settings):
    settings.VASTAI_API_URL = f"http://127.0.0.1:{free_port()}/api/v0"

    resp = staff_api.post("/api/vastai/instances", {})

    assert resp.status_code == 503 and "Cannot reach vast.ai" in resp.json()["detail"]


def test_destroy_ends_the_rental_and_is_idempotent(staff_api, policy, vast):
    row = rent()

    resp = staff_api.delete(f"/api/vastai/instances/{row.id}")

    assert resp.status_code == 200 and resp.json()["state"] == "destroyed" and resp.json()["destroyed_at"]
    assert live_vast_ids(vast) == [] and "through the API" in resp.json()["destroy_reason"]
    again = staff_api.delete(f"/api/vastai/instances/{row.vast_id}")  # by vast.ai id, a second time
    assert again.status_code == 200 and again.json()["state"] == "destroyed"
    assert vast.count("DELETE", "/instances/*") == 1


def test_destroy_is_staff_only_and_unknown_ids_are_404(api, staff_api, policy, vast):
    row = rent()

    assert api.delete(f"/api/vastai/instances/{row.id}").status_code == 403
    assert staff_api.delete("/api/vastai/instances/00000000-0000-0000-0000-000000000000").status_code == 404
    assert staff_api.delete("/api/vastai/instances/not-an-id").status_code == 404
    assert live_vast_ids(vast) == [row.vast_id]


def test_destroy_when_vast_is_unreachable_is_503_and_stays_destroying(staff_api, policy, vast, settings):
    row = rent()
    settings.VASTAI_API_URL = f"http://127.0.0.1:{free_port()}/api/v0"

    resp = staff_api.delete(f"/api/vastai/instances/{row.id}")

    assert resp.status_code == 503 and "Cannot reach vast.ai" in resp.json()["detail"]
    row.refresh_from_db()
    assert row.state == "destroying"


def test_instance_list_shows_cost_so_far_and_hides_history_unless_asked(api, policy, vast):
    old = rent()
    lifecycle.destroy_instance(old, "done")
    live = rent()
    VastInstance.objects.filter(pk=live.pk).update(created_at=timezone.now() - timedelta(hours=2))

    listed = api.get("/api/vastai/instances").json()

    assert [i["id"] for i in listed["items"]] == [str(live.id)]
    assert 0.72 < listed["items"][0]["cost_usd"] < 0.73  # 2 h at $0.3617/h
    assert listed["spend_today_usd"] > 0
    everything = api.get("/api/vastai/instances?all=true").json()
    assert {i["id"] for i in everything["items"]} == {str(old.id), str(live.id)}
    one = api.get(f"/api/vastai/instances/{live.vast_id}").json()
    assert one["id"] == str(live.id) and one["state"] == "creating"
