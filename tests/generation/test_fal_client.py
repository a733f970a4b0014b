"""generation.fal.FalClient against the fal.ai queue test double (a real HTTP server)."""

import hashlib
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from generation.fal import (
    PRICES_TAKEN,
    WAN_I2V,
    WAN_I2V_TURBO,
    FalClient,
    FalError,
    build_input,
    estimate_cost,
    resolution_for,
)
from tests.doubles.fal import FalDouble

IMAGE = "data:image/png;base64,iVBORw0KGgo="
ARGS = {"image_url": IMAGE, "prompt": "a dragon turns its head", "num_frames": 81, "frames_per_second": 16, "resolution": "480p"}


@pytest.fixture
def fal():
    with FalDouble() as double:
        yield double


@pytest.fixture
def client(fal):
    with FalClient(fal.key, fal.url, retries=2, backoff=0.01, read_timeout=5.0) as c:
        yield c


def poll_until_done(client, status_url, limit=20):
    seen = []
    for _ in range(limit):
        body = client.status(status_url)
        seen.append(body)
        if body["status"] == "COMPLETED":
            return seen
    raise AssertionError(f"never completed: {[b['status'] for b in seen]}")


def test_submit_wrong_key_is_auth_error_without_key(fal):
    secret = "wrong-key-id:very-secret-value-123"
    with FalClient(secret, fal.url, backoff=0.01) as c:
        with pytest.raises(FalError) as info:
            c.submit(WAN_I2V, ARGS)
    assert info.value.kind == "auth"
    assert info.value.status == 401
    assert "FAL_KEY" in str(info.value)
    assert secret not in str(info.value) and "very-secret-value-123" not in str(info.value)
    assert fal.submissions == {}


def test_client_without_key_explains_setting():
    with pytest.raises(FalError) as info:
        FalClient("", "http://127.0.0.1:9")
    assert info.value.kind == "auth"
    assert "FAL_KEY" in str(info.value)


def test_submit_missing_field_is_invalid_naming_field(fal, client):
    with pytest.raises(FalError) as info:
        client.submit(WAN_I2V, {"prompt": "no image"})
    assert info.value.kind == "invalid"
    assert info.value.status == 422
    assert info.value.fields == ("image_url",)
    assert "image_url: field required" in str(info.value)
    assert fal.submissions == {}


def test_submit_out_of_range_frames_is_invalid_naming_field(client):
    with pytest.raises(FalError) as info:
        client.submit(WAN_I2V, {**ARGS, "num_frames": 200, "resolution": "1080p"})
    assert info.value.kind == "invalid"
    assert set(info.value.fields) == {"num_frames", "resolution"}
    assert "num_frames: ensure this value is less than or equal to 161" in str(info.value)


def test_request_lifecycle_queue_progress_completed_then_result_and_download(fal, client):
    fal.queue_polls, fal.progress_polls = 2, 1
    handle = client.submit(WAN_I2V, ARGS)
    assert set(handle) == {"request_id", "status_url", "response_url", "cancel_url"}
    assert fal.submissions[handle["request_id"]] == ARGS

    seen = poll_until_done(client, handle["status_url"])
    assert [b["status"] for b in seen] == ["IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert [b["queue_position"] for b in seen[:2]] == [1, 0]
    assert seen[2]["logs"] and seen[2]["logs"][0]["message"]
    assert seen[3]["error"] is None and seen[3]["metrics"]["inference_time"] > 0

    output = client.result(handle["response_url"])
    assert output["prompt"] == ARGS["prompt"]
    assert output["video"]["content_type"] == "video/mp4"
    with client.open_download(output["video"]["url"]) as resp:
        data = b"".join(resp.iter_bytes())
    assert data == fal.output_bytes()
    assert len(data) == output["video"]["file_size"]
    # The key stays with the queue host; the CDN download goes without it.
    download = [r for r in fal.requests if r.path.startswith("/files/")]
    assert download and "Authorization" not in download[0].headers


def test_returned_urls_drop_endpoint_subpath_and_are_used_as_returned(fal, client):
    fal.queue_polls, fal.progress_polls = 0, 0
    handle = client.submit(WAN_I2V, ARGS, webhook_url="https://example.invalid/hook")
    rid = handle["request_id"]
    assert handle["status_url"] == f"{fal.url}/fal-ai/wan/requests/{rid}/status"
    assert handle["response_url"] == f"{fal.url}/fal-ai/wan/requests/{rid}"
    assert handle["cancel_url"] == f"{fal.url}/fal-ai/wan/requests/{rid}/cancel"
    assert client.status(handle["status_url"])["status"] == "COMPLETED"
    client.result(handle["response_url"])
    paths = [(r.method, r.path) for r in fal.requests]
    assert paths == [
        ("POST", "/fal-ai/wan/v2.2-a14b/image-to-video"),
        ("GET", f"/fal-ai/wan/requests/{rid}/status"),
        ("GET", f"/fal-ai/wan/requests/{rid}"),
    ]
    assert fal.requests[0].query == {"fal_webhook": "https://example.invalid/hook"}
    assert fal.requests[1].query == {"logs": "1"}


def test_status_url_on_other_host_is_refused_without_sending_key(client):
    with pytest.raises(FalError) as info:
        client.status("http://127.0.0.2:1/fal-ai/wan/requests/x/status")
    assert info.value.kind == "bad_response"
    assert "not a fal.ai queue URL" in str(info.value)


def test_result_before_completion_says_poll(fal, client):
    handle = client.submit(WAN_I2V, ARGS)
    with pytest.raises(FalError) as info:
        client.result(handle["response_url"])
    assert info.value.status == 400
    assert "poll status()" in str(info.value)
    assert fal.count("GET", f"/fal-ai/wan/requests/{handle['request_id']}") == 1  # a 400 is not retried


def test_cancel_queued_then_already_completed_then_not_found(fal, client):
    fal.queue_polls = None
    handle = client.submit(WAN_I2V, ARGS)
    assert client.status(handle["status_url"])["status"] == "IN_QUEUE"
    assert client.cancel(handle["cancel_url"]) == "CANCELLATION_REQUESTED"
    assert fal.state(handle["request_id"]) == "COMPLETED"
    assert client.cancel(handle["cancel_url"]) == "ALREADY_COMPLETED"
    missing = handle["cancel_url"].replace(handle["request_id"], "00000000-0000-0000-0000-000000000000")
    assert client.cancel(missing) == "NOT_FOUND"


def test_model_failure_is_kind_failed_with_message(fal, client):
    fal.queue_polls, fal.progress_polls = 0, 1
    fal.fail_message = "CUDA out of memory while decoding"
    fal.fail_type = "internal_server_error"
    handle = client.submit(WAN_I2V, ARGS)
    final = poll_until_done(client, handle["status_url"])[-1]
    assert final["error"] == "CUDA out of memory while decoding"
    assert final["error_type"] == "internal_server_error"
    with pytest.raises(FalError) as info:
        client.result(handle["response_url"])
    assert info.value.kind == "failed"
    assert info.value.error_type == "internal_server_error"
    assert "CUDA out of memory while decoding" in str(info.value)
    assert fal.count("GET", f"/fal-ai/wan/requests/{handle['request_id']}") == 1  # a model error is final: no retry


def test_runner_side_validation_is_failed_naming_fields(fal, client):
    fal.validate_on_submit = False
    fal.queue_polls, fal.progress_polls = 0, 0
    handle = client.submit(WAN_I2V, {"image_url": IMAGE, "num_frames": 5})
    assert client.status(handle["status_url"])["error"] == "Invalid status code: 422"
    with pytest.raises(FalError) as info:
        client.result(handle["response_url"])
    assert info.value.kind == "failed" and info.value.status == 422
    assert info.value.fields == ("prompt", "num_frames")
    assert "num_frames: ensure this value is greater than or equal to 17" in str(info.value)


def test_unreachable_image_is_failed_naming_image_url(fal, client):
    fal.check_image_url = True
    fal.queue_polls, fal.progress_polls = 0, 0
    handle = client.submit(WAN_I2V, {**ARGS, "image_url": f"{fal.url}/files/missing.png"})
    assert client.status(handle["status_url"])["error_type"] == "file_download_error"
    with pytest.raises(FalError) as info:
        client.result(handle["response_url"])
    assert info.value.kind == "failed"
    assert info.value.fields == ("image_url",)
    assert "image_url" in str(info.value)


def test_status_5xx_is_retried(fal, client):
    handle = client.submit(WAN_I2V, ARGS)
    fal.fail_http("/fal-ai/wan/requests/*/status", times=2, status=503)
    assert client.status(handle["status_url"])["status"] == "IN_QUEUE"
    assert fal.count("GET", "/fal-ai/wan/requests/*/status") == 3


def test_status_5xx_beyond_retries_is_retryable_http_error(fal, client):
    handle = client.submit(WAN_I2V, ARGS)
    fal.fail_http("/fal-ai/wan/requests/*/status", times=5, status=502)
    with pytest.raises(FalError) as info:
        client.status(handle["status_url"])
    assert info.value.kind == "http" and info.value.status == 502 and info.value.retryable
    assert fal.count("GET", "/fal-ai/wan/requests/*/status") == 3


def test_status_non_json_answer_is_retried(fal, client):
    handle = client.submit(WAN_I2V, ARGS)
    fal.fail_http("/fal-ai/wan/requests/*/status", times=1, status=200, body="{garbage")
    assert client.status(handle["status_url"])["status"] == "IN_QUEUE"
    assert fal.count("GET", "/fal-ai/wan/requests/*/status") == 2


def test_error_message_never_contains_key(fal, client):
    handle = client.submit(WAN_I2V, ARGS)
    fal.fail_http("/fal-ai/wan/requests/*/status", times=5, status=500, body=f'{{"detail": "bad auth {fal.key}"}}')
    with pytest.raises(FalError) as info:
        client.status(handle["status_url"])
    assert "bad auth ***" in str(info.value)
    assert fal.key not in str(info.value)
    assert fal.key.split(":")[1] not in str(info.value)


def test_status_timeout_is_retried_then_timeout_error(fal):
    with FalClient(fal.key, fal.url, retries=1, backoff=0.01, read_timeout=0.2) as c:
        handle = c.submit(WAN_I2V, ARGS)
        fal.hang_paths = {"/fal-ai/wan/requests/*/status"}
        try:
            with pytest.raises(FalError) as info:
                c.status(handle["status_url"])
        finally:
            fal.release_hangs()
    assert info.value.kind == "timeout" and info.value.retryable
    assert fal.count("GET", "/fal-ai/wan/requests/*/status") == 2


def test_submit_5xx_is_not_retried(fal, client):
    fal.fail_submit(times=1, status=503)
    with pytest.raises(FalError) as info:
        client.submit(WAN_I2V, ARGS)
    assert info.value.kind == "http" and info.value.status == 503
    assert fal.count("POST", "/fal-ai/*") == 1
    assert fal.submissions == {}


def test_submit_timeout_is_not_retried_and_says_it_may_be_queued(fal):
    fal.hang_paths = {"/fal-ai/*"}
    with FalClient(fal.key, fal.url, retries=3, backoff=0.01, read_timeout=0.2) as c:
        try:
            with pytest.raises(FalError) as info:
                c.submit(WAN_I2V, ARGS)
        finally:
            fal.release_hangs()
    assert info.value.kind == "timeout" and not info.value.retryable
    assert "may or may not be queued" in str(info.value)
    assert fal.count("POST", "/fal-ai/*") == 1


def test_webhook_delivered_with_output(fal, client):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        fal.run_seconds = 0.0
        handle = client.submit(WAN_I2V, ARGS, webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        fal.wait_for(lambda d: d.webhook_deliveries)
    finally:
        server.shutdown()
        server.server_close()
    delivery = fal.webhook_deliveries[0]
    assert delivery["status"] == 200
    assert delivery["body"]["request_id"] == handle["request_id"]
    assert delivery["body"]["status"] == "OK"
    assert delivery["body"]["payload"]["video"]["url"].endswith(f"/files/{handle['request_id']}.mp4")
    assert len(received) == 1


def test_download_large_output_streams_equal_bytes(fal, client):
    fal.output_size = 3 * 1024 * 1024 + 17
    fal.queue_polls, fal.progress_polls = 0, 0
    handle = client.submit(WAN_I2V_TURBO, {"image_url": IMAGE, "prompt": "x"})
    client.status(handle["status_url"])
    url = client.result(handle["response_url"])["video"]["url"]
    digest, size, chunks = hashlib.sha256(), 0, 0
    with client.open_download(url) as resp:
        for chunk in resp.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
            chunks += 1
    assert size == fal.output_size and chunks > 1
    assert digest.hexdigest() == fal.output_sha256()


def test_download_truncated_is_unreachable_error(fal, client):
    fal.output_size = 1024 * 1024
    fal.fail_download = "truncate"
    fal.queue_polls, fal.progress_polls = 0, 0
    handle = client.submit(WAN_I2V, ARGS)
    client.status(handle["status_url"])
    url = client.result(handle["response_url"])["video"]["url"]
    with pytest.raises(FalError) as info:
        with client.open_download(url) as resp:
            b"".join(resp.iter_bytes())
    assert info.value.kind == "unreachable" and info.value.retryable


def test_download_gone_is_not_found(fal, client):
    fal.fail_download = 404
    fal.queue_polls, fal.progress_polls = 0, 0
    handle = client.submit(WAN_I2V, ARGS)
    client.status(handle["status_url"])
    url = client.result(handle["response_url"])["video"]["url"]
    with pytest.raises(FalError) as info:
        with client.open_download(url):
            pass
    assert info.value.kind == "not_found"
    assert "copy them promptly" in str(info.value)


def test_resolution_for_uses_shorter_side():
    assert resolution_for(832, 480) == "480p"
    assert resolution_for(480, 832) == "480p"
    assert resolution_for(1024, 576) == "580p"
    assert resolution_for(1280, 720) == "720p"
    assert resolution_for(1280, 1280) == "720p"


def test_estimate_cost_per_video_second_by_resolution():
    assert PRICES_TAKEN == "2026-08"
    # 81 frames are 5.0625 s at 16 fps.
    assert estimate_cost(WAN_I2V, 1280, 720, 81) == Decimal("0.4050")
    assert estimate_cost(WAN_I2V, 1024, 576, 81) == Decimal("0.3038")
    assert estimate_cost(WAN_I2V, 832, 480, 81) == Decimal("0.2025")
    assert estimate_cost(WAN_I2V, 832, 480, 161) == Decimal("0.4025")


def test_estimate_cost_turbo_per_video():
    assert estimate_cost(WAN_I2V_TURBO, 1280, 720, 161) == Decimal("0.10")
    assert estimate_cost(WAN_I2V_TURBO, 1024, 576, 17) == Decimal("0.075")
    assert estimate_cost(WAN_I2V_TURBO, 832, 480, 81) == Decimal("0.05")


def test_estimate_cost_unknown_endpoint_raises():
    with pytest.raises(ValueError, match="No price known"):
        estimate_cost("fal-ai/other", 832, 480, 81)


def test_build_input_maps_fields_for_base_endpoint():
    args = build_input(image_url=IMAGE, prompt="p", negative_prompt="blurry", frames=81, fps=16, width=832, height=480, seed=7, endpoint=WAN_I2V)
    assert args == {"image_url": IMAGE, "prompt": "p", "negative_prompt": "blurry", "num_frames": 81, "frames_per_second": 16,
                    "resolution": "480p", "aspect_ratio": "auto", "seed": 7}


def test_build_input_turbo_drops_unsupported_fields(fal, client):
    args = build_input(image_url=IMAGE, prompt="p", negative_prompt="blurry", frames=81, fps=16, width=1280, height=720, seed=None, endpoint=WAN_I2V_TURBO)
    assert args == {"image_url": IMAGE, "prompt": "p", "resolution": "720p", "aspect_ratio": "16:9"}
    handle = client.submit(WAN_I2V_TURBO, args)
    assert fal.submissions[handle["request_id"]] == args


def test_build_input_fps_out_of_range_is_invalid_before_submit():
    with pytest.raises(FalError) as info:
        build_input(image_url=IMAGE, prompt="p", negative_prompt="", frames=81, fps=2, width=832, height=480, seed=None, endpoint=WAN_I2V)
    assert info.value.kind == "invalid" and info.value.fields == ("fps",)
    assert "between 4 and 60" in str(info.value)
