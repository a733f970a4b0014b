"""Who can do what, and what never leaks: every API route but the public ones answers 401 without
a token (the fal.ai webhook 403 with a bad token); another user's jobs are 404 on the API and the
pages; configured secrets never appear in a response, a page or a log line; security headers
are on pages and API answers. (The login rate limit is tested in tests/i2v/test_auth.py.)"""

import io
import logging
import re
import uuid

import pytest

from generation.models import VideoJob
from gpu.models import GpuConfig
from i2v.api import api as ninja_api
from tests.doubles.comfyui import ComfyUIDouble
from tests.helpers import png_bytes

PUBLIC = {("GET", "/api/ping"), ("GET", "/api/openapi.json"), ("GET", "/api/docs")}
WEBHOOK = "/api/fal/webhook/{job_id}"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def api_routes():
    """Every (method, path) the NinjaAPI serves, hidden ones included (read from the routers, not
    the OpenAPI document, so an `include_in_schema=False` route cannot slip through)."""
    routes = set()
    for prefix, router in ninja_api._routers:
        for path, path_view in router.path_operations.items():
            full = "/api/" + "/".join(p.strip("/") for p in (prefix, path) if p.strip("/"))
            full = re.sub(r"\{(?:\w+:)?(\w+)\}", r"{\1}", full)
            for operation in path_view.operations:
                for method in operation.methods:
                    routes.add((method, full))
    routes.add(("GET", "/api/openapi.json"))
    return sorted(routes)


ROUTES = api_routes()


def concrete(path):
    return re.sub(r"\{\w+\}", str(uuid.uuid4()), path)


def test_the_route_list_is_complete():
    # Guards against the enumeration silently finding nothing.
    assert ("POST", "/api/generate-video") in ROUTES and ("DELETE", "/api/vastai/instances/{instance_id}") in ROUTES
    assert ("POST", WEBHOOK) in ROUTES and ("POST", "/api/gpu/config") in ROUTES
    assert len([r for r in ROUTES if r[0] in UNSAFE]) >= 8


@pytest.mark.parametrize("method, path", [r for r in ROUTES if r not in PUBLIC and r[1] != WEBHOOK])
def test_every_route_without_a_token_is_401(client, db, method, path, monkeypatch):
    spent = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: spent.append(a))
    resp = client.generic(method, concrete(path), data=b"{}", content_type="application/json")
    assert resp.status_code == 401, (method, path, resp.status_code, resp.content[:200])
    assert "Bearer" in resp.json()["detail"]
    assert spent == [] and VideoJob.objects.count() == 0


@pytest.mark.parametrize("method, path", [r for r in ROUTES if r not in PUBLIC and r[1] != WEBHOOK and r[0] in UNSAFE])
def test_every_unsafe_route_with_a_bad_token_is_401(client, db, method, path):
    resp = client.generic(method, concrete(path), data=b"{}", content_type="application/json",
                          headers={"Authorization": "Bearer not-a-real-token"})
    assert resp.status_code == 401, (method, path, resp.status_code)


@pytest.mark.parametrize("token", ["", "wrong", "x" * 64])
def test_fal_webhook_with_a_bad_token_is_403(client, db, token, monkeypatch):
    spent = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: spent.append(a))
    resp = client.post(f"/api/fal/webhook/{uuid.uuid4()}?token={token}", data=b'{"status": "OK"}',
                       content_type="application/json")
    assert resp.status_code == 403 and "token" in resp.json()["detail"]
    assert spent == []


def test_session_without_csrf_token_cannot_change_state(db, user):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    resp = browser.post("/api/jobs/%s/cancel" % uuid.uuid4())
    assert resp.status_code in (401, 403)


JOB_PAGES = ["/jobs/{id}/", "/jobs/{id}/status", "/jobs/{id}/badge", "/jobs/{id}/image", "/jobs/{id}/video"]
JOB_POSTS = ["/jobs/{id}/cancel", "/jobs/{id}/retry"]


def test_another_users_job_is_404_everywhere(client, user, other_user, token, other_token, monkeypatch):
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
    image = io.BytesIO(png_bytes())
    image.name = "in.png"
    resp = client.post("/api/generate-video", {"prompt": "mine", "workflow": "smoke", "image": image},
                       headers={"Authorization": f"Bearer {token}"})
    job_id = resp.json()["id"]
    VideoJob.objects.filter(pk=job_id).update(status="failed")  # so retry would be allowed for the owner
    bob = {"Authorization": f"Bearer {other_token}"}
    assert client.get(f"/api/jobs/{job_id}", headers=bob).status_code == 404
    assert client.post(f"/api/jobs/{job_id}/cancel", headers=bob).status_code == 404
    assert job_id not in client.get("/api/jobs", headers=bob).content.decode()
    client.force_login(other_user)
    for page in JOB_PAGES:
        assert client.get(page.format(id=job_id)).status_code == 404, page
    for page in JOB_POSTS:
        assert client.post(page.format(id=job_id)).status_code == 404, page
    assert job_id not in client.get("/jobs/").content.decode()
    assert VideoJob.objects.get(pk=job_id).status == "failed"
    client.force_login(user)
    assert client.get(f"/jobs/{job_id}/").status_code == 200


SECRETS = {
    "comfyui_token": "cfy-tok-7f3a9c1e5b2d4a6f8e0c",
    "VASTAI_API_KEY": "vast-key-0d9e8f7a6b5c4d3e2f1a",
    "FAL_KEY": "fal-id-1234:fal-secret-9a8b7c6d5e4f",
    "R2_SECRET_ACCESS_KEY": "r2-secret-5e4d3c2b1a0f9e8d7c6b",
}


@pytest.mark.django_db(transaction=True)
def test_secrets_never_appear_in_responses_pages_or_logs(client, staff, settings, caplog, monkeypatch):
    from django.core.cache import cache

    from generation import tasks
    from i2v.core.tokens import ApiToken
    from tests.gpu.vast_helpers import VastAIDouble

    monkeypatch.setattr(tasks, "enqueue", lambda func, *args: None)
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
    caplog.set_level(logging.DEBUG)
    seen = []

    with ComfyUIDouble(token=SECRETS["comfyui_token"]) as comfy, VastAIDouble(api_key=SECRETS["VASTAI_API_KEY"]) as vast:
        settings.VASTAI_API_KEY, settings.VASTAI_API_URL = vast.api_key, vast.url
        settings.FAL_KEY = SECRETS["FAL_KEY"]
        settings.R2_SECRET_ACCESS_KEY = SECRETS["R2_SECRET_ACCESS_KEY"]
        settings.R2_ACCESS_KEY_ID = "r2-key-id"
        settings.I2V_FOLLOW_SLICE = 5
        key = ApiToken.issue(staff, name="t")[1]
        auth = {"Authorization": f"Bearer {key}"}

        def hit(method, path, **kw):
            resp = client.generic(method, path, **kw) if method not in ("GET", "POST") else getattr(client, method.lower())(path, **kw)
            seen.append((f"{method} {path}", resp.status_code, resp.content.decode(errors="replace"), dict(resp.headers)))
            return resp

        # The API: set the token (alone, then embedded in the URL), read back, probe, health, generate, run.
        hit("POST", "/api/gpu/config", data={"comfyui_url": comfy.url, "comfyui_token": SECRETS["comfyui_token"],
                                             "gpu_provider": "local"}, content_type="application/json", headers=auth)
        hit("POST", "/api/gpu/config", data={"comfyui_url": f"{comfy.url}?token={SECRETS['comfyui_token']}"},
            content_type="application/json", headers=auth)
        assert GpuConfig.get().comfyui_token == SECRETS["comfyui_token"]
        hit("GET", "/api/gpu/config", headers=auth)
        hit("POST", "/api/gpu/test-connection", data={"url": comfy.url, "token": SECRETS["comfyui_token"]},
            content_type="application/json", headers=auth)
        hit("POST", "/api/gpu/test-connection", data={"url": f"{comfy.url}?token={SECRETS['comfyui_token']}"},
            content_type="application/json", headers=auth)
        hit("POST", "/api/gpu/test-connection", data={"url": comfy.url, "token": "wrong-" + SECRETS["comfyui_token"][::-1]},
            content_type="application/json", headers=auth)
        cache.clear()
        hit("GET", "/api/gpu/health", headers=auth)
        hit("GET", "/api/vastai/offers", headers=auth)
        image = io.BytesIO(png_bytes())
        image.name = "in.png"
        job_id = hit("POST", "/api/generate-video", data={"prompt": "x", "workflow": "smoke", "image": image},
                     headers=auth).json()["id"]
        for _ in range(20):
            tasks.run_job(job_id)
            if VideoJob.objects.get(pk=job_id).is_terminal:
                break
        assert VideoJob.objects.get(pk=job_id).status == "completed"
        hit("GET", f"/api/jobs/{job_id}", headers=auth)
        hit("GET", "/api/jobs", headers=auth)
        hit("POST", "/api/generate-video", data={"prompt": "x", "backend": "fal", "image_url": "http://127.0.0.1:9/a.png"},
            content_type="application/json", headers=auth)

        # The pages: GPU page, its health and config partials, the admin GpuConfig page and history.
        client.force_login(staff)
        for page in ("/gpu/", "/gpu/health", "/", f"/jobs/{job_id}/", "/jobs/", "/admin/gpu/gpuconfig/",
                     f"/admin/gpu/gpuconfig/{GpuConfig.get().pk}/change/", f"/admin/gpu/gpuconfig/{GpuConfig.get().pk}/history/",
                     "/admin/gpu/gpuconfigchange/", "/admin/generation/videojob/", f"/admin/generation/videojob/{job_id}/change/"):
            hit("GET", page)
        hit("POST", "/gpu/test-connection", data={"url": comfy.url, "token": SECRETS["comfyui_token"]})
        hit("POST", "/gpu/config", data={"comfyui_url": comfy.url, "comfyui_token": SECRETS["comfyui_token"],
                                         "gpu_provider": "local"})
        for change in __import__("gpu.models", fromlist=["GpuConfigChange"]).GpuConfigChange.objects.all()[:3]:
            hit("GET", f"/admin/gpu/gpuconfigchange/{change.pk}/change/")

    assert len(seen) >= 20 and all(code < 500 for _, code, _, _ in seen), [(w, c) for w, c, _, _ in seen if c >= 500]
    logs = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "POST /prompt" in logs or len(caplog.records) > 0
    for name, secret in SECRETS.items():
        parts = [secret] + ([secret.split(":")[1]] if ":" in secret else [])
        for part in parts:
            for what, code, body, headers in seen:
                assert part not in body, f"{name} appears in the answer to {what} ({code})"
                assert part not in str(headers), f"{name} appears in the headers of {what}"
            assert part not in logs, f"{name} appears in the logs: " + logs[max(0, logs.find(part) - 300):logs.find(part) + 50]


@pytest.mark.parametrize("path, auth", [
    ("/", "session"), ("/jobs/", "session"), ("/gpu/", "session"), ("/accounts/login/", None),
    ("/api/jobs", "token"), ("/api/ping", None), ("/api/jobs", None), ("/api/jobs/" + "0" * 32, "token"),
    ("/api/openapi.json", None), ("/admin/login/", None), ("/account/", "session"), ("/api/docs", "session"),
])
def test_security_headers_on_pages_and_api(client, staff, token, path, auth):
    headers = {}
    if auth == "session":
        client.force_login(staff)
    elif auth == "token":
        headers["Authorization"] = f"Bearer {token}"
    resp = client.get(path, headers=headers)
    assert resp.status_code < 500
    assert resp["X-Content-Type-Options"] == "nosniff", path
    assert resp["X-Frame-Options"] == "DENY", path
    assert resp["Referrer-Policy"] == "same-origin", path
    policy = resp["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "frame-ancestors 'none'" in policy, path
