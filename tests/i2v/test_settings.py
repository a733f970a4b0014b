"""Each settings switch, read from the environment as a fresh process would."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.core.files.base import ContentFile

ROOT = Path(__file__).resolve().parents[2]
SWITCHES = ("DATABASE_URL", "REDIS_URL", "R2_BUCKET", "R2_ENDPOINT_URL", "R2_ACCOUNT_ID", "R2_PUBLIC_URL")


def settings_in_fresh_process(tmp_path, **env):
    code = (
        "import json, django; from django.conf import settings; django.setup();"
        "from django_q.brokers import get_broker;"
        "print(json.dumps({'engine': settings.DATABASES['default']['ENGINE'],"
        " 'db_name': str(settings.DATABASES['default']['NAME']),"
        " 'broker': type(get_broker()).__name__,"
        " 'storage': settings.STORAGES['default']['BACKEND'],"
        " 'debug': settings.DEBUG, 'hosts': settings.ALLOWED_HOSTS}))"
    )
    full = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    full.update({"DJANGO_SETTINGS_MODULE": "i2v.settings", "I2V_DATA_DIR": str(tmp_path)}, **env)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_defaults_are_sqlite_orm_broker_local_files(tmp_path):
    s = settings_in_fresh_process(tmp_path)
    assert s["engine"] == "i2v.sqlite"
    assert s["db_name"] == str(tmp_path / "db.sqlite3")
    assert s["broker"] == "WakingORM"  # django-q2's ORM broker, woken on enqueue (i2v/broker.py)
    assert s["storage"] == "django.core.files.storage.FileSystemStorage"
    assert s["debug"] is False
    assert s["hosts"] == ["localhost", "127.0.0.1"]
    # The secret key is generated once into the data dir and reused.
    key = (tmp_path / "secret_key").read_text()
    assert len(key) > 40
    settings_in_fresh_process(tmp_path)
    assert (tmp_path / "secret_key").read_text() == key


def test_database_url_and_redis_url_switch_to_postgres_and_redis(tmp_path):
    s = settings_in_fresh_process(
        tmp_path, DATABASE_URL="postgres://postgres@127.0.0.1:5432/test", REDIS_URL="redis://127.0.0.1:6379/0"
    )
    assert s["engine"] == "django.db.backends.postgresql"
    assert s["db_name"] == "test"
    assert s["broker"] == "Redis"


def test_redis_broker_round_trip():
    """The broker the Redis setting selects really enqueues and dequeues on the running Redis."""
    from django_q.brokers.redis_broker import Redis

    broker = Redis(list_key="i2v-test-roundtrip")
    broker.connection.delete(broker.list_key)
    assert broker.ping()
    broker.enqueue("payload-1")
    assert broker.queue_size() == 1
    task = broker.dequeue()
    assert task[0][1] == b"payload-1" or task[0][1] == "payload-1"
    broker.connection.delete(broker.list_key)


def _start_pusher(broker):
    """The cluster's pusher, as django-q2 runs it: one dequeue on a thread of its own.
    Returns (the thread, the list that gets what the dequeue returned)."""
    import threading

    from django.db import connection as db

    got = []

    def pusher():
        try:
            got.append(broker.dequeue())
        finally:
            db.close()

    thread = threading.Thread(target=pusher, daemon=True)
    thread.start()
    return thread, got


@pytest.mark.django_db(transaction=True)
def test_orm_broker_wakes_its_waiting_pusher_on_enqueue(monkeypatch):
    """The idle pusher of the embedded default is woken by an enqueue, not by its poll: with a
    poll of 60 s, a task enqueued while it waits still comes out within seconds."""
    import threading

    from django_q.conf import Conf

    from i2v.broker import WakingORM

    monkeypatch.setattr(Conf, "POLL", 60)
    broker = WakingORM(list_key="i2v-test-wake")
    broker.purge_queue()
    waiter, got = _start_pusher(broker)
    while waiter.is_alive() and broker._waiter is None:  # until it sleeps on its wake-up
        threading.Event().wait(0.01)
    WakingORM(list_key="i2v-test-wake").enqueue("payload-1")
    waiter.join(timeout=20)
    assert not waiter.is_alive(), "the pusher slept through the enqueue"
    assert got[0] and got[0][0][1] == "payload-1"
    broker.purge_queue()


@pytest.mark.django_db(transaction=True)
def test_orm_broker_hears_a_task_enqueued_just_after_its_empty_look(monkeypatch):
    """A task enqueued between the pusher's empty look and its wait (the queue's busiest moment)
    still wakes it at once: the pusher listens before it looks, so that wake-up is not lost and
    the task does not wait out the poll (60 s here)."""
    from django_q.conf import Conf

    from i2v.broker import WakingORM

    monkeypatch.setattr(Conf, "POLL", 60)
    broker = WakingORM(list_key="i2v-test-gap")
    broker.purge_queue()
    take = broker._take
    looks = []

    def take_then_enqueue():
        found = take()
        if not looks:  # right after the first, empty look
            WakingORM(list_key="i2v-test-gap").enqueue("payload-gap")
        looks.append(found)
        return found

    monkeypatch.setattr(broker, "_take", take_then_enqueue)
    waiter, got = _start_pusher(broker)
    waiter.join(timeout=20)
    assert not waiter.is_alive(), "the wake-up sent between the look and the wait was lost"
    assert looks[0] is None and got[0][0][1] == "payload-gap"
    broker.purge_queue()


def r2_storage(tmp_path, monkeypatch, endpoint, **extra):
    from storages.backends.s3 import S3Storage

    for key in SWITCHES:
        monkeypatch.delenv(key, raising=False)
    env = {"I2V_DATA_DIR": str(tmp_path), "R2_BUCKET": "videos", "R2_ENDPOINT_URL": endpoint,
           "R2_ACCESS_KEY_ID": "k", "R2_SECRET_ACCESS_KEY": "s", **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    conf = runpy.run_path(str(ROOT / "i2v" / "settings.py"))["STORAGES"]["default"]
    assert conf["BACKEND"] == "storages.backends.s3.S3Storage"
    return S3Storage(**conf["OPTIONS"])


def test_r2_settings_store_files_in_s3_with_presigned_urls(tmp_path, monkeypatch, s3_server):
    storage = r2_storage(tmp_path, monkeypatch, s3_server)
    name = storage.save("videos/clip.mp4", ContentFile(b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000))
    with storage.open(name, "rb") as fh:
        assert fh.read(12) == b"\x00\x00\x00\x18ftypmp42"
    url = storage.url(name)
    assert "X-Amz-Signature=" in url
    # The presigned URL really serves the object over HTTP.
    resp = httpx.get(url)
    assert resp.status_code == 200 and len(resp.content) == 1012
    # No ACL is ever sent (R2 has none): the object has only the owner grant.
    acl = storage.connection.meta.client.get_object_acl(Bucket="videos", Key=name)
    assert all(g["Permission"] == "FULL_CONTROL" for g in acl["Grants"])


def test_r2_public_url_gives_plain_urls(tmp_path, monkeypatch, s3_server):
    storage = r2_storage(tmp_path, monkeypatch, s3_server, R2_PUBLIC_URL="https://media.example.com")
    name = storage.save("videos/a.mp4", ContentFile(b"abc"))
    assert storage.url(name) == f"https://media.example.com/{name}"


def test_r2_account_id_builds_the_endpoint(tmp_path, monkeypatch):
    for key in SWITCHES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("I2V_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("R2_BUCKET", "videos")
    monkeypatch.setenv("R2_ACCOUNT_ID", "abc123")
    conf = runpy.run_path(str(ROOT / "i2v" / "settings.py"))
    assert conf["STORAGES"]["default"]["OPTIONS"]["endpoint_url"] == "https://abc123.r2.cloudflarestorage.com"
    assert conf["STORAGES"]["default"]["OPTIONS"]["region_name"] == "auto"
    assert conf["STORAGES"]["default"]["OPTIONS"]["default_acl"] is None


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update({
        "DJANGO_SETTINGS_MODULE": "i2v.settings", "I2V_DATA_DIR": str(tmp_path), "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "x" * 20 + "a-long-and-random-production-secret-key-1234567890",
        "DJANGO_ALLOWED_HOSTS": "i2v.example.com", "DJANGO_SECURE_SSL_REDIRECT": "1",
        "DJANGO_SECURE_COOKIES": "1", "DJANGO_HSTS_SECONDS": "31536000",
    })
    out = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no issues" in out.stdout
