"""The prebuilt statements on every job's way to its GPU (i2v.core.sql): prepared once per
connection on PostgreSQL, never prepared when a pooler would lose them, and to the rest of the
code they behave as Django's own queries (its errors, its query log)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from generation import scheduler
from generation.models import VideoJob
from i2v.core.sql import fetch, prebuilt, write

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def postgresql(db):
    if connection.vendor != "postgresql":
        pytest.skip(f"PostgreSQL only (this run uses {connection.vendor}): set DATABASE_URL=postgres://...")


def prepared_here() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return {row[0] for row in cursor.fetchall()}


def test_a_pass_prepares_its_statements_once_per_connection(postgresql):
    scheduler.run_pass()
    first = prepared_here()
    # The pass's reads are there (the GPU configuration, the jobs holding GPU slots, its lock).
    assert any('FROM "gpu_gpuconfig"' in sql for sql in first), first
    assert any('"generation_schedulerstate"' in sql and "FOR UPDATE" in sql for sql in first), first
    scheduler.run_pass()
    assert prepared_here() == first  # the second pass prepared nothing anew


def test_nothing_is_prepared_when_preparing_is_off(postgresql, monkeypatch):
    """I2V_DB_PREPARED=0 (a pooler in transaction mode loses prepared statements): the same passes
    run, and nothing is prepared on the server."""
    connection.ensure_connection()
    monkeypatch.setattr(connection.connection, "prepare_threshold", None)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    scheduler.run_pass()
    scheduler.run_pass()
    assert prepared_here() == set()


@pytest.mark.parametrize("value, expected", [("", 2**31 - 1), ("0", None)])
def test_the_prepared_switch_is_read_from_the_environment(tmp_path, value, expected):
    code = ("import django; from django.conf import settings; django.setup();"
            "print(settings.DATABASES['default']['OPTIONS'].get('prepare_threshold'))")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "i2v.settings", "I2V_DATA_DIR": str(tmp_path),
           "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test", "I2V_DB_PREPARED": value}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == str(expected)


def test_a_refused_write_raises_djangos_error_and_the_transaction_goes_on(user):
    """The callers catch Django's errors (IntegrityError, OperationalError): a prebuilt write must
    raise those, not the driver's, and an atomic block around it recovers as with the ORM."""
    job = VideoJob.objects.create(owner=user, prompt="p", workflow_slug="smoke", width=320, height=192, frames=33, fps=16)
    sql = prebuilt("test.width", lambda q: f"UPDATE {q(VideoJob)} SET {q(VideoJob, 'width')} = %s WHERE {q(VideoJob, 'id')} = %s")
    pk = VideoJob._meta.pk.get_db_prep_value(job.pk, connection)
    with pytest.raises(IntegrityError):
        with transaction.atomic():
            write(sql, [-1, pk])  # the width's CHECK (>= 0)
    assert write(sql, [640, pk]) == 1
    job.refresh_from_db()
    assert job.width == 640


def test_prebuilt_reads_show_in_djangos_query_log(user):
    """Tests that a poll is answered "without the database" count Django's captured queries:
    a prebuilt read must be among them."""
    sql = prebuilt("test.count", lambda q: f"SELECT COUNT(*) FROM {q(VideoJob)} WHERE {q(VideoJob, 'owner')} = %s")
    with CaptureQueriesContext(connection) as queries:
        assert fetch(sql, [user.pk]) == [(0,)]
    [logged] = queries.captured_queries
    assert logged["sql"].startswith(f"SELECT COUNT(*) FROM {connection.ops.quote_name(VideoJob._meta.db_table)}")
