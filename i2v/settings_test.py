"""Test settings: the real settings, with a throwaway data dir and a shareable test database."""

import atexit
import os
import shutil
import tempfile

if "I2V_DATA_DIR" not in os.environ:
    # The run's own (a process a test starts inherits it): removed when the run ends.
    os.environ["I2V_DATA_DIR"] = tempfile.mkdtemp(prefix="i2v-test-")
    atexit.register(shutil.rmtree, os.environ["I2V_DATA_DIR"], ignore_errors=True)
# django-q2 reads Q_CLUSTER once at import: a test-only queue name keeps Redis tidy.
os.environ.setdefault("I2V_Q_NAME", "i2v-test")
# vast.ai's minimum intervals between calls, a thousand times shorter: the doubles have no limits.
os.environ.setdefault("VASTAI_PACE_SCALE", "0.001")

from i2v.settings import *  # noqa: E402,F401,F403
from i2v.settings import DATA_DIR, DATABASES, Q_CLUSTER  # noqa: E402

if "sqlite" in DATABASES["default"]["ENGINE"]:
    # A file, not :memory:, so a worker process started by a test sees the same database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}

# Request rates high enough for the load and fuzz tests; tests/reliability/test_rate_limits.py sets its own.
I2V_RATE_GENERATE = "100000/m"
I2V_RATE_PROBE = "100000/m"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}  # noqa: F405

# A worker process started by a test points at the test database pytest-django created.
if os.environ.get("I2V_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["I2V_TEST_DB_NAME"]
