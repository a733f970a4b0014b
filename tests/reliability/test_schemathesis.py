"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis):
with a valid staff token (so every route reaches its real code), no generated request may
get a 5xx answer. vast.ai is configured against its double (unconfigured, its routes
answer a documented 503). Bounded (`MAX_EXAMPLES` per operation) so it stays well under a minute in CI;
`make test-long` runs 1000 fresh examples per operation (`I2V_FUZZ_EXAMPLES_LONG`)."""

import os
import socket

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings

from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures: vast.ai configured against its double)

MAX_EXAMPLES = int(os.environ.get("I2V_FUZZ_EXAMPLES", "25"))
_real_getaddrinfo = socket.getaddrinfo


@pytest.fixture
def api_schema(db, monkeypatch, vast_settings, policy):
    from i2v.wsgi import application

    # Generated URLs (test-connection, image_url) must not reach the internet: every name but
    # localhost fails to resolve at once, and nothing is queued for a worker.
    def offline_getaddrinfo(host, *args, **kw):
        if host in ("127.0.0.1", "localhost", "::1"):
            return _real_getaddrinfo(host, *args, **kw)
        raise socket.gaierror(socket.EAI_NONAME, "offline test")

    monkeypatch.setattr(socket, "getaddrinfo", offline_getaddrinfo)
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
    # As Django's test client does: the WSGI app must not close the test's database connection
    # at the end of each request (it lives inside the test's transaction).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/openapi.json", application)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def fuzz_token(db):
    from django.contrib.auth import get_user_model

    from i2v.core.tokens import ApiToken

    staff, _ = get_user_model().objects.get_or_create(username="fuzz", defaults={"is_staff": True, "is_superuser": True})
    return ApiToken.issue(staff, name="fuzz")[1]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case, fuzz_token):
    check_no_5xx(case, fuzz_token)


def check_no_5xx(case, token):
    # A valid `?wait=` or `Prefer: wait` makes the answer wait for the job (up to 60 s): keep the
    # fuzzer's waits short; any value still reaches the parsing and validation.
    if case.query and isinstance(case.query.get("wait"), (int, float)) and case.query["wait"] > 0.2:
        case.query["wait"] = 0.2
    if case.headers and str(case.headers.get("Prefer", "")).startswith("wait"):
        case.headers["Prefer"] = "wait=1"
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}\n{case.as_curl_command()}\n{response.text[:2000]}")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=int(os.environ.get("I2V_FUZZ_EXAMPLES_LONG", "1000")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx_long(case, fuzz_token):
    """The long variant (`make test-long`): more examples, and new ones on every run (not
    derandomized)."""
    check_no_5xx(case, fuzz_token)
