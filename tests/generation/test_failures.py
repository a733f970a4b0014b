"""Each failure class end to end: the ComfyUI double replays what a real ComfyUI 0.3.64 answered
(tests/fixtures/comfyui_errors.json), the worker's task runs the job, and the job, the API and
the advice name the class and what to fix."""

import copy
import json
from pathlib import Path

import pytest

from generation import failures, runner, scheduler, tasks
from generation.models import VideoJob, Workflow
from gpu.models import GpuConfig
from tests.conftest import free_port
from tests.doubles.comfyui import DEFAULT_OBJECT_INFO, ComfyUIDouble
from tests.generation.test_runner import make_job, run_to_end

pytestmark = pytest.mark.django_db(transaction=True)
S, EC = VideoJob.Status, VideoJob.ErrorClass
CASES = json.loads((Path(__file__).resolve().parents[1] / "fixtures/comfyui_errors.json").read_text())["cases"]


@pytest.fixture
def configured(requeued, settings):
    settings.I2V_FOLLOW_SLICE = 5

    def start(**knobs):
        double = ComfyUIDouble(**knobs).__enter__()
        started.append(double)
        config = GpuConfig.get()
        config.comfyui_url = double.url
        config.gpu_provider = "local"
        config.save()
        return double

    started = []
    yield start
    for double in started:
        double.__exit__(None, None, None)


@pytest.fixture
def requeued(monkeypatch):
    monkeypatch.setattr(tasks, "enqueue", lambda func, *args: None)
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)


def replay(comfy, case):
    """Make the double fail at run time exactly as the real ComfyUI did in `case`."""
    data = CASES[case]["execution_error"]
    comfy.fail_node = data["node_type"]
    comfy.fail_message = data["exception_message"].removesuffix("\n")
    comfy.fail_type = data["exception_type"]


def failed(job, api):
    job = run_to_end(job)
    assert job.status == S.FAILED, job.status
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["status"] == "failed" and body["error"] == job.error and body["error_class"] == job.error_class
    assert body["advice"] and body["eta_seconds"] is None
    return job, body


def test_empty_safetensors_model_is_a_corrupt_file_named_with_redownload_advice(configured, user, api):
    replay(configured(), "wan_empty_models")
    job, body = failed(make_job(user, workflow="wan22-i2v"), api)
    assert "header too small" in job.error and "VAELoader" in job.error
    assert job.error_class == EC.CORRUPT_MODEL
    assert job.error_info["file"] == "wan_2.1_vae.safetensors" and job.error_info["folder"] == "vae"
    assert "wan_2.1_vae.safetensors" in body["advice"] and "models/vae/" in body["advice"]
    assert "upload_models_to_r2" in body["advice"] and "reachable" not in body["advice"]


@pytest.mark.parametrize("case", ["gguf_empty", "gguf_truncated", "gguf_halfdownloaded"])
def test_empty_or_truncated_gguf_is_a_corrupt_file(configured, user, api, case):
    replay(configured(), case)
    job, body = failed(make_job(user, workflow="wan22-i2v"), api)
    assert job.error_class == EC.CORRUPT_MODEL
    graph = job.workflow.graph
    node = job.error_info["node"]
    assert graph[node]["class_type"] == "UnetLoaderGGUF"
    assert job.error_info["file"] == graph[node]["inputs"]["unet_name"] and job.error_info["folder"] == "unet"
    assert "incomplete" in body["advice"] and job.error_info["file"] in body["advice"]


def test_model_deleted_after_listing_is_missing_naming_file_and_folder(configured, user, api):
    replay(configured(), "vae_deleted_after_listing")
    job, body = failed(make_job(user, workflow="wan22-i2v"), api)
    assert job.error_class == EC.MISSING_MODEL
    assert job.error_info["folder"] == "vae"
    assert "models/vae/" in body["advice"]


def test_model_not_on_the_server_is_missing_naming_file_and_folder(configured, user, api):
    comfy = configured()
    comfy.models = {**comfy.models, "loras": ["wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"]}
    job, body = failed(make_job(user, workflow="wan22-i2v"), api)
    assert job.error_class == EC.MISSING_MODEL
    assert job.error_info["file"] == "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"
    assert job.error_info["folder"] == "loras" and job.error_info["node"] == "101"
    assert "models/loras/" in body["advice"] and "provisioning log" not in body["advice"]


def test_out_of_memory_names_the_gpu_and_its_vram(configured, user, api):
    replay(configured(device_name="cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", vram_total=25_769_803_776),
           "sampler_out_of_memory")
    job, body = failed(make_job(user, workflow="wan22-i2v"), api)
    assert job.error_class == EC.OUT_OF_MEMORY
    assert "NVIDIA GeForce RTX 4090 (24.0 GB VRAM)" in body["advice"]
    assert f"{job.width}×{job.height}, {job.frames} frames" in body["advice"] and "fewer frames" in body["advice"]


def test_value_the_validator_refuses_names_node_and_input(configured, user, api):
    configured()
    wf = Workflow.objects.get(slug="wan22-i2v")
    make_job(user, workflow="smoke")  # loads the shipped workflows
    wf = Workflow.objects.get(slug="wan22-i2v")
    graph = copy.deepcopy(wf.graph)
    graph["86"]["inputs"]["sampler_name"] = "euler_fast"  # wan_bad_sampler in the capture
    Workflow.objects.filter(pk=wf.pk).update(graph=graph)
    job = make_job(user, workflow="wan22-i2v")
    Workflow.objects.filter(pk=wf.pk).update(graph=graph)
    job, body = failed(job, api)
    assert job.error_class == EC.WORKFLOW_REJECTED
    assert "euler_fast" in job.error
    assert "node 86 (KSamplerAdvanced), input 'sampler_name'" in body["advice"]


def test_missing_custom_node_names_the_class_and_the_pack(configured, user, api, tmp_path):
    info = json.loads(DEFAULT_OBJECT_INFO.read_text())
    without_gguf = {name: node for name, node in info.items() if "GGUF" not in name}
    path = tmp_path / "object_info.json"
    path.write_text(json.dumps(without_gguf))
    configured(object_info_path=path)
    job, body = failed(make_job(user, workflow="wan22-i2v"), api)
    real = CASES["wan_without_gguf_nodes"]["prompt"]["body"]["error"]["message"]
    assert real in job.error  # the double answered what a real ComfyUI without ComfyUI-GGUF answers
    assert job.error_class == EC.CUSTOM_NODE_MISSING
    assert "UnetLoaderGGUF" in body["advice"] and "ComfyUI-GGUF" in body["advice"]


def test_unreachable_comfyui_fails_with_connection_advice(requeued, user, api, settings):
    config = GpuConfig.get()
    config.comfyui_url = f"http://127.0.0.1:{free_port()}"
    config.save()
    job = make_job(user)
    assert tasks.run_job(str(job.id)) == "done"  # back in i2v's queue, waiting for the place
    settings.I2V_COMFYUI_GRACE = 0
    scheduler.run_pass()
    job.refresh_from_db()
    assert job.status == S.FAILED
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["error_class"] == "comfyui_unreachable" and "refused" in body["error"]
    assert "Test connection" in body["advice"] and "tunnel URL" in body["advice"]
    assert "Test connection" not in body["error"]  # the error says what happened, the advice what to do


def test_other_node_errors_point_at_the_node(configured, user, api):
    replay(configured(), "odd_size_video")
    job, body = failed(make_job(user), api)
    assert job.error_class == EC.NODE_ERROR and "avcodec_open2" in job.error
    assert body["advice"].startswith("Node 6 (SaveVideo)")


def test_admin_filters_jobs_by_failure_class(configured, user, admin_client):
    replay(configured(), "wan_empty_models")
    corrupt = run_to_end(make_job(user, workflow="wan22-i2v"))
    other = make_job(user, prompt="still queued")
    resp = admin_client.get("/admin/generation/videojob/", {"error_class__exact": "corrupt_model"})
    assert resp.status_code == 200
    assert str(corrupt.id) in resp.content.decode() and str(other.id) not in resp.content.decode()
    assert "Model file corrupt or incomplete" in resp.content.decode()


def test_unreachable_comfyui_is_said_on_the_job_at_once_and_logged_once(requeued, user, api, caplog, monkeypatch):
    import logging

    from gpu import capacity
    from tests.doubles.tcp_proxy import TcpProxy

    with ComfyUIDouble() as comfy, TcpProxy("127.0.0.1", comfy.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        config = GpuConfig.get()
        config.comfyui_url, config.gpu_provider = url, "local"
        config.save()
        proxy.cut()  # ComfyUI's port closes every connection, as while it restarts
        with caplog.at_level(logging.WARNING):
            first = make_job(user)
            assert tasks.run_job(str(first.id)) == "done"
            second = make_job(user, prompt="another")
            for _ in range(3):
                scheduler.run_pass()
            for job in (first, second):
                body = api.get(f"/api/jobs/{job.id}").json()
                assert body["status"] == "queued"
                assert body["note"].startswith(f"ComfyUI at {url} unreachable since ")
                assert "(connection dropped); retrying until " in body["note"], body["note"]
            # One warning for the outage, however many tries (a try's own retries log at INFO).
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert warnings == [f"ComfyUI at {url} unreachable (connection dropped); jobs wait for it or go elsewhere"]
            # It answers again: the jobs run, their notes go, one line says it is back.
            proxy.restore()
            monkeypatch.setattr(capacity, "DOWN_RETRY_SECONDS", 0)
            scheduler.run_pass()
            first, second = run_to_end(first), run_to_end(second)
        assert first.status == second.status == S.COMPLETED and first.note == second.note == ""
        assert [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()] == [
            f"ComfyUI at {url} answers again"]


def test_sentences_end_with_a_full_stop_before_the_next():
    assert runner.sentences("Could not upload the video: SlowDown", "Gave up after 120 s.") == (
        "Could not upload the video: SlowDown. Gave up after 120 s.")
    assert runner.sentences("Is it down?", "", "Retry") == "Is it down? Retry."


# The model files the capture's ComfyUI had when it refused these graphs.
CAPTURE_MODELS = {
    "unet": ["Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf", "truncated-HighNoise.gguf"],
    "diffusion_models": ["Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"],
    "loras": ["wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
              "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"],
    "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "vae": ["truncated_vae.safetensors", "wan_2.1_vae.safetensors"],
}
GRAPH_CHANGES = {
    "wan_model_not_in_list": ("95", "unet_name", "Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf"),
    "wan_lora_not_in_list": ("101", "lora_name", "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise_v2.safetensors"),
    "wan_width_too_big": ("98", "width", 20000),
    "wan_bad_sampler": ("86", "sampler_name", "euler_fast"),
    "wan_missing_input": ("98", "width", None),
    "wan_bad_int": ("98", "length", "eighty"),
}


@pytest.mark.parametrize("case", list(GRAPH_CHANGES))
def test_the_double_refuses_a_graph_word_for_word_like_the_real_comfyui(case):
    import httpx

    graph = copy.deepcopy(json.loads((Path(__file__).resolve().parents[2] / "generation/workflows/wan22-i2v.json")
                                     .read_text())["graph"])
    graph["97"]["inputs"]["image"] = "cap_src.png"
    node, name, value = GRAPH_CHANGES[case]
    if value is None:
        graph[node]["inputs"].pop(name)
    else:
        graph[node]["inputs"][name] = value
    with ComfyUIDouble(models=CAPTURE_MODELS, inputs={"cap_src.png": b"png"}) as comfy:
        resp = httpx.post(f"{comfy.url}/prompt", json={"prompt": graph})
    real = CASES[case]["prompt"]
    assert (resp.status_code, resp.json()) == (real["status"], real["body"])


def test_expired_tunnel_token_is_unreachable_with_tunnel_advice(configured, user, api):
    comfy = configured(token="the-new-token")
    config = GpuConfig.get()
    config.comfyui_token = "the-old-token"
    config.save()
    job, body = failed(make_job(user), api)
    assert job.error_class == EC.COMFYUI_UNREACHABLE and "tunnel URL may have expired" in job.error
    assert "copy the new one from the instance's Open button" in body["advice"]
    assert "the-old-token" not in json.dumps(body) and comfy.prompt_posts == {}


def test_missing_model_on_a_vast_instance_points_at_its_provisioning_log(user):
    from decimal import Decimal

    from gpu.models import VastInstance

    instance = VastInstance.objects.create(vast_id=4242, gpu_name="RTX 5090", dph_total=Decimal("0.5"),
                                           state=VastInstance.State.RUNNING, comfyui_url="http://127.0.0.1:9")
    job = make_job(user, workflow="wan22-i2v", instance=instance)
    body = CASES["wan_lora_not_in_list"]["prompt"]["body"]
    message = "ComfyUI rejected the workflow: node 101 (LoraLoaderModelOnly): Value not in list"
    assert failures.fail_job(job, message, failures.from_rejection(body["node_errors"], message))
    job.refresh_from_db()
    advice = failures.advice(job)
    assert job.error_class == EC.MISSING_MODEL and "models/loras/" in advice
    assert "vast.ai instance 4242" in advice and "`vastai logs 4242`" in advice and "i2v:" in advice
