"""Password and token guessing (django-axes): a username is locked for the client address that
guessed, counted in the database (every web process sees the same count), on the admin's login,
/accounts/login/ and the API token check alike, with a message that says when to try again. The
lock never reaches another username or another address."""

import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.test import Client

ATTACKER = "203.0.113.7"
NEIGHBOUR = "203.0.113.8"


def login(path, username, password, address=ATTACKER, **headers):
    return Client(REMOTE_ADDR=address, headers=headers).post(path, {"username": username, "password": password})


def logged_in(resp):
    return resp.status_code == 302 and "/login" not in resp["Location"]


@pytest.fixture
def admin_user(db):
    return get_user_model().objects.create_user("root", password="root-pass-123", is_staff=True, is_superuser=True)


def test_30_wrong_admin_passwords_lock_that_username_from_that_address(admin_user, staff, settings):
    answers = [login("/admin/login/", "root", f"guess-{i}").status_code for i in range(30)]
    limit = settings.AXES_FAILURE_LIMIT
    assert answers[: limit - 1] == [200] * (limit - 1) and set(answers[limit - 1:]) == {429}
    resp = login("/admin/login/", "root", "root-pass-123")
    body = resp.content.decode()
    assert resp.status_code == 429 and "Too many failed logins" in body and "Try again in 15 minutes" in body
    assert 0 < int(resp["Retry-After"]) <= 15 * 60
    # Counted in the database, so another web process refuses it too.
    assert AccessAttempt.objects.get(username="root", ip_address=ATTACKER).failures_since_start >= limit
    # Another user, from the same address, still logs in; and root from another address.
    assert logged_in(login("/admin/login/", "carol", "carol-pass-123"))
    assert logged_in(login("/admin/login/", "root", "root-pass-123", address=NEIGHBOUR))


def test_accounts_login_lock_says_when_to_retry_and_spares_others(user, other_user, settings):
    for i in range(settings.AXES_FAILURE_LIMIT):
        login("/accounts/login/", "alice", f"guess-{i}")
    resp = login("/accounts/login/", "alice", "alice-pass-123")
    assert resp.status_code == 429 and "Try again in 15 minutes" in resp.content.decode()
    assert resp["Retry-After"].isdigit()
    assert logged_in(login("/accounts/login/", "bob", "bob-pass-123"))


def test_a_right_password_before_the_limit_resets_the_count(user, settings):
    for i in range(settings.AXES_FAILURE_LIMIT - 1):
        login("/accounts/login/", "alice", f"guess-{i}")
    assert logged_in(login("/accounts/login/", "alice", "alice-pass-123"))
    for i in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login("/accounts/login/", "alice", f"again-{i}").status_code == 200


def test_behind_a_proxy_the_address_the_proxy_appended_counts(user, settings):
    """X-Forwarded-For entries a client writes itself change nothing; the proxy's own entry does."""
    settings.I2V_BEHIND_PROXY = True
    for i in range(settings.AXES_FAILURE_LIMIT):
        login("/accounts/login/", "alice", f"guess-{i}", address="10.0.0.2",
              **{"X-Forwarded-For": f"198.51.100.{i}, {ATTACKER}"})
    assert login("/accounts/login/", "alice", "alice-pass-123", address="10.0.0.2",
                 **{"X-Forwarded-For": f"1.1.1.1, {ATTACKER}"}).status_code == 429
    # Everyone else behind the same proxy is another address: not locked.
    assert logged_in(login("/accounts/login/", "alice", "alice-pass-123", address="10.0.0.2",
                           **{"X-Forwarded-For": NEIGHBOUR}))


def test_without_the_proxy_setting_forwarded_headers_are_ignored(user, settings):
    settings.I2V_BEHIND_PROXY = False
    for i in range(settings.AXES_FAILURE_LIMIT):
        login("/accounts/login/", "alice", f"guess-{i}", **{"X-Forwarded-For": f"198.51.100.{i}"})
    assert login("/accounts/login/", "alice", "alice-pass-123", **{"X-Forwarded-For": NEIGHBOUR}).status_code == 429


def test_wrong_api_tokens_are_throttled_per_address_and_right_tokens_still_work(user, token, settings):
    guesser = Client(REMOTE_ADDR=ATTACKER)
    answers = [guesser.get("/api/jobs", headers={"Authorization": f"Bearer i2v_guess{i}"}) for i in range(15)]
    assert answers[0].status_code == 401
    assert answers[-1].status_code == 429
    detail = answers[-1].json()["detail"]
    assert "Too many wrong API tokens" in detail and "Try again in" in detail
    assert answers[-1]["Retry-After"].isdigit()
    # A real token from the same address is not locked out by the guesser.
    resp = guesser.get("/api/jobs", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200 and resp.json()["count"] == 0
    # Another address guessing starts from zero.
    assert Client(REMOTE_ADDR=NEIGHBOUR).get("/api/jobs", headers={"Authorization": "Bearer i2v_x"}).status_code == 401
