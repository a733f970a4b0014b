import socket

import pytest
from django.contrib.auth import get_user_model

from i2v.core.tokens import ApiToken


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("alice", password="alice-pass-123")


@pytest.fixture
def other_user(db):
    return get_user_model().objects.create_user("bob", password="bob-pass-123")


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("carol", password="carol-pass-123", is_staff=True, is_superuser=True)


def _token_for(u):
    return ApiToken.issue(u, name="test")[1]


@pytest.fixture
def token(user):
    return _token_for(user)


@pytest.fixture
def staff_token(staff):
    return _token_for(staff)


@pytest.fixture
def other_token(other_user):
    return _token_for(other_user)


class Api:
    """Django's test client with a Bearer token: api.get('/api/jobs') etc."""

    def __init__(self, client, key):
        self.client, self.key = client, key

    def _headers(self, headers):
        headers = dict(headers or {})
        if self.key:
            headers.setdefault("Authorization", f"Bearer {self.key}")
        return headers

    def get(self, path, headers=None, **kw):
        return self.client.get(path, headers=self._headers(headers), **kw)

    def post(self, path, data=None, headers=None, json=True, **kw):
        if json:
            return self.client.post(path, data=data or {}, content_type="application/json", headers=self._headers(headers), **kw)
        return self.client.post(path, data=data or {}, headers=self._headers(headers), **kw)

    def patch(self, path, data=None, headers=None, **kw):
        return self.client.patch(path, data=data or {}, content_type="application/json", headers=self._headers(headers), **kw)

    def delete(self, path, headers=None, **kw):
        return self.client.delete(path, headers=self._headers(headers), **kw)


@pytest.fixture
def api(client, token):
    return Api(client, token)


@pytest.fixture
def staff_api(client, staff_token):
    return Api(client, staff_token)


@pytest.fixture
def anon_api(client):
    return Api(client, None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _clear_cache():
    from django.core.cache import cache, caches

    from i2v.core.tokens import token_memo

    cache.clear()
    caches["throttle"].clear()
    token_memo.clear()
    yield


@pytest.fixture(autouse=True)
def _shipped_workflows(request):
    """Transactional tests flush every table between tests, including the rows the data
    migration loaded: put the shipped workflows back, as a fresh install has them."""
    marker = request.node.get_closest_marker("django_db")
    if "transactional_db" in request.fixturenames or (marker and marker.kwargs.get("transaction")):
        request.getfixturevalue("transactional_db")
        from generation.domain import sync_shipped_workflows
        from generation.models import Workflow
        from gpu.models import ModelFile

        sync_shipped_workflows(Workflow, ModelFile)
    yield


S3_BUCKETS = ("videos", "i2v-models")


@pytest.fixture
def s3_server():
    """A real S3 server over HTTP on 127.0.0.1 (moto's server mode) with the buckets tests use;
    yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    for name in S3_BUCKETS:
        s3.create_bucket(Bucket=name)
    yield url
    server.stop()


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` are the long variants of bounded tests that do run in CI: skipped
    unless asked for with `-m slow` (`make test-long`)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long variant: `make test-long` runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
