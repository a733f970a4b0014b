"""Answers a script can act on: every /api/ path answers JSON with a 4xx and a message for bad
input or missing credentials, never a CSRF page, an HTML 404 or a 500."""

import io

import pytest
from django.test import Client

from generation.models import VideoJob
from tests.helpers import png_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def script():
    """A client like curl or httpx: no cookies, and Django's CSRF check enforced as in production."""
    return Client(enforce_csrf_checks=True, raise_request_exception=False)


@pytest.fixture
def enqueued(monkeypatch):
    calls = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda func, *args, **kw: calls.append(func))
    return calls


@pytest.mark.parametrize("path", ["/api/generate-video", "/api/vastai/generate-video", "/api/gpu/config",
                                  "/api/gpu/test-connection", "/api/vastai/instances"])
def test_post_without_a_token_is_401_saying_a_bearer_token_is_needed(script, path):
    resp = script.post(path, {"prompt": "waves"}, content_type="application/json")

    assert resp.status_code == 401 and resp["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer <token>" in resp.json()["detail"] and "CSRF" not in resp.json()["detail"]


def test_post_with_a_wrong_token_is_401_saying_it_was_not_accepted(script, token):
    resp = script.post("/api/generate-video", {"prompt": "waves"}, content_type="application/json",
                       headers={"Authorization": f"Bearer {token}x"})

    assert resp.status_code == 401 and "not accepted" in resp.json()["detail"] and token not in resp.content.decode()


def test_a_logged_in_browser_session_still_needs_the_csrf_token(script, user, enqueued):
    script.force_login(user)

    resp = script.post("/api/generate-video", {"prompt": "waves", "image_url": "http://127.0.0.1:9/a.png"},
                       content_type="application/json")

    assert resp.status_code == 403 and "CSRF" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0 and enqueued == []


@pytest.mark.parametrize("query, words", [
    ("offset=13780452022155197802348544", "offset: must be between 0 and"),
    ("offset=-1", "offset: must be between 0 and"),
    ("limit=13780452022155197802348544", "limit: must be between 1 and 100"),
])
def test_huge_paging_numbers_are_422(api, query, words):
    resp = api.get(f"/api/jobs?{query}")

    assert resp.status_code == 422 and resp.json()["detail"].startswith(words)


def test_an_upload_over_20_mb_is_refused_by_its_content_length_before_it_is_read(api, enqueued):
    image = io.BytesIO(png_bytes() + b"\0" * (21 * 1024 * 1024))
    image.name = "big.png"

    resp = api.post("/api/generate-video", data={"prompt": "waves", "image": image}, json=False)

    assert resp.status_code == 413 and "at most 20 MB" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0 and enqueued == []


def test_an_unknown_file_field_is_422_naming_it(api, enqueued):
    extra = io.BytesIO(png_bytes())
    extra.name = "other.png"

    resp = api.post("/api/generate-video", data={"prompt": "waves", "image": io.BytesIO(png_bytes()), "picture": extra},
                    json=False)

    assert resp.status_code == 422 and resp.json()["detail"] == "picture: unknown file field; send the image as 'image'"
    assert VideoJob.objects.count() == 0 and enqueued == []


@pytest.mark.parametrize("host", ["0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "017700000001"])
def test_numeric_hosts_other_than_a_dotted_quad_are_422_in_every_url_field(api, staff_api, enqueued, host):
    url = f"http://{host}/"
    answers = [
        api.post("/api/generate-video", {"prompt": "waves", "image_url": url + "a.png"}),
        api.post("/api/generate-video", {"prompt": "waves", "image_url": "http://127.0.0.1:9/a.png", "webhook_url": url}),
        staff_api.post("/api/gpu/config", {"comfyui_url": url}),
        staff_api.post("/api/gpu/config", {"swarmui_url": url}),
        staff_api.post("/api/gpu/test-connection", {"url": url}),
    ]

    for resp in answers:
        assert resp.status_code == 422, resp.content
        assert "write it as four decimal numbers" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0 and enqueued == []


@pytest.mark.parametrize("method, path", [
    ("get", "/api/jobs/not-a-uuid"),
    ("post", "/api/jobs/not-a-uuid/cancel"),
    ("get", "/api/no-such-thing"),
    ("delete", "/api/vastai/instances/a/b/c"),
])
def test_every_api_path_answers_json(api, method, path):
    resp = getattr(api, method)(path)

    assert resp.status_code == 404 and resp["Content-Type"].startswith("application/json")
    assert path in resp.json()["detail"]


def test_pages_outside_the_api_keep_the_html_404(client, user):
    client.force_login(user)
    resp = client.get("/no-such-page")
    assert resp.status_code == 404 and resp["Content-Type"].startswith("text/html")
