"""`make run`'s SQLite backend (i2v/sqlite/base.py): writers wait their turn on a lock file, in the
kernel, instead of in SQLite's sleep-and-retry loop, and never longer than the database's timeout."""

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import OperationalError, connection, connections, transaction

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gate_file(transactional_db):
    if connection.vendor != "sqlite":
        pytest.skip(f"SQLite only (this run uses {connection.vendor})")
    connection.ensure_connection()
    return Path(os.path.abspath(str(connection.settings_dict["NAME"])) + "-writer")


def is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_write_transaction_holds_the_gate_until_it_commits_or_rolls_back(gate_file, user):
    assert not is_held(gate_file)
    with transaction.atomic():
        get_user_model().objects.filter(pk=user.pk).update(last_name="a")
        assert is_held(gate_file)
    assert not is_held(gate_file)
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        get_user_model().objects.filter(pk=user.pk).update(last_name="b")
        assert is_held(gate_file)
        1 / 0
    assert not is_held(gate_file)
    user.refresh_from_db()
    assert user.last_name == "a"  # the rolled-back write is gone, the gate free for the next


WRITER = """
import django, sys
django.setup()
from django.contrib.auth import get_user_model
from django.db.models import Value
from django.db.models.functions import Concat
print("writing", flush=True)
get_user_model().objects.filter(pk=int(sys.argv[1])).update(last_name=Concat("last_name", Value("b")))
print("written", flush=True)
"""


def waiting_at(path: Path) -> bool:
    """Whether the kernel lists a process blocked on the file's lock ("->" in /proc/locks)."""
    inode = os.stat(path).st_ino
    return any(line.split()[1] == "->" and line.split()[-3].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 3)


def test_a_writer_in_another_process_waits_at_the_gate_and_goes_in_after_the_holder(gate_file, user):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "i2v.settings_test",
           "I2V_TEST_DB_NAME": str(connection.settings_dict["NAME"])}
    with transaction.atomic():
        get_user_model().objects.filter(pk=user.pk).update(last_name="a")
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(user.pk)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "writing"
            deadline = time.monotonic() + 30
            while not waiting_at(gate_file):  # queued in the kernel, not sleeping in SQLite's retries
                assert writer.poll() is None and time.monotonic() < deadline, "the writer never waited at the gate"
                time.sleep(0.01)
        except BaseException:
            writer.kill()
            raise
    out, _ = writer.communicate(timeout=30)
    assert writer.returncode == 0 and out.strip() == "written"
    user.refresh_from_db()
    assert user.last_name == "ab"  # after the holder's write, not instead of it


def test_a_thread_kept_out_past_the_timeout_fails_with_database_is_locked_instead_of_hanging(gate_file, user,
                                                                                              monkeypatch):
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "timeout", 0.2)
    failed = []

    def write_meanwhile():
        try:
            get_user_model().objects.filter(pk=user.pk).update(last_name="b")
        except OperationalError as exc:
            failed.append(str(exc))
        finally:
            connections.close_all()

    with transaction.atomic():
        get_user_model().objects.filter(pk=user.pk).update(last_name="a")
        other = threading.Thread(target=write_meanwhile)
        other.start()
        other.join(timeout=30)
        assert not other.is_alive()
    assert failed == ["database is locked"]
    user.refresh_from_db()
    assert user.last_name == "a"
    get_user_model().objects.filter(pk=user.pk).update(last_name="c")  # the gate works on afterwards
