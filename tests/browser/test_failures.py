"""Each failure class shows its own advice on the job page, in a real browser."""

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from generation import failures
from generation.models import VideoJob
from tests.browser.test_pages import log_in, make_job

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
EC = VideoJob.ErrorClass
CASES = json.loads((Path(__file__).resolve().parents[1] / "fixtures/comfyui_errors.json").read_text())["cases"]


def _comfy_error(case):
    from gpu.comfyui import _execution_error_message

    data = CASES[case]["execution_error"]
    return (f"ComfyUI failed while running the workflow: {_execution_error_message(data)}",
            failures.from_execution_error(data))


def _rejected(case, only=None):
    from gpu.comfyui import _validation_message

    body = CASES[case]["prompt"]["body"]
    if only:  # that capture also lists a model file the capture's ComfyUI lacked; keep the node asked for
        body = {**body, "node_errors": {only: body["node_errors"][only]}}
    message = _validation_message(body)
    return message, failures.from_rejection(body.get("node_errors") or {}, message)


# (class, how the runner fails such a job: its message and failure, the advice the page must show)
SCENARIOS = {
    EC.MISSING_MODEL: (lambda: _rejected("wan_lora_not_in_list"), r"has no wan2\.2_i2v_lightx2v_4steps_lora_v1_high_noise_v2\.safetensors in models/loras/"),
    EC.CORRUPT_MODEL: (lambda: _comfy_error("wan_empty_models"), r"wan_2\.1_vae\.safetensors is in models/vae/ but could not be read"),
    EC.OUT_OF_MEMORY: (lambda: _comfy_error("sampler_out_of_memory"), r"ran out of memory at 832×480, 81 frames"),
    EC.WORKFLOW_REJECTED: (lambda: _rejected("wan_bad_sampler", only="86"), r"refused node 86 \(KSamplerAdvanced\), input 'sampler_name'"),
    EC.CUSTOM_NODE_MISSING: (lambda: _rejected("wan_without_gguf_nodes"), r"does not have the node UnetLoaderGGUF\. Install ComfyUI-GGUF"),
    EC.COMFYUI_UNREACHABLE: (lambda: ("Cannot reach ComfyUI at http://127.0.0.1:9: connection refused: nothing is listening on that port (ComfyUI down or wrong port?)", None),
                             r"Test connection on the GPU page"),
    EC.STORAGE_REFUSED: (lambda: ("Could not upload the video to the storage: An error occurred (SlowDown) when calling the PutObject operation", None),
                         r"the storage refused it: check the R2 settings"),
    EC.FAL_CONTENT_POLICY: (lambda: ("fal.ai could not generate the video: prompt: The content was flagged by a content checker. [content_policy_violation]", None),
                            r"fal\.ai's content checker flagged the prompt or the image"),
    EC.FAL_BAD_INPUT: (lambda: ("fal.ai refused the job: fal.ai rejected the input for fal-ai/wan/v2.2-a14b/image-to-video: num_frames: Input should be less than or equal to 161", None),
                       r"fal\.ai refused a value of this job"),
}


@pytest.fixture
def workflows(db):
    from generation.domain import sync_shipped_workflows
    from generation.models import Workflow
    from gpu.models import ModelFile

    sync_shipped_workflows(Workflow, ModelFile)


@pytest.mark.parametrize("error_class", list(SCENARIOS), ids=lambda c: c.value)
def test_failed_job_page_shows_the_advice_of_its_class(page, live_server, user, workflows, error_class):
    make_failure, advice = SCENARIOS[error_class]
    job = make_job(user)  # Wan 2.2 at its defaults: 832×480, 81 frames
    message, failure = make_failure()
    assert failures.fail_job(job, message, failure)
    job.refresh_from_db()
    assert job.error_class == error_class
    log_in(page, live_server, next_path=f"/jobs/{job.id}/")
    box = page.locator(".failure")
    expect(box.get_by_role("heading")).to_have_text(re.compile(f"The job failed: {re.escape(error_class.label.lower())}"))
    expect(box.locator(".failure-error")).to_contain_text(message[:60])
    expect(box.locator(".failure-hint")).to_contain_text(re.compile(advice))
    gpu_link = box.get_by_role("link", name="Open the GPU page")
    expect(gpu_link).to_have_count(1 if error_class in failures.GPU_CLASSES else 0)


def test_job_against_a_wrong_port_says_unreachable_since_within_5_s(page, live_server, user, workflows, worker_for):
    from gpu.models import GpuConfig
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    config = GpuConfig.get()
    config.comfyui_url, config.gpu_provider = url, "local"
    config.save()
    job = make_job(user)
    log_in(page, live_server, next_path=f"/jobs/{job.id}/")
    worker_for(job.id)
    status = page.locator("#job-status")
    expect(status.locator(".note")).to_contain_text(
        re.compile(rf"ComfyUI at {re.escape(url)} unreachable since \d\d:\d\d:\d\d \(connection refused\); "
                   r"retrying until \d\d:\d\d:\d\d"), timeout=5_000)
    expect(status.locator(".progress-message")).to_have_text("Waiting for ComfyUI to answer")
