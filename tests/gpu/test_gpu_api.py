"""The seed's /api/gpu/* endpoints against real servers on 127.0.0.1."""

import json
import logging
import socket

import pytest

from gpu.models import GpuConfig, GpuConfigChange, VastInstance
from tests.conftest import free_port
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import StaticServer

SESSION = json.dumps({"session_id": "9D35A1", "user_id": "local", "output_append_user": True,
                      "version": "0.6.3.0.GIT-abc", "server_id": "s1", "permissions": []}).encode()


@pytest.fixture
def comfy():
    with ComfyUIDouble() as double:
        yield double


@pytest.fixture
def swarm():
    routes = {
        "/API/GetNewSession": (200, {"Content-Type": "application/json"}, SESSION),
        "/system_stats": (302, {"Location": "/Error/404"}, b""),
        "/Error/404": (404, {"Content-Type": "text/html"}, b"<html>404</html>"),
    }
    with StaticServer(routes) as srv:
        yield srv


def probe(staff_api, url, **extra):
    resp = staff_api.post("/api/gpu/test-connection", {"url": url, **extra})
    assert resp.status_code == 200, resp.content
    return resp.json()


def test_config_get_has_the_seed_shape(api):
    body = api.get("/api/gpu/config").json()
    assert body == {"comfyui_url": None, "comfyui_available": False, "swarmui_url": None, "swarmui_available": False,
                    "gpu_provider": "none", "vastai_instance_id": None, "vastai_instance": None}


def test_config_post_updates_and_reports_availability(staff_api, staff, comfy):
    resp = staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url + "/", "gpu_provider": "local",
                                              "comfyui_token": "tok-123"})
    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert body["comfyui_url"] == comfy.url and body["gpu_provider"] == "local"
    assert body["comfyui_available"] is True
    assert "tok-123" not in resp.content.decode()
    config = GpuConfig.get()
    assert config.comfyui_token == "tok-123"
    changes = {c.field: c for c in GpuConfigChange.objects.all()}
    assert changes["comfyui_token"].new_value == "(set)" and "tok-123" not in changes["comfyui_token"].old_value
    assert changes["gpu_provider"].old_value == "none" and changes["gpu_provider"].new_value == "local"
    assert changes["comfyui_url"].user == staff


def test_config_available_true_when_comfyui_answers(staff_api, comfy):
    staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url})
    assert staff_api.get("/api/gpu/config").json()["comfyui_available"] is True


def test_config_availability_is_cached(staff_api, comfy):
    staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url})
    before = comfy.count("GET", "/system_stats")
    for _ in range(5):
        staff_api.get("/api/gpu/config")
    assert comfy.count("GET", "/system_stats") - before <= 1


@pytest.mark.parametrize("payload, words", [
    ({"comfyui_url": "ftp://x"}, "comfyui_url"),
    ({"comfyui_url": "http://"}, "comfyui_url"),
    ({"swarmui_url": "not a url"}, "swarmui_url"),
    ({"gpu_provider": "aws"}, "gpu_provider"),
    ({"vastai_instance_id": "abc"}, "vastai_instance_id"),
    ({"vastai_instance_id": 424242}, "vastai_instance_id"),
    ({"colour": "red"}, "colour"),
    ({"comfyui_url": 5}, "comfyui_url"),
])
def test_config_bad_input_is_422_naming_the_field(staff_api, payload, words):
    resp = staff_api.post("/api/gpu/config", payload)
    assert resp.status_code == 422, resp.content
    assert words in resp.json()["detail"]
    assert GpuConfig.get().gpu_provider == "none"


def test_config_known_instance_is_accepted(staff_api, db):
    VastInstance.objects.create(vast_id=777, state="running")
    assert staff_api.post("/api/gpu/config", {"vastai_instance_id": 777}).json()["vastai_instance_id"] == 777


def test_config_post_needs_staff(api):
    resp = api.post("/api/gpu/config", {"gpu_provider": "local"})
    assert resp.status_code == 403 and "staff" in resp.json()["detail"]
    assert GpuConfig.get().gpu_provider == "none"


def test_config_post_needs_auth(anon_api, db):
    assert anon_api.post("/api/gpu/config", {"gpu_provider": "local"}).status_code == 401


def test_test_connection_detects_comfyui_with_details(staff_api, comfy):
    result = probe(staff_api, comfy.url)
    assert result["reachable"] is True and result["api_type"] == "comfyui"
    d = result["details"]
    assert d["comfyui_version"] and d["devices"][0]["name"].startswith("cuda:0 NVIDIA GeForce RTX 5090")
    assert d["devices"][0]["vram_total_gb"] > 0 and d["queue_pending"] == 0


def test_test_connection_detects_swarmui(staff_api, swarm):
    result = probe(staff_api, swarm.url)
    assert result["reachable"] is True and result["api_type"] == "swarmui"
    assert result["details"]["swarmui_version"].startswith("0.6.3")


@pytest.mark.parametrize("status", [502, 200])
def test_test_connection_vast_placeholder_is_not_ready(staff_api, status):
    with ComfyUIDouble(placeholder=True, placeholder_status=status) as comfy:
        result = probe(staff_api, comfy.url)
    assert result["reachable"] is True and result["api_type"] is None
    assert result["details"]["message"] == "Instance not ready: ComfyUI is still starting (2-5 min)"


def test_test_connection_wrong_token_says_authenticate(staff_api):
    with ComfyUIDouble(token="right") as comfy:
        bad = probe(staff_api, comfy.url, token="wrong")
        good = probe(staff_api, comfy.url, token="right")
    assert bad["reachable"] is True and bad["api_type"] is None
    assert bad["details"]["message"].startswith("Failed to authenticate: the tunnel URL may have expired")
    assert good["api_type"] == "comfyui"


def test_test_connection_uses_the_configured_token_for_the_configured_url(staff_api):
    with ComfyUIDouble(token="cfg-token") as comfy:
        staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url, "comfyui_token": "cfg-token"})
        assert probe(staff_api, comfy.url)["api_type"] == "comfyui"
        assert all(r.headers.get("Authorization") == "Bearer cfg-token" for r in comfy.requests)


def test_test_connection_closed_port_is_refused(staff_api):
    result = probe(staff_api, f"http://127.0.0.1:{free_port()}")
    assert result["reachable"] is False and "refused" in result["details"]["message"].lower()


def test_test_connection_hanging_server_times_out(staff_api, monkeypatch):
    import gpu.probe

    real = gpu.probe.probe
    monkeypatch.setattr(gpu.probe, "probe", lambda url, token="", timeout=5.0: real(url, token=token, timeout=0.5))
    with ComfyUIDouble(hang_paths={"*"}) as comfy:
        result = probe(staff_api, comfy.url)
        comfy.release_hangs()
    assert result["reachable"] is False and "did not answer" in result["details"]["message"]


def test_test_connection_redirect_to_metadata_is_refused(staff_api):
    with StaticServer({"/system_stats": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")}) as srv:
        result = probe(staff_api, srv.url)
    assert result["api_type"] is None
    assert "169.254.169.254" in result["details"]["message"] and "link-local" in result["details"]["message"]


def test_test_connection_name_resolving_to_link_local_is_refused(staff_api, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):  # a DNS answer we control: the name points at a metadata address
        if host == "metadata.attacker.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    result = probe(staff_api, "http://metadata.attacker.test:8188")
    assert result["reachable"] is False and "link-local" in result["details"]["message"]


def test_test_connection_unknown_host_says_dns(staff_api):
    result = probe(staff_api, "http://no-such-host.invalid:8188")
    assert result["reachable"] is False and "resolve" in result["details"]["message"].lower()


@pytest.mark.parametrize("body, code", [({"url": "gopher://x"}, 422), ({}, 422), ({"url": "http://x", "a": 1}, 422)])
def test_test_connection_bad_input_is_422(staff_api, body, code):
    assert staff_api.post("/api/gpu/test-connection", body).status_code == code


def test_health_lists_gpu_and_model_files(staff_api, comfy):
    staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url, "gpu_provider": "local"})
    body = staff_api.get("/api/gpu/health").json()
    assert body["provider"] == "local" and body["comfyui_status"] == "available (API ready)"
    assert "GPU: NVIDIA GeForce RTX 5090" in body["models_available"]
    assert "unet_gguf/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf" in body["models_available"]
    assert body["models_missing"] == []
    assert body["swarmui_status"] == "not configured"


def test_health_names_missing_model_files(staff_api):
    with ComfyUIDouble(models={"vae": ["wan_2.1_vae.safetensors"]}) as comfy:
        staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url})
        body = staff_api.get("/api/gpu/health").json()
    assert "vae/wan_2.1_vae.safetensors" in body["models_available"]
    assert "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors" in body["models_missing"]
    assert "unet_gguf/wan22EnhancedNSFWCameraPrompt_nsfwFASTMOVEV2Q8H.gguf" in body["models_missing"]


def test_health_reports_each_failure_state(staff_api):
    with ComfyUIDouble(placeholder=True) as comfy:
        staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url})
        assert staff_api.get("/api/gpu/health").json()["comfyui_status"] == "not ready"
    with ComfyUIDouble(token="t") as comfy:
        staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url, "comfyui_token": "wrong"})
        assert staff_api.get("/api/gpu/health").json()["comfyui_status"] == "authentication failed"
    staff_api.post("/api/gpu/config", {"comfyui_url": f"http://127.0.0.1:{free_port()}"})
    status = staff_api.get("/api/gpu/health").json()["comfyui_status"]
    assert status.startswith("unavailable: ") and "refused" in status.lower()


def test_token_never_in_responses_or_logs(staff_api, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "very-secret-portal-token"
    with ComfyUIDouble(token="other") as comfy:
        bodies = [staff_api.post("/api/gpu/config", {"comfyui_url": comfy.url + f"?token={secret}", "comfyui_token": secret}).content,
                  staff_api.get("/api/gpu/config").content, staff_api.get("/api/gpu/health").content,
                  staff_api.post("/api/gpu/test-connection", {"url": comfy.url, "token": secret}).content]
    for body in bodies:
        assert secret not in body.decode()
    assert secret not in caplog.text
    # The ?token= of a vast.ai "Open" URL became the (write-only) token.
    assert GpuConfig.get().comfyui_token == secret and secret not in GpuConfig.get().comfyui_url


def test_admin_test_connection_button_shows_the_result(client, staff, comfy):
    config = GpuConfig.get()
    config.comfyui_url = comfy.url
    config.save()
    client.force_login(staff)
    page = client.post("/admin/gpu/gpuconfig/test-connection/", follow=True).content.decode()
    assert f"ComfyUI at {comfy.url}: ComfyUI API ready" in page
    assert "NVIDIA GeForce RTX 5090" in page


def test_admin_saves_open_url_token_as_write_only_secret(client, staff):
    from django.forms.models import model_to_dict

    client.force_login(staff)
    config = GpuConfig.get()
    data = {k: v for k, v in model_to_dict(config).items() if v is not None}
    data.update({"comfyui_url": "https://four-words.trycloudflare.com/?token=abc123", "comfyui_token": ""})
    resp = client.post(f"/admin/gpu/gpuconfig/{config.pk}/change/", data)
    assert resp.status_code == 302, resp.content.decode()[:2000]
    config.refresh_from_db()
    assert config.comfyui_url == "https://four-words.trycloudflare.com" and config.comfyui_token == "abc123"
    assert GpuConfigChange.objects.filter(field="comfyui_token", source="admin", new_value="(set)").exists()


def test_private_networks_can_be_refused_by_a_setting(staff_api, comfy, settings):
    assert probe(staff_api, comfy.url)["api_type"] == "comfyui"  # loopback/LAN allowed by default
    settings.I2V_BLOCK_PRIVATE_NETWORKS = True
    result = probe(staff_api, comfy.url)
    assert result["reachable"] is False and "private and loopback addresses are disabled" in result["details"]["message"]
