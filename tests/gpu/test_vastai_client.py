"""gpu.vastai.VastAIClient against the vast.ai test double (a real HTTP server on 127.0.0.1)."""

import logging
import os

import pytest

# netguard reads Django settings; these tests need no database.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "i2v.settings_test")

from gpu.vastai import AUTH_MESSAGE, VastAIClient, VastAIError, comfyui_url_of, portal_url_of  # noqa: E402
from tests.doubles.vastai import VastAIDouble, make_offer  # noqa: E402

ENV = {
    "-p 1111:1111": "1",
    "-p 8188:8188": "1",
    "OPEN_BUTTON_PORT": "1111",
    "OPEN_BUTTON_TOKEN": "1",
    "WEB_PASSWORD": "per-instance-secret",
    "PORTAL_CONFIG": "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI",
}


@pytest.fixture
def vast():
    with VastAIDouble(comfyui_port=18188, portal_port=11111) as double:
        yield double


@pytest.fixture
def client(vast):
    with VastAIClient(vast.api_key, vast.url, backoff=0.01, read_timeout=5, pace_scale=0.001) as c:
        yield c


def create(client, offer_id=7310001, **overrides):
    kwargs = {"image": "vastai/comfy:v0.3.64-cuda-12.8", "disk_gb": 80, "env": dict(ENV), "onstart": "entrypoint.sh",
              "label": "i2v:worker-1"}
    kwargs.update(overrides)
    return client.create_instance(offer_id, **kwargs)


# ------------------------------------------------------------------ search


def test_search_offers_default_filters_return_verified_24gb_single_gpu_cheapest_first(client):
    offers = client.search_offers()

    prices = [o["dph_total"] for o in offers]
    assert prices == sorted(prices)
    assert offers, "the default offers include several 24 GB+ cards"
    assert all(o["gpu_ram"] >= 24000 and o["num_gpus"] == 1 and o["verification"] == "verified" for o in offers)
    ids = {o["id"] for o in offers}
    assert 7310008 not in ids  # the 12 GB RTX 3060
    assert 7310002 not in ids  # unverified
    assert 7310009 not in ids  # 2 GPUs
    assert offers[0]["id"] == 7310004  # the $0.178 RTX 3090, the cheapest that qualifies


def test_search_offers_sends_the_documented_body(client, vast):
    client.search_offers(min_vram_gb=32, gpu_names=["RTX_5090"], max_dph=0.8, disk_gb=80, limit=5)

    body = vast.requests_to("POST", "/bundles/")[-1].json
    assert body["gpu_ram"] == {"gte": 32000}
    assert body["gpu_name"] == {"in": ["RTX 5090"]}
    assert body["dph_total"] == {"lte": 0.8}
    assert body["type"] == "on-demand"
    assert body["order"] == [["dph_total", "asc"]]
    assert body["verified"] == {"eq": True} and body["rentable"] == {"eq": True} and body["rented"] == {"eq": False}
    assert body["allocated_storage"] == 80.0


def test_search_offers_names_and_price_cap_narrow_the_result(client):
    offers = client.search_offers(gpu_names=["RTX 5090", "RTX 4090"], max_dph=0.6)

    assert [o["gpu_name"] for o in offers] and {o["gpu_name"] for o in offers} <= {"RTX 5090", "RTX 4090"}
    assert all(o["dph_total"] <= 0.6 for o in offers)
    assert 7310003 not in {o["id"] for o in offers}  # the $0.61 RTX 5090


def test_search_offers_min_vram_32_only_returns_big_cards(client):
    offers = client.search_offers(min_vram_gb=32)

    assert {o["gpu_name"] for o in offers} == {"RTX 5090", "A100 SXM4"}


def test_search_offers_excluded_and_unreliable_machines_are_dropped(client):
    cheapest = client.search_offers()[0]

    offers = client.search_offers(exclude_machines=[cheapest["machine_id"]], min_reliability=0.98, min_inet_down=500)

    assert cheapest["machine_id"] not in {o["machine_id"] for o in offers}
    assert all(o["reliability"] >= 0.98 and o["inet_down"] >= 500 for o in offers)
    assert 7310004 not in {o["id"] for o in offers}  # reliability 0.972
    assert 7310006 not in {o["id"] for o in offers}  # 95 Mbps line


def test_search_offers_limit_applies_after_exclusion(client, vast):
    vast.offers = [make_offer(9000 + i, "RTX 4090", 0.30 + i / 100, machine_id=500 + i) for i in range(6)]

    offers = client.search_offers(limit=3, exclude_machines=[500, 501])

    assert [o["machine_id"] for o in offers] == [502, 503, 504]


def test_search_offers_disk_size_is_priced_in(client):
    small = {o["id"]: o["dph_total"] for o in client.search_offers(disk_gb=10)}
    big = {o["id"]: o["dph_total"] for o in client.search_offers(disk_gb=200)}

    assert small.keys() == big.keys()
    assert all(big[i] > small[i] for i in small)


def test_search_offers_rented_offer_disappears(client, vast):
    vast.take_offer(7310010)

    assert 7310010 not in {o["id"] for o in client.search_offers()}


def test_search_offers_daily_quota_is_not_retried(client, vast):
    vast.search_quota_exceeded = True

    with pytest.raises(VastAIError) as info:
        client.search_offers()

    assert info.value.kind == "quota"
    assert "UTC midnight" in str(info.value)
    assert vast.count("POST", "/bundles/") == 1


# ------------------------------------------------------------------ create


def test_create_instance_returns_the_new_id_and_rents_the_offer(client, vast):
    created = create(client)

    assert created["id"] in vast.instances
    assert created["instance_api_key"] == vast.instance_api_key(created["id"])
    assert vast.offer(7310001)["rented"] is True
    body = vast.requests_to("PUT", "/asks/*")[-1].json
    assert body["image"] == "vastai/comfy:v0.3.64-cuda-12.8"
    assert body["env"]["-p 8188:8188"] == "1"
    assert body["disk"] == 80 and body["label"] == "i2v:worker-1" and body["runtype"] == "jupyter_direct"
    assert "template_hash_id" not in body


def test_create_instance_from_a_template_leaves_the_image_out(client, vast):
    create(client, image=None, template_hash="4e17788f74f075dd9aab7d0d4427968f")

    body = vast.requests_to("PUT", "/asks/*")[-1].json
    assert body["template_hash_id"] == "4e17788f74f075dd9aab7d0d4427968f"
    assert "image" not in body


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"env": {**ENV, "PROVISIONING_SCRIPT": "https://example.com/" + "x" * 300}}, "env PROVISIONING_SCRIPT"),
        ({"env": {f"VAR_{i}": "v" * 250 for i in range(140)}}, "in total"),
        ({"onstart": "echo hi\n" * 600}, "onstart"),
        ({"label": "l" * 257}, "label"),
        ({"disk_gb": 4}, "disk_gb"),
        ({"image": None}, "image"),
        ({"runtype": "jupyter_turbo"}, "runtype"),
    ],
)
def test_create_instance_over_a_limit_fails_locally_naming_it(client, vast, overrides, named):
    with pytest.raises(VastAIError) as info:
        create(client, **overrides)

    assert info.value.kind == "invalid"
    assert named in str(info.value)
    assert vast.count("PUT", "/asks/*") == 0


def test_create_instance_too_long_value_message_hides_the_value(client):
    secret = "s3cr3t-" + "q" * 300

    with pytest.raises(VastAIError) as info:
        create(client, env={**ENV, "WEB_PASSWORD": secret})

    assert "WEB_PASSWORD" in str(info.value)
    assert secret not in str(info.value)


def test_create_instance_server_side_400_is_invalid_with_vasts_message(client, vast):
    vast.fail_http("/asks/*", status=400, body={"success": False, "error": "invalid_args", "msg": "error 400/3467: bad image name"})

    with pytest.raises(VastAIError) as info:
        create(client)

    assert info.value.kind == "invalid" and info.value.status == 400
    assert "bad image name" in str(info.value)


def test_create_instance_vanished_offer_is_offer_gone(client, vast):
    vast.remove_offer(7310001)

    with pytest.raises(VastAIError) as info:
        create(client)

    assert info.value.kind == "offer_gone" and info.value.status == 404
    assert "another offer" in str(info.value)


def test_create_instance_offer_rented_by_someone_else_is_offer_gone(client, vast):
    vast.take_offer(7310001)

    with pytest.raises(VastAIError) as info:
        create(client)

    assert info.value.kind == "offer_gone" and info.value.status == 410


def test_create_instance_rate_limited_is_not_retried(client, vast):
    vast.rate_limit("/asks/*", times=1)

    with pytest.raises(VastAIError) as info:
        create(client)

    assert info.value.kind == "rate_limited"
    assert vast.count("PUT", "/asks/*") == 1
    assert vast.live_instances() == []


def test_create_instance_502_is_not_retried(client, vast):
    vast.fail_http("/asks/*", status=502, body="<html>Bad Gateway</html>", content_type="text/html")

    with pytest.raises(VastAIError):
        create(client)

    assert vast.count("PUT", "/asks/*") == 1


# ------------------------------------------------------------------ retries and auth


def test_show_instance_retries_after_rate_limit(client, vast):
    instance_id = create(client)["id"]
    vast.rate_limit("/instances/*", times=2, method="GET")

    shown = client.show_instance(instance_id)

    assert shown["id"] == instance_id
    assert vast.count("GET", "/instances/*") == 3


def test_destroy_instance_retries_after_rate_limit(client, vast):
    instance_id = create(client)["id"]
    vast.rate_limit("/instances/*", times=1, method="DELETE", plain=True)

    assert client.destroy_instance(instance_id) is True
    assert vast.live_instances() == []


def test_retry_waits_at_least_retry_after(client, vast):
    waits = []
    client._sleep = waits.append
    vast.rate_limit("/api/v1/instances/", times=1, retry_after=3)

    assert client.list_instances() == []
    assert waits == [3.0]


def test_retry_after_longer_than_the_cap_is_raised_with_the_wait(vast):
    vast.rate_limit("/api/v1/instances/", times=1, retry_after=120)
    with VastAIClient(vast.api_key, vast.url, backoff=0.01, max_retry_wait=30) as client:
        with pytest.raises(VastAIError) as info:
            client.list_instances()

    assert info.value.kind == "rate_limited" and info.value.retry_after == 120
    assert "120s" in str(info.value)
    assert vast.count("GET", "/api/v1/instances/") == 1


def test_list_instances_gives_up_after_bounded_retries(client, vast):
    vast.rate_limit("/api/v1/instances/", times=10)

    with pytest.raises(VastAIError) as info:
        client.list_instances()

    assert info.value.kind == "rate_limited"
    assert vast.count("GET", "/api/v1/instances/") == 4  # 1 + retries=3


def test_gateway_error_then_success_is_retried(client, vast):
    vast.fail_http("/api/v1/instances/", status=503, body="upstream unavailable")

    assert client.list_instances() == []
    assert vast.count("GET", "/api/v1/instances/") == 2


def test_wrong_api_key_says_so_without_the_key(vast):
    key = "wrong-key-9f8e7d6c5b4a"
    with VastAIClient(key, vast.url, backoff=0.01) as client:
        with pytest.raises(VastAIError) as info:
            client.list_instances()

    assert info.value.kind == "auth" and info.value.status == 401
    assert str(info.value) == AUTH_MESSAGE
    assert key not in str(info.value) and key not in repr(client)
    assert vast.count("GET", "/api/v1/instances/") == 1


def test_api_key_goes_in_the_bearer_header_only(client, vast):
    client.list_instances()

    request = vast.requests[-1]
    assert request.headers["Authorization"] == f"Bearer {vast.api_key}"
    assert "api_key" not in request.query


def test_missing_api_key_is_an_auth_error():
    with pytest.raises(VastAIError) as info:
        VastAIClient("", "http://127.0.0.1:9/api/v0")

    assert info.value.kind == "auth" and "VASTAI_API_KEY" in str(info.value)


def test_unreachable_api_is_reported_with_the_url(vast):
    url = vast.url
    vast.stop()
    with VastAIClient(vast.api_key, url, retries=1, backoff=0.01) as client:
        with pytest.raises(VastAIError) as info:
            client.list_instances()

    assert info.value.kind == "unreachable"
    assert url in str(info.value)


def test_non_json_answer_is_a_bad_response(client, vast):
    vast.fail_http("/api/v1/instances/", status=200, body="<html>maintenance</html>", content_type="text/html")

    with pytest.raises(VastAIError) as info:
        client.list_instances()

    assert info.value.kind == "bad_response"


def test_retry_log_lines_never_contain_the_key(client, vast, caplog):
    vast.rate_limit("/api/v1/instances/", times=1)

    with caplog.at_level(logging.WARNING, logger="gpu.vastai"):
        client.list_instances()

    assert caplog.records
    assert vast.api_key not in caplog.text


# ------------------------------------------------------------------ lifecycle


def test_instance_lifecycle_loading_running_destroyed(vast, client):
    vast.boot_seconds = None  # manual: the test drives the status
    instance_id = create(client)["id"]

    shown = client.show_instance(instance_id)
    assert shown["actual_status"] is None and shown["intended_status"] == "running"
    assert comfyui_url_of(shown) is None

    vast.advance(instance_id, "loading")
    shown = client.show_instance(instance_id)
    assert shown["actual_status"] == "loading" and "ports" not in shown

    vast.advance(instance_id, "running")
    shown = client.show_instance(instance_id)
    assert shown["actual_status"] == "running"
    assert shown["gpu_name"] == "RTX 4090" and shown["label"] == "i2v:worker-1"
    assert ["WEB_PASSWORD", "per-instance-secret"] in shown["extra_env"]
    assert comfyui_url_of(shown) == "http://127.0.0.1:18188"

    listed = client.list_instances()
    assert [i["id"] for i in listed] == [instance_id]
    assert listed[0]["ports"]["8188/tcp"][0] == {"HostIp": "0.0.0.0", "HostPort": "18188"}
    assert portal_url_of(listed[0]) == "http://127.0.0.1:11111"

    assert client.destroy_instance(instance_id) is True
    assert client.show_instance(instance_id) is None
    assert client.list_instances() == []
    assert vast.instances[instance_id]["destroyed"] is True
    assert vast.offer(7310001)["rented"] is False


def test_instance_boots_on_the_clock_by_default(client):
    instance_id = create(client)["id"]

    assert client.show_instance(instance_id)["actual_status"] == "running"


def test_instance_still_provisioning_has_no_status_and_no_url(vast, client):
    vast.provision_seconds = 3600
    instance_id = create(client)["id"]

    shown = client.show_instance(instance_id)

    assert shown["actual_status"] is None
    assert comfyui_url_of(shown) is None


def test_instance_that_fails_to_boot_shows_a_dead_status(vast, client):
    vast.boot_outcome = "exited"
    instance_id = create(client)["id"]

    shown = client.show_instance(instance_id)

    assert shown["actual_status"] == "exited"
    assert "Error response from daemon" in shown["status_msg"]
    assert comfyui_url_of(shown) is None


def test_show_instance_accepts_a_one_element_list(vast, client):
    vast.show_shape = "list"
    instance_id = create(client)["id"]

    assert client.show_instance(instance_id)["id"] == instance_id


def test_show_instance_unknown_id_is_none(client):
    assert client.show_instance(99999999) is None


def test_destroy_unknown_instance_returns_false(client):
    assert client.destroy_instance(99999999) is False


def test_destroy_twice_returns_false_the_second_time(client):
    instance_id = create(client)["id"]

    assert client.destroy_instance(instance_id) is True
    assert client.destroy_instance(instance_id) is False


def test_stop_and_start_change_the_intended_status(vast, client):
    instance_id = create(client)["id"]

    client.set_state(instance_id, "stopped")
    shown = client.show_instance(instance_id)
    assert shown["intended_status"] == "stopped" and shown["actual_status"] == "stopped"
    assert comfyui_url_of(shown) is None

    client.set_state(instance_id, "running")
    assert client.show_instance(instance_id)["actual_status"] == "running"


def test_set_label_renames_the_instance(vast, client):
    instance_id = create(client)["id"]

    client.set_label(instance_id, "i2v:worker-1:idle")

    assert vast.instances[instance_id]["label"] == "i2v:worker-1:idle"


def test_set_state_of_unknown_instance_is_not_found(client):
    with pytest.raises(VastAIError) as info:
        client.set_state(99999999, "stopped")

    assert info.value.kind == "not_found"


def test_set_state_rejects_unknown_states_locally(client, vast):
    with pytest.raises(VastAIError) as info:
        client.set_state(1, "paused")

    assert info.value.kind == "invalid"
    assert vast.count("PUT", "/instances/*") == 0


def test_current_user_reports_credit(client):
    assert client.current_user()["credit"] == 25.0


# ------------------------------------------------------------------ comfyui_url_of


@pytest.mark.parametrize(
    ("instance", "url"),
    [
        ({"actual_status": "running", "public_ipaddr": "203.0.113.7",
          "ports": {"8188/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}}, "http://203.0.113.7:41234"),
        ({"actual_status": "running", "public_ipaddr": "203.0.113.7\n",
          "ports": {"8188/tcp": [{"HostIp": "0.0.0.0", "HostPort": 41234}]}}, "http://203.0.113.7:41234"),
        ({"actual_status": "loading", "public_ipaddr": "203.0.113.7",
          "ports": {"8188/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}}, None),
        ({"actual_status": "running", "public_ipaddr": "203.0.113.7"}, None),
        ({"actual_status": "running", "public_ipaddr": "203.0.113.7", "ports": {"8188/tcp": [8188]}}, None),
        ({"actual_status": "running", "public_ipaddr": "203.0.113.7", "ports": {"22/tcp": [{"HostPort": "2222"}]}}, None),
        ({"actual_status": "running", "public_ipaddr": "",
          "ports": {"8188/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}}, None),
    ],
)
def test_comfyui_url_of_only_when_running_with_a_mapped_port(instance, url):
    assert comfyui_url_of(instance) == url


def test_a_429_without_retry_after_waits_the_endpoints_interval(vast):
    client = VastAIClient(vast.api_key, vast.url, backoff=0.01)
    waits = []
    client._sleep = waits.append
    iid = create(client)["id"]
    vast.rate_limit("/instances/*", times=1, method="GET")
    vast.rate_limit("/instances/*", times=1, method="DELETE", plain=True)

    assert client.show_instance(iid)["id"] == iid
    assert client.destroy_instance(iid) is True
    assert waits == [2.0, 3.0]  # vast.ai's minimum intervals for show and destroy, not a blind 0.5 s


def test_a_rate_limited_create_says_how_long_vast_asks_to_wait(vast):
    client = VastAIClient(vast.api_key, vast.url)
    vast.rate_limit("/asks/*", times=1)

    with pytest.raises(VastAIError) as info:
        create(client)

    assert info.value.kind == "rate_limited" and info.value.retry_after == 12.0  # create's penalty
    assert vast.count("PUT", "/asks/*") == 1 and vast.live_instances() == []


def test_create_has_its_own_long_read_timeout(vast):
    with VastAIClient(vast.api_key, vast.url, read_timeout=5) as client:
        sent = []
        real = client._http.request
        client._http.request = lambda *a, **kw: sent.append(kw["timeout"]) or real(*a, **kw)
        iid = create(client)["id"]
        client.show_instance(iid)
        client.destroy_instance(iid)

    assert [t.read for t in sent] == [120.0, 5, 5]


def test_the_direct_url_is_https_when_the_instance_serves_https(client, vast):
    iid = create(client, env={**ENV, "ENABLE_HTTPS": "true"})["id"]
    vast.advance(iid, "running")

    info = client.show_instance(iid)

    assert comfyui_url_of(info) == "https://127.0.0.1:18188" and portal_url_of(info) == "https://127.0.0.1:11111"
    client.destroy_instance(iid)


def test_an_instance_without_https_keeps_the_plain_direct_url(client, vast):
    iid = create(client)["id"]
    vast.advance(iid, "running")

    assert comfyui_url_of(client.show_instance(iid)) == "http://127.0.0.1:18188"
    client.destroy_instance(iid)
