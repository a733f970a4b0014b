"""gpu.comfyui.ComfyUIClient against the ComfyUI test double (a real HTTP + websocket server)."""

import copy
import hashlib
import os
import socket
import threading
import time
import uuid

import pytest

# netguard reads Django settings; these tests need no database.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "i2v.settings_test")

from gpu.comfyui import AUTH_MESSAGE, NOT_READY_MESSAGE, ComfyUIClient, ComfyUIError, find_outputs, run_outcome  # noqa: E402
from tests.doubles.comfyui import ComfyUIDouble  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

# The Wan 2.2 I2V A14B GGUF + LightX2V graph of comfyui.md section 2.3 (titles dropped).
WAN = {
    "84": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}},
    "90": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
    "95": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf"}},
    "96": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"}},
    "101": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["95", 0], "lora_name": "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors", "strength_model": 1.0}},
    "102": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["96", 0], "lora_name": "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", "strength_model": 1.0}},
    "104": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["101", 0], "shift": 5.0}},
    "103": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["102", 0], "shift": 5.0}},
    "93": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["84", 0], "text": "a dragon warrior turns its head"}},
    "89": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["84", 0], "text": "blurry, static"}},
    "97": {"class_type": "LoadImage", "inputs": {"image": "i2v/src.png"}},
    "98": {"class_type": "WanImageToVideo", "inputs": {"positive": ["93", 0], "negative": ["89", 0], "vae": ["90", 0], "start_image": ["97", 0],
                                                       "width": 640, "height": 640, "length": 81, "batch_size": 1}},
    "86": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["104", 0], "add_noise": "enable", "noise_seed": 123456789, "steps": 4, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "simple", "positive": ["98", 0], "negative": ["98", 1],
                                                        "latent_image": ["98", 2], "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}},
    "85": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["103", 0], "add_noise": "disable", "noise_seed": 123456789, "steps": 4, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "simple", "positive": ["98", 0], "negative": ["98", 1],
                                                        "latent_image": ["86", 0], "start_at_step": 2, "end_at_step": 4, "return_with_leftover_noise": "disable"}},
    "87": {"class_type": "VAEDecode", "inputs": {"samples": ["85", 0], "vae": ["90", 0]}},
    "94": {"class_type": "CreateVideo", "inputs": {"images": ["87", 0], "fps": 16.0}},
    "108": {"class_type": "SaveVideo", "inputs": {"video": ["94", 0], "filename_prefix": "video/job", "format": "auto", "codec": "auto"}},
}


def wan_graph(image="i2v/src.png", prefix=None, **changes):
    graph = copy.deepcopy(WAN)
    graph["97"]["inputs"]["image"] = image
    graph["108"]["inputs"]["filename_prefix"] = prefix or f"video/job_{uuid.uuid4().hex[:8]}"
    for key, value in changes.items():
        node, name = key.split("__")
        graph[node]["inputs"][name] = value
    return graph


def smoke_graph(image="i2v/src.png", prefix=None):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 64, "height": 64, "crop": "center"}},
        "3": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 9}},
        "4": {"class_type": "CreateVideo", "inputs": {"images": ["3", 0], "fps": 8.0}},
        "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": prefix or f"smoke/job_{uuid.uuid4().hex[:8]}", "format": "auto", "codec": "auto"}},
    }


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def follow(stream, prompt_id, timeout=10.0):
    """Events until ComfyUI says the prompt is over (executing with node null)."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = stream.next(timeout=max(0.0, deadline - time.monotonic()))
        assert event is not None, f"no end of run within {timeout}s; saw {[e['type'] for e in seen]}"
        seen.append(event)
        data = event.get("data") or {}
        if event["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return seen


@pytest.fixture
def comfy():
    with ComfyUIDouble() as double:
        yield double


@pytest.fixture
def client(comfy):
    with ComfyUIClient(comfy.url, connect_timeout=2, read_timeout=5, retries=2, backoff=0.01) as c:
        yield c


@pytest.fixture
def uploaded(client):
    return client.upload_image(PNG, "src.png")


def run(client, graph, output_node, **kwargs):
    client_id = uuid.uuid4().hex
    prompt_id = str(uuid.uuid4())
    with client.events(client_id) as stream:
        client.submit(graph, prompt_id=prompt_id, client_id=client_id, output_node=output_node, **kwargs)
        events = follow(stream, prompt_id)
    return prompt_id, events


def test_upload_image_names_follow_comfyui_rules(client, comfy):
    assert client.upload_image(PNG, "src.png", overwrite=False) == "i2v/src.png"
    assert client.upload_image(PNG, "src.png", overwrite=False) == "i2v/src.png"
    assert client.upload_image(b"other bytes", "src.png", overwrite=False) == "i2v/src (1).png"
    assert client.upload_image(b"new bytes", "src.png") == "i2v/src.png"
    assert client.upload_image(PNG, "flat.png", subfolder="") == "flat.png"
    assert comfy.output_bytes("src.png", "i2v", type="input") == b"new bytes"


def test_submit_runs_to_completion_and_download_matches(client, comfy, uploaded):
    prompt_id, events = run(client, wan_graph(uploaded, prefix="video/job_42"), "108")

    types = [e["type"] for e in events]
    assert types.index("execution_start") < types.index("execution_success") < len(types) - 1
    progress = [(e["data"]["node"], e["data"]["value"], e["data"]["max"]) for e in events if e["type"] == "progress"]
    assert progress == [("86", 1, 2), ("86", 2, 2), ("85", 1, 2), ("85", 2, 2)]

    item = client.history(prompt_id)
    assert run_outcome(item) == ("success", None)
    outputs = find_outputs(item, output_node="108")
    assert outputs[0] == {"filename": "job_42_00001_.mp4", "subfolder": "video", "type": "output", "node_id": "108"}

    with client.open_view(outputs[0]["filename"], outputs[0]["subfolder"]) as resp:
        assert resp.headers["content-type"] == "video/mp4"
        body = b"".join(resp.iter_bytes())
    assert body == comfy.output_bytes("job_42_00001_.mp4", "video")
    assert body[4:8] == b"ftyp"


def test_submit_identical_graph_is_served_from_cache(client, uploaded):
    graph = smoke_graph(uploaded)
    first, _ = run(client, graph, "5")
    second, events = run(client, graph, "5")

    cached = next(e for e in events if e["type"] == "execution_cached")
    assert cached["data"]["nodes"] == ["1", "2", "3", "4", "5"]
    assert find_outputs(client.history(second)) == find_outputs(client.history(first))


def test_submit_missing_model_file_names_the_node_and_file(client, comfy, uploaded):
    graph = wan_graph(uploaded, **{"95__unet_name": "Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf"})
    with pytest.raises(ComfyUIError) as info:
        client.submit(graph, prompt_id=str(uuid.uuid4()), client_id="c1", output_node="108")

    err = info.value
    assert err.kind == "validation"
    assert "node 95 (UnetLoaderGGUF): unet_name: 'Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf' not in [" in str(err)
    assert "model file Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf is not on the server" in str(err)
    assert list(err.node_errors) == ["95"]
    assert comfy.count("POST", "/prompt") == 1


def test_submit_model_removed_from_server_is_rejected(client, comfy, uploaded):
    comfy.models["loras"] = []
    with pytest.raises(ComfyUIError) as info:
        client.submit(wan_graph(uploaded), prompt_id=str(uuid.uuid4()), client_id="c1", output_node="108")
    assert "node 101 (LoraLoaderModelOnly): lora_name:" in str(info.value)
    assert "node 102 (LoraLoaderModelOnly)" in str(info.value)


def test_submit_value_out_of_range_is_readable(client, uploaded):
    with pytest.raises(ComfyUIError) as info:
        client.submit(wan_graph(uploaded, **{"94__fps": 500}), prompt_id=str(uuid.uuid4()), client_id="c1", output_node="108")
    assert info.value.kind == "validation"
    assert "node 94 (CreateVideo): fps: Value 500.0 bigger than max of 120.0" in str(info.value)


def test_submit_input_image_not_uploaded_is_readable(client):
    with pytest.raises(ComfyUIError) as info:
        client.submit(smoke_graph("i2v/nope.png"), prompt_id=str(uuid.uuid4()), client_id="c1", output_node="5")
    assert "node 1 (LoadImage): image - Invalid image file: i2v/nope.png" in str(info.value)


def test_submit_unknown_node_class_says_custom_node_missing(client, uploaded):
    graph = wan_graph(uploaded)
    graph["95"]["class_type"] = "UnetLoaderGGUFx"
    with pytest.raises(ComfyUIError) as info:
        client.submit(graph, prompt_id=str(uuid.uuid4()), client_id="c1", output_node="108")
    assert "node UnetLoaderGGUFx does not exist" in str(info.value)
    assert "custom node may not be installed" in str(info.value)


def _partly_valid(uploaded):
    graph = smoke_graph(uploaded)
    graph["10"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "missing.gguf"}}
    graph["12"] = {"class_type": "ModelSave", "inputs": {"model": ["10", 0], "filename_prefix": "diffusion_models/x"}}
    return graph


def test_submit_200_with_node_errors_on_our_output_is_an_error_and_cancelled(client, comfy, uploaded):
    comfy.hold = threading.Event()  # keep what ComfyUI queued from finishing on its own
    prompt_id = str(uuid.uuid4())
    with pytest.raises(ComfyUIError) as info:
        client.submit(_partly_valid(uploaded), prompt_id=prompt_id, client_id="c1", output_node="12")
    assert info.value.kind == "validation"
    assert "node 10 (UnetLoaderGGUF): unet_name: 'missing.gguf'" in str(info.value)
    assert "model file missing.gguf is not on the server" in str(info.value)

    comfy.wait_for(lambda d: d.history_ids == [prompt_id])
    assert run_outcome(client.history(prompt_id))[0] == "interrupted"


def test_submit_200_with_node_errors_elsewhere_is_accepted(client, uploaded):
    answer = client.submit(_partly_valid(uploaded), prompt_id=str(uuid.uuid4()), client_id="c1", output_node="5")
    assert list(answer["node_errors"]) == ["10"]


def test_submit_non_uuid_prompt_id_is_rejected(client, uploaded):
    with pytest.raises(ComfyUIError) as info:
        client.submit(smoke_graph(uploaded), prompt_id="job-42", client_id="c1", output_node="5")
    assert info.value.kind == "validation"
    assert "prompt_id must be a valid UUID" in str(info.value)


def test_runtime_error_is_reported_with_node_and_hint(client, comfy, uploaded):
    comfy.fail_node = "95"
    comfy.fail_type = "torch.OutOfMemoryError"
    comfy.fail_message = "CUDA out of memory. Tried to allocate 2.00 GiB\n\nThis error means you ran out of memory on your GPU."
    prompt_id, events = run(client, wan_graph(uploaded), "108")

    assert "execution_error" in [e["type"] for e in events]
    status, message = run_outcome(client.history(prompt_id))
    assert status == "error"
    assert message.startswith("node 95 (UnetLoaderGGUF) failed: torch.OutOfMemoryError: CUDA out of memory.")
    assert "the GPU ran out of memory" in message


def test_token_missing_is_auth_error(comfy):
    comfy.token = "s3cret-token"
    with ComfyUIClient(comfy.url, retries=0) as anonymous:
        with pytest.raises(ComfyUIError) as info:
            anonymous.system_stats()
        assert info.value.kind == "auth"
        assert str(info.value) == AUTH_MESSAGE
        with pytest.raises(ComfyUIError) as info:
            with anonymous.events("c1"):
                pass
        assert info.value.kind == "auth"


def test_token_wrong_never_appears_in_errors(comfy):
    comfy.token = "s3cret-token"
    with ComfyUIClient(comfy.url, token="wrong-token-123", retries=0) as c:
        with pytest.raises(ComfyUIError) as info:
            c.upload_image(PNG, "a.png")
    assert info.value.kind == "auth"
    assert "wrong-token-123" not in str(info.value)
    with ComfyUIClient(f"http://127.0.0.1:{closed_port()}/?token=url-token-456", retries=0) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
    assert "url-token-456" not in str(info.value)


def test_token_is_sent_on_http_and_websocket(comfy):
    comfy.token = "s3cret-token"
    with ComfyUIClient(comfy.url, token="s3cret-token") as c:
        name = c.upload_image(PNG, "src.png")
        prompt_id, events = run(c, smoke_graph(name), "5")
        assert run_outcome(c.history(prompt_id)) == ("success", None)
        assert events[0]["type"] == "status"
    ws = [r for r in comfy.requests if r.path == "/ws"]
    assert ws and ws[0].headers["Authorization"] == "Bearer s3cret-token"
    assert all(r.headers.get("Authorization") == "Bearer s3cret-token" for r in comfy.requests)


def test_token_in_pasted_url_becomes_bearer(comfy):
    comfy.token = "s3cret-token"
    with ComfyUIClient(comfy.url + "/?token=s3cret-token") as c:
        assert c.system_stats()["system"]["comfyui_version"] == "0.3.64"
    assert comfy.requests[-1].headers["Authorization"] == "Bearer s3cret-token"
    assert "token" not in comfy.requests[-1].query


def test_placeholder_is_not_ready(comfy):
    comfy.placeholder = True
    with ComfyUIClient(comfy.url, retries=2) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
        assert info.value.kind == "not_ready"
        assert str(info.value) == NOT_READY_MESSAGE
        with pytest.raises(ComfyUIError) as info:
            with c.events("c1"):
                pass
        assert info.value.kind == "not_ready"
    assert comfy.count("GET", "/system_stats") == 1


def test_placeholder_through_tunnel_200_is_not_ready(comfy):
    comfy.placeholder, comfy.placeholder_status = True, 200
    with ComfyUIClient(comfy.url) as c:
        with pytest.raises(ComfyUIError) as info:
            c.queue()
    assert info.value.kind == "not_ready"


def test_closed_port_is_unreachable_connection_refused():
    with ComfyUIClient(f"http://127.0.0.1:{closed_port()}", retries=0) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
        assert info.value.kind == "unreachable"
        assert "connection refused" in str(info.value)
        with pytest.raises(ComfyUIError) as info:
            with c.events("c1", open_timeout=2):
                pass
        assert info.value.kind == "unreachable"
        assert "connection refused" in str(info.value)


def test_hang_on_get_times_out_after_retries(comfy):
    comfy.hang_paths = {"/system_stats"}
    with ComfyUIClient(comfy.url, read_timeout=0.2, retries=1, backoff=0.01) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
    assert info.value.kind == "timeout"
    assert "within 0.2s" in str(info.value)
    assert comfy.count("GET", "/system_stats") == 2


def test_hang_on_submit_is_not_retried(comfy, uploaded):
    comfy.hang_paths = {"/prompt"}
    prompt_id = str(uuid.uuid4())
    with ComfyUIClient(comfy.url, read_timeout=0.2, retries=3, backoff=0.01) as c:
        with pytest.raises(ComfyUIError) as info:
            c.submit(smoke_graph(uploaded), prompt_id=prompt_id, client_id="c1", output_node="5")
    assert info.value.kind == "timeout"
    assert "may or may not be queued" in str(info.value)
    assert comfy.count("POST", "/prompt") == 1


def test_get_is_retried_after_server_error(client, comfy):
    comfy.fail_http("/queue", times=2, status=500)
    assert client.queue() == ([], [])
    assert comfy.count("GET", "/queue") == 3


def test_garbage_json_is_bad_response(comfy):
    comfy.fail_http("/system_stats", times=5, status=200, body="{garbage", content_type="application/json")
    with ComfyUIClient(comfy.url, retries=1, backoff=0.01) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
    assert info.value.kind == "bad_response"
    assert comfy.count("GET", "/system_stats") == 2


def test_cancel_pending_prompt_never_runs(client, comfy, uploaded):
    comfy.hold = threading.Event()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    client.submit(smoke_graph(uploaded), prompt_id=first, client_id="c1", output_node="5")
    client.submit(smoke_graph(uploaded), prompt_id=second, client_id="c1", output_node="5")
    comfy.wait_held()
    assert client.queue() == ([first], [second])

    client.cancel(second)
    assert client.queue() == ([first], [])
    comfy.hold.set()
    comfy.wait_for(lambda d: d.history_ids == [first])
    assert client.history(second) is None
    assert run_outcome(client.history(first)) == ("success", None)


def test_cancel_running_prompt_interrupts_it(client, comfy, uploaded):
    comfy.hold = threading.Event()
    client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    with client.events(client_id) as stream:
        client.submit(wan_graph(uploaded), prompt_id=prompt_id, client_id=client_id, output_node="108")
        comfy.wait_held()
        client.cancel(prompt_id)
        events = follow(stream, prompt_id)
    assert "execution_interrupted" in [e["type"] for e in events]
    status, message = run_outcome(client.history(prompt_id))
    assert status == "interrupted"
    assert message.startswith("Interrupted at node ")
    assert find_outputs(client.history(prompt_id)) == []


def test_restart_loses_history_but_keeps_files(client, comfy, uploaded):
    prompt_id, _ = run(client, smoke_graph(uploaded, prefix="smoke/kept"), "5")
    assert client.history(prompt_id) is not None

    comfy.restart()
    assert client.history(prompt_id) is None
    with client.open_view("kept_00001_.mp4", "smoke") as resp:
        assert b"".join(resp.iter_bytes()) == comfy.output_bytes("kept_00001_.mp4", "smoke")


def test_websocket_drop_raises_ws_closed(client, comfy):
    comfy.drop_websocket_after = 1
    with client.events("c1") as stream:
        assert stream.next(timeout=5)["type"] == "status"
        with pytest.raises(ComfyUIError) as info:
            stream.next(timeout=5)
    assert info.value.kind == "ws_closed"


def test_view_missing_file_is_not_found(client):
    with pytest.raises(ComfyUIError) as info:
        with client.open_view("nope.mp4", "video"):
            pass
    assert info.value.status == 404
    assert "Output file not found on ComfyUI: video/nope.mp4" in str(info.value)


def test_view_large_output_streams_and_resumes(client, comfy, uploaded):
    comfy.output_size = 3 * 1024 * 1024 + 7
    prompt_id, _ = run(client, smoke_graph(uploaded, prefix="big/clip"), "5")
    entry = find_outputs(client.history(prompt_id))[0]

    digest, size = hashlib.sha256(), 0
    with client.open_view(entry["filename"], entry["subfolder"]) as resp:
        assert int(resp.headers["content-length"]) == 3 * 1024 * 1024 + 7
        for chunk in resp.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    assert size == 3 * 1024 * 1024 + 7
    assert digest.hexdigest() == comfy.output_sha256(entry["filename"], entry["subfolder"])

    with client.open_view(entry["filename"], entry["subfolder"], offset=size - 100) as resp:
        tail = resp.read()
    assert tail == comfy.output_bytes(entry["filename"], entry["subfolder"])[-100:]


def test_view_stalled_download_times_out(comfy, uploaded):
    comfy.output_size = 1024 * 1024
    with ComfyUIClient(comfy.url, read_timeout=0.3, retries=0) as c:
        prompt_id, _ = run(c, smoke_graph(uploaded), "5")
        entry = find_outputs(c.history(prompt_id))[0]
        comfy.view_chunk_delay = 5
        with pytest.raises(ComfyUIError) as info:
            with c.open_view(entry["filename"], entry["subfolder"]) as resp:
                for _ in resp.iter_bytes():
                    pass
    assert info.value.kind == "timeout"
    assert "stalled" in str(info.value)


def test_models_lists_files_and_unknown_folder_is_none(client):
    assert "Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf" in client.models("unet_gguf")
    assert client.models("diffusion_models") == ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"]
    assert client.models("unet") is None


def test_object_info_reports_server_model_files(client, comfy):
    comfy.models["unet"] = ["only.gguf"]
    comfy.models["diffusion_models"] = []
    info = client.object_info("UnetLoaderGGUF")
    assert info["UnetLoaderGGUF"]["input"]["required"]["unet_name"][0] == ["only.gguf"]
    assert client.object_info("NoSuchNode") == {}


def test_base_url_with_path_prefix_and_trailing_slash():
    with ComfyUIDouble(path_prefix="/comfy") as double:
        with ComfyUIClient(double.url + "/") as c:
            assert c.system_stats()["devices"][0]["name"].startswith("cuda:0 NVIDIA GeForce RTX 5090")
            name = c.upload_image(PNG, "src.png")
            prompt_id, events = run(c, smoke_graph(name), "5")
            assert run_outcome(c.history(prompt_id)) == ("success", None)
        assert any(r.path == "/comfy/ws" for r in double.requests)


def test_find_outputs_prefers_output_node_and_videos():
    item = {"outputs": {
        "7": {"images": [{"filename": "a_00001_.webp", "subfolder": "s", "type": "output"}], "animated": [True]},
        "9": {"images": [{"filename": "ComfyUI_temp_x_00001_.png", "subfolder": "", "type": "temp"}]},
        "6": {"images": [{"filename": "a_00002_.mp4", "subfolder": "s", "type": "output"}], "animated": [True]},
        "11": {"gifs": [{"filename": "v_00001.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4"}]},
    }}
    assert [o["filename"] for o in find_outputs(item)] == ["a_00002_.mp4", "v_00001.mp4", "a_00001_.webp"]
    assert find_outputs(item, output_node="7")[0]["filename"] == "a_00001_.webp"


def test_unresolvable_host_is_unreachable_dns(monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "comfy.example.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with ComfyUIClient("https://comfy.example.invalid", retries=0) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
        assert info.value.kind == "unreachable"
        assert "DNS lookup failed" in str(info.value)
        with pytest.raises(ComfyUIError) as info:
            with c.events("c1"):
                pass
        assert info.value.kind == "unreachable"


def test_metadata_address_is_blocked_before_connecting():
    with ComfyUIClient("http://169.254.169.254/latest", retries=2) as c:
        with pytest.raises(ComfyUIError) as info:
            c.system_stats()
        assert info.value.kind == "blocked"
        assert "link-local and cloud-metadata addresses are not allowed" in str(info.value)
        with pytest.raises(ComfyUIError) as info:
            with c.events("c1"):
                pass
        assert info.value.kind == "blocked"
