"""i2v settings: one file, every value from the environment with a safe embedded default."""

import os
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from csp.constants import NONE, SELF

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name, default=""):
    return os.environ.get(name, default)


def env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_float(name, default):
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_list(name, default):
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


DATA_DIR = Path(env("I2V_DATA_DIR", str(BASE_DIR / "var"))).resolve()
# The database, the secret key and the media live here: the owner's alone. Every process that
# loads these settings (web, worker, manage.py) creates files 0600 and folders 0700, SQLite's
# included; files left from before are closed at start.
os.umask(0o077)
DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
DATA_DIR.chmod(0o700)
for _path in DATA_DIR.iterdir():
    if _path.is_file() and _path.stat().st_mode & 0o077:
        _path.chmod(0o600)


def _secret_key():
    if env("DJANGO_SECRET_KEY"):
        return env("DJANGO_SECRET_KEY")
    path = DATA_DIR / "secret_key"
    if not path.exists():
        # Written once, readable only by the owner; survives restarts so sessions stay valid.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Former secret keys, comma separated: sessions signed with them stay valid, and secrets encrypted
# at rest under keys derived from them (i2v.core.crypto) can still be read after a key change.
SECRET_KEY_FALLBACKS = env_list("DJANGO_SECRET_KEY_FALLBACKS", "")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "django_q",
    "axes",
    "csp",
    # Serves /api/docs from ninja's own Swagger UI copy (without it ninja loads it from a CDN).
    "ninja",
    "i2v",
    "gpu",
    "generation",
]

MIDDLEWARE = [
    # Under ASGI (`make run`) the handler runs these as i2v/middleware.py's subclasses, whose
    # hooks run on the event loop (no thread hop per hook and request). Static files are answered
    # before Django, by servestatic (i2v/static.py).
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: it turns a lockout raised during authentication into its answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "i2v.urls"
WSGI_APPLICATION = "i2v.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
if env("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(env("DATABASE_URL"), conn_max_age=60, conn_health_checks=True)}
    if env_bool("I2V_DB_POOL") and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # The web server (runall sets this for it): under ASGI every request in flight has a thread of
        # its own, so a burst of requests would open a connection each, past PostgreSQL's
        # max_connections (100 at once answered 500s). A pool per web process caps them; a request
        # beyond it waits for a connection. Not in the worker: django-q2 forks its processes, and a
        # pool does not survive a fork (its threads stay behind).
        DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps the connections instead
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1, "max_size": env_int("I2V_DB_POOL_SIZE", 10), "timeout": 30.0}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("I2V_DB_PREPARED", True):
        # The prebuilt statements on every job's way to its GPU are prepared once per connection
        # (i2v.core.sql.execute asks for it). Django's own queries never are: its cursors bind on
        # the client. psycopg prepares a statement it is not asked to only after this many runs,
        # so in effect never. I2V_DB_PREPARED=0 behind a pooler that loses prepared statements.
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = 2**31 - 1
else:
    DATABASES = {
        "default": {
            "ENGINE": "i2v.sqlite",  # Django's, its writers queued on a lock file (i2v/sqlite/base.py)
            "NAME": DATA_DIR / "db.sqlite3",
            # Kept between a worker's tasks (django-q2 closes expired ones before each task).
            "CONN_MAX_AGE": 60,
            "OPTIONS": {
                # The web process and the worker write at the same time.
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Task queue (django-q2) ---------------------------------------------------
REDIS_URL = env("REDIS_URL")
Q_CLUSTER = {
    "name": env("I2V_Q_NAME", "i2v"),
    "workers": env_int("I2V_WORKERS", 2),
    # A task never runs longer than `timeout`; long GPU runs are followed in slices
    # that re-enqueue themselves, so `retry` (redelivery after a crash) stays short.
    "timeout": env_int("I2V_TASK_TIMEOUT", 240),
    "retry": env_int("I2V_TASK_RETRY", 300),
    "max_attempts": 5,
    "ack_failures": True,
    # No record of successful tasks (failed ones are always kept, in the admin's "Failed tasks"):
    # a job's own row says what happened to it. With a limit, django-q2's monitor reads every kept
    # success row FOR UPDATE after each task to prune one: 24 ms per task at 500 rows, on the CPU
    # the next job's dispatch needs (django-q2 PR #255 only skips that when the limit is off).
    "save_limit": -1,
    "catch_up": False,
    "poll": 0.5,
    "label": "Tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
    # The ORM broker, woken when a task is enqueued (LISTEN/NOTIFY, or a local socket on SQLite).
    Q_CLUSTER["broker_class"] = "i2v.broker.WakingORM"

# --- Storage: local files, or R2 through django-storages' S3 backend ------------
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_ROOT.mkdir(mode=0o700, exist_ok=True)
MEDIA_ROOT.chmod(0o700)
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

R2_BUCKET = env("R2_BUCKET")
R2_ENDPOINT_URL = env("R2_ENDPOINT_URL") or (
    f"https://{env('R2_ACCOUNT_ID')}.r2.cloudflarestorage.com" if env("R2_ACCOUNT_ID") else ""
)
R2_PUBLIC_URL = env("R2_PUBLIC_URL").rstrip("/")
R2_ACCESS_KEY_ID = env("R2_ACCESS_KEY_ID")
R2_SECRET_ACCESS_KEY = env("R2_SECRET_ACCESS_KEY")
# botocore Config for every R2 client (django-storages and gpu.r2): providers.md section 4.
R2_CLIENT_CONFIG = {
    "signature_version": "s3v4",
    "s3": {"addressing_style": "path"},
    # R2 rejects boto3's default aws-chunked CRC trailers; restore the plain wire format.
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "retries": {"max_attempts": 5, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedStaticFilesStorage"},
}
if R2_BUCKET:
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    _r2_options = {
        "bucket_name": R2_BUCKET,
        "endpoint_url": R2_ENDPOINT_URL,
        "region_name": "auto",
        "access_key": R2_ACCESS_KEY_ID,
        "secret_key": R2_SECRET_ACCESS_KEY,
        "client_config": Config(**R2_CLIENT_CONFIG),
        # 8 MiB parts, at most 4 in flight: bounded memory when streaming a video in.
        "transfer_config": TransferConfig(
            multipart_threshold=8 * 1024 * 1024,
            multipart_chunksize=8 * 1024 * 1024,
            max_concurrency=4,
            max_io_queue=4,
        ),
        "file_overwrite": False,
        "default_acl": None,  # R2 has no ACLs
        "querystring_auth": True,
        "querystring_expire": env_int("R2_URL_EXPIRE", 3600),
    }
    if R2_PUBLIC_URL:
        _public = urlsplit(R2_PUBLIC_URL if "://" in R2_PUBLIC_URL else f"https://{R2_PUBLIC_URL}")
        _r2_options["custom_domain"] = _public.netloc + _public.path
        _r2_options["url_protocol"] = f"{_public.scheme}:"
        _r2_options["querystring_auth"] = False
    STORAGES["default"] = {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": _r2_options}

# Largest upload Django keeps in memory before spooling to disk.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
# Media files (inputs, videos) and their folders are the owner's alone.
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700
DATA_UPLOAD_MAX_MEMORY_SIZE = 25 * 1024 * 1024

# --- Providers -------------------------------------------------------------------
VASTAI_API_KEY = env("VASTAI_API_KEY")
VASTAI_API_URL = env("VASTAI_API_URL", "https://console.vast.ai/api/v0").rstrip("/")
VASTAI_RETRY_BACKOFF = env_float("VASTAI_RETRY_BACKOFF", 0.5)
# vast.ai's per-endpoint minimum intervals between calls are multiplied by this (0: not spaced).
VASTAI_PACE_SCALE = env_float("VASTAI_PACE_SCALE", 1.0)
FAL_KEY = env("FAL_KEY")
FAL_QUEUE_URL = env("FAL_QUEUE_URL", "https://queue.fal.run").rstrip("/")
FAL_ENDPOINT = env("FAL_ENDPOINT", "fal-ai/wan/v2.2-a14b/image-to-video")
I2V_FAL_POLL_SECONDS = env_float("I2V_FAL_POLL_SECONDS", 2.0)
# Per-user defaults of the scheduler's limits (admin → User quotas overrides them per user).
I2V_MAX_WAITING = env_int("I2V_MAX_WAITING", 20)  # jobs waiting at once; more → 429
I2V_MAX_RUNNING = env_int("I2V_MAX_RUNNING", 4)  # jobs bound to a GPU (or fal.ai) at once
I2V_FAL_DAILY_USD = env_float("I2V_FAL_DAILY_USD", 10.0)  # fal.ai spend per user per day (UTC)
# fal.ai may keep a request queued this long before dropping it (sent as its start timeout), and a
# run may take this long: the input image URL handed to fal is valid for both together.
I2V_FAL_START_TIMEOUT = env_int("I2V_FAL_START_TIMEOUT", 3 * 3600)
I2V_FAL_RUN_SECONDS = env_int("I2V_FAL_RUN_SECONDS", 3600)
# Where fal.ai can reach this server for webhooks (e.g. https://i2v.example.com); unset → polling.
I2V_PUBLIC_URL = env("I2V_PUBLIC_URL").rstrip("/")
COMFYUI_URL = env("COMFYUI_URL")
SWARMUI_URL = env("SWARMUI_URL")
I2V_BLOCK_PRIVATE_NETWORKS = env_bool("I2V_BLOCK_PRIVATE_NETWORKS", False)
I2V_JOB_TIMEOUT = env_int("I2V_JOB_TIMEOUT", 3600)
I2V_FOLLOW_SLICE = env_int("I2V_FOLLOW_SLICE", 60)
# Seconds `GET /api/jobs/{id}` answers from the shared cache (generation/jobcache.py); every job
# write drops the entry at once. On by default with Redis only (each process has its own memory
# otherwise).
I2V_JOB_CACHE_SECONDS = env_float("I2V_JOB_CACHE_SECONDS", 2.0 if REDIS_URL else 0.0)
# Files under videos/ and inputs/ that no job references are deleted once this old (seconds).
I2V_SWEEP_AFTER = env_int("I2V_SWEEP_AFTER", 6 * 3600)
# Seconds ComfyUI may stay unreachable (or stop answering) during a job before the job fails.
I2V_COMFYUI_GRACE = env_int("I2V_COMFYUI_GRACE", 120)

# --- Auth, sessions, security ---------------------------------------------------------
# How long a web process remembers an accepted API token without asking the database. A token
# revoked (or a user deactivated) in another process stops working within this many seconds;
# in the same process at once. 0 = ask the database on every request.
I2V_TOKEN_CACHE_SECONDS = env_float("I2V_TOKEN_CACHE_SECONDS", 5.0)
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
I2V_BEHIND_PROXY = env_bool("DJANGO_BEHIND_PROXY", False)
if I2V_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Login throttling (django-axes), counted in the database so every process sees the same count:
# a username is locked for one client address after I2V_LOGIN_FAILURE_LIMIT wrong passwords (the
# admin's login, /accounts/login/ and wrong API tokens alike); other users and addresses log in.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("I2V_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("I2V_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "i2v.core.auth.client_address"
AXES_LOCKOUT_CALLABLE = "i2v.views.locked_out"
AXES_VERBOSE = False

# Per-user request rates on the API routes that spend money or reach out ("N/s|m|h|d").
I2V_RATE_GENERATE = env("I2V_RATE_GENERATE", "30/m")
I2V_RATE_PROBE = env("I2V_RATE_PROBE", "20/m")

# Content-Security-Policy (django-csp) on every answer: scripts and styles from this server only,
# no inline script. Videos and images may come from the R2 endpoint or its public domain.
_media_origins = [f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in (R2_PUBLIC_URL, R2_ENDPOINT_URL) if u and "://" in u]
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:", "blob:", *_media_origins],
        "media-src": [SELF, "blob:", *_media_origins],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # Request-rate counters must be shared by every web process: files on one machine, else Redis.
    "throttle": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": DATA_DIR / "throttle"},
}
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "i2v.cache.RedisCache", "LOCATION": REDIS_URL}}
    CACHES["throttle"] = CACHES["default"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("I2V_LOG_LEVEL", "INFO")},
    "loggers": {
        # httpx logs full URLs at INFO; a URL may carry a ?token=.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "websockets": {"level": "WARNING"},
        # Every failed login at INFO; lockouts stay at WARNING.
        "axes": {"level": "WARNING"},
    },
}
