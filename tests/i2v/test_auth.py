import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from i2v.core.tokens import ApiToken, hash_token


def test_api_without_token_is_401(anon_api):
    resp = anon_api.get("/api/gpu/config")
    assert resp.status_code == 401
    assert "Bearer" in resp.json()["detail"]


def test_api_with_valid_token_answers(api):
    resp = api.get("/api/gpu/config")
    assert resp.status_code == 200
    assert resp.json()["gpu_provider"] == "none"


def test_api_with_wrong_token_is_401(client, token):
    resp = client.get("/api/gpu/config", headers={"Authorization": f"Bearer {token}x"})
    assert resp.status_code == 401


def test_api_with_revoked_token_is_401(client, user):
    row, key = ApiToken.issue(user)
    assert client.get("/api/gpu/config", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    row.revoke()
    assert client.get("/api/gpu/config", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_token_is_stored_hashed(user):
    row, key = ApiToken.issue(user)
    stored = ApiToken.objects.get(pk=row.pk)
    assert stored.key_hash == hash_token(key)
    assert key not in (stored.key_hash, stored.prefix, stored.name)
    assert len(key) > 40


def test_token_of_inactive_user_is_401(client, user, token):
    user.is_active = False
    user.save()
    assert client.get("/api/gpu/config", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_create_api_token_command_prints_token_last(user, capsys):
    from django.core.management import call_command

    call_command("create_api_token", "alice")
    out = capsys.readouterr().out.strip().splitlines()
    key = out[-1]
    assert ApiToken.authenticate(key) == user


def test_session_post_without_csrf_is_refused(client, staff):
    client.force_login(staff)
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(staff)
    resp = strict.post("/api/gpu/config", data={"gpu_provider": "local"}, content_type="application/json")
    assert resp.status_code in (401, 403)
    from gpu.models import GpuConfig

    assert GpuConfig.get().gpu_provider == "none"


def test_pages_redirect_to_login(client):
    resp = client.get("/")
    assert resp.status_code == 302
    assert resp["Location"].startswith("/accounts/login/")


def test_login_is_rate_limited(client, user, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert client.post("/accounts/login/", {"username": "alice", "password": "wrong"}).status_code == 200
    assert client.post("/accounts/login/", {"username": "alice", "password": "wrong"}).status_code == 429
    resp = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert resp.status_code == 429
    assert "Too many failed logins" in resp.content.decode()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from i2v.core.tokens import token_memo

    fake = FakeClock()
    monkeypatch.setattr(token_memo, "clock", fake)
    return fake


def test_token_memo_skips_the_database_and_a_revocation_elsewhere_takes_effect_within_its_lifetime(
        client, user, clock, settings):
    """A web process remembers an accepted token for I2V_TOKEN_CACHE_SECONDS. A revocation made in
    another process (here: a plain UPDATE, as another gunicorn worker's admin save would look)
    is honoured once that time has passed, never later."""
    settings.I2V_TOKEN_CACHE_SECONDS = 5
    row, key = ApiToken.issue(user)
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/gpu/config", headers=auth).status_code == 200
    ApiToken.objects.filter(pk=row.pk).update(revoked_at=timezone.now())
    with CaptureQueriesContext(connection) as ctx:
        assert client.get("/api/jobs?limit=1", headers=auth).status_code == 200
    assert ctx.captured_queries, "the job list itself is read"
    assert not any("apitoken" in q["sql"].lower() for q in ctx.captured_queries)
    clock.now += 4.9
    assert client.get("/api/gpu/config", headers=auth).status_code == 200
    clock.now += 0.2
    assert client.get("/api/gpu/config", headers=auth).status_code == 401


def test_token_memo_forgets_at_once_what_this_process_changes(client, user, clock, settings):
    settings.I2V_TOKEN_CACHE_SECONDS = 60
    row, key = ApiToken.issue(user)
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/gpu/config", headers=auth).status_code == 200
    user.is_active = False
    user.save()
    assert client.get("/api/gpu/config", headers=auth).status_code == 401
    user.is_active = True
    user.save()
    assert client.get("/api/gpu/config", headers=auth).status_code == 200
    row.delete()
    assert client.get("/api/gpu/config", headers=auth).status_code == 401


def test_token_memo_off_asks_the_database_every_time(client, user, settings):
    settings.I2V_TOKEN_CACHE_SECONDS = 0
    row, key = ApiToken.issue(user)
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/gpu/config", headers=auth).status_code == 200
    ApiToken.objects.filter(pk=row.pk).update(revoked_at=timezone.now())
    assert client.get("/api/gpu/config", headers=auth).status_code == 401


def test_staff_rights_removed_in_this_process_apply_at_once(client, staff, settings):
    settings.I2V_TOKEN_CACHE_SECONDS = 60
    _, key = ApiToken.issue(staff)
    auth = {"Authorization": f"Bearer {key}"}
    body = {"gpu_provider": "local", "comfyui_url": "http://127.0.0.1:8188"}
    assert client.post("/api/gpu/config", body, content_type="application/json", headers=auth).status_code == 200
    staff.is_staff = False
    staff.save()
    resp = client.post("/api/gpu/config", body, content_type="application/json", headers=auth)
    assert resp.status_code == 403, resp.content


def test_failed_login_keeps_the_username(client, user):
    resp = client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    html = resp.content.decode()
    assert "didn&#x27;t match" in html or "didn't match" in html
    assert 'value="alice"' in html


def test_favicon_is_served(client, user):
    from django.contrib.staticfiles import finders

    resp = client.get("/favicon.ico")
    assert resp.status_code == 301 and resp["Location"].endswith("/favicon.svg")
    assert finders.find("favicon.svg")
    client.force_login(user)
    assert 'rel="icon"' in client.get("/").content.decode()
