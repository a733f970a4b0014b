"""What one user can spend and probe: per-user request rates on the API routes that spend money or
reach out (generate, test-connection, health), answered 429 with Retry-After and a message; and
probing any URL other than the configured GPU is for staff only, other users seeing whether the
GPU is available but not where it is."""

import pytest

from generation.models import VideoJob
from tests.generation.test_generate_api import post_image
from tests.helpers import configured_comfyui, png_bytes
from tests.reliability.test_hostile_inputs import enqueued  # noqa: F401 -- fixture


@pytest.fixture
def comfy(db):
    with configured_comfyui() as double:
        yield double


def test_generate_rate_is_per_user_across_both_routes(api, other_token, client, settings, enqueued):
    from tests.conftest import Api

    settings.I2V_RATE_GENERATE = "3/m"
    assert post_image(api, {}, png_bytes()).status_code == 202
    assert post_image(api, {}, png_bytes()).status_code == 202
    resp = api.post("/api/vastai/generate-video", data={"prompt": "x", "workflow": "smoke", "image": _file()}, json=False)
    assert resp.status_code == 202, resp.content
    resp = post_image(api, {}, png_bytes())
    assert resp.status_code == 429
    assert "Too many requests" in resp.json()["detail"] and "Try again in" in resp.json()["detail"]
    assert 0 < int(resp["Retry-After"]) <= 60
    assert VideoJob.objects.count() == 3
    # Another user has a budget of their own.
    assert post_image(Api(client, other_token), {}, png_bytes()).status_code == 202


def _file():
    import io

    f = io.BytesIO(png_bytes())
    f.name = "in.png"
    return f


def test_probe_rate_covers_test_connection_and_health(staff_api, comfy, settings):
    settings.I2V_RATE_PROBE = "2/m"
    assert staff_api.get("/api/gpu/health").status_code == 200
    assert staff_api.post("/api/gpu/test-connection", {"url": comfy.url}).status_code == 200
    resp = staff_api.get("/api/gpu/health")
    assert resp.status_code == 429 and resp["Retry-After"].isdigit()
    before = comfy.count("GET", "/system_stats")
    assert staff_api.post("/api/gpu/test-connection", {"url": comfy.url}).status_code == 429
    assert comfy.count("GET", "/system_stats") == before  # refused before any probe


@pytest.mark.parametrize("url", ["http://127.0.0.1:22", "http://10.0.0.1:8188", "http://[::1]:6379",
                                 "http://169.254.169.254/"])
def test_non_staff_cannot_probe_other_urls(api, comfy, url):
    resp = api.post("/api/gpu/test-connection", {"url": url})
    assert resp.status_code == 403
    assert "Only staff can test a URL other than the configured ones" in resp.json()["detail"]


def test_non_staff_may_test_the_configured_gpu_without_learning_its_url(api, comfy):
    resp = api.post("/api/gpu/test-connection", {})
    body = resp.json()
    assert resp.status_code == 200 and body["reachable"] is True and body["api_type"] == "comfyui"
    assert body["url"] == "(configured)" and comfy.url not in resp.content.decode()


def test_non_staff_see_availability_not_urls(api, staff_api, comfy):
    health = api.get("/api/gpu/health")
    assert health.json()["comfyui_status"] == "available (API ready)"
    assert health.json()["comfyui_url"] is None and comfy.url not in health.content.decode()
    config = api.get("/api/gpu/config").json()
    assert config["comfyui_available"] is True and config["comfyui_url"] is None
    # Staff see where it is.
    assert staff_api.get("/api/gpu/health").json()["comfyui_url"] == comfy.url
    assert staff_api.get("/api/gpu/config").json()["comfyui_url"] == comfy.url
