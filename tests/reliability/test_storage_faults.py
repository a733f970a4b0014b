"""The S3 server (Cloudflare R2) failing while a finished video is uploaded.

A job runs for real, in-process (as tests/generation/test_runner.py runs it), against the
ComfyUI double; its video goes to a real S3 server (moto's server mode, the `s3_server`
fixture) through django-storages configured exactly as production configures it (i2v/settings.py
read with R2_* set: the botocore retry policy and the multipart transfer config). Between the
two sits a fault-injecting HTTP proxy on 127.0.0.1 (tests/doubles/faulty_proxy.py) that resets
the connection in the middle of a PUT / UploadPart body, or answers 500/503 without forwarding.

What is checked never goes through the proxy: the bucket is listed with boto3 directly against
moto, so "no object", "exactly the output bytes" and "no incomplete multipart upload" are what
R2 would really hold.

The fal.ai backend stores its output the same way (generation/fal_runner.py): the last test runs
one fal job into a failing R2.

Outputs: 3 MiB (below the 8 MiB multipart threshold: one PutObject) and 20 MiB (multipart:
parts of 8 + 8 + 4 MiB)."""

import hashlib
import runpy
from datetime import timedelta
from pathlib import Path

import boto3
import httpx
import pytest
from django.conf import settings as conf
from django.utils import timezone

from generation import runner, tasks
from generation.models import VideoJob
from tests.doubles.fal import FalDouble
from tests.doubles.faulty_proxy import ERROR_CODES, FaultyHttpProxy
from tests.generation.test_runner import make_job
from tests.helpers import configured_comfyui

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status
BUCKET = "videos"
MiB = 1024 * 1024
SMALL = 3 * MiB + 12345  # one PutObject
LARGE = 20 * MiB + 777  # multipart: 8 + 8 + 4 MiB parts
# botocore's `max_attempts` counts retries: one request plus that many retries per upload.
ATTEMPTS = 1 + conf.R2_CLIENT_CONFIG["retries"]["max_attempts"]
ENV_SWITCHES = ("DATABASE_URL", "REDIS_URL", "R2_BUCKET", "R2_ENDPOINT_URL", "R2_ACCOUNT_ID", "R2_PUBLIC_URL")


@pytest.fixture
def proxy(s3_server):
    with FaultyHttpProxy(s3_server) as p:
        yield p


@pytest.fixture
def bucket(s3_server):
    """boto3 straight to moto (never through the proxy): what R2 really holds."""
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="k",
                        aws_secret_access_key="s")


@pytest.fixture
def r2(proxy, settings, monkeypatch, tmp_path):
    """The default storage is R2 as production configures it, with its endpoint at the proxy."""
    for key in ENV_SWITCHES:
        monkeypatch.delenv(key, raising=False)
    env = {"I2V_DATA_DIR": str(tmp_path / "r2-settings"), "R2_BUCKET": BUCKET, "R2_ENDPOINT_URL": proxy.url,
           "R2_ACCESS_KEY_ID": "k", "R2_SECRET_ACCESS_KEY": "s"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    production = runpy.run_path(str(ROOT / "i2v" / "settings.py"))
    default = production["STORAGES"]["default"]
    assert default["BACKEND"] == "storages.backends.s3.S3Storage"
    assert default["OPTIONS"]["transfer_config"].multipart_threshold == 8 * MiB
    settings.STORAGES = {**settings.STORAGES, "default": default}
    for key in ("R2_BUCKET", "R2_ENDPOINT_URL", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "R2_PUBLIC_URL"):
        setattr(settings, key, production[key])
    return proxy


@pytest.fixture
def comfy(r2, settings, monkeypatch):
    monkeypatch.setattr(tasks, "enqueue", lambda func, *args: None)
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
    settings.I2V_FOLLOW_SLICE = 10
    with configured_comfyui() as double:
        yield double


def run_slice(job):
    """One task slice of the job, as the worker runs it; the job re-read afterwards."""
    tasks.run_job(str(job.id))
    job.refresh_from_db()
    return job


def run_until_uploaded_or_terminal(job, limit=10):
    for _ in range(limit):
        job = run_slice(job)
        if job.is_terminal:
            return job
    return job


def key_of(job):
    return f"videos/{job.id}.mp4"


def object_path(job):
    """The request path of the job's object, path-style (R2_CLIENT_CONFIG addressing_style)."""
    return f"/{BUCKET}/{key_of(job)}"


def stored_keys(bucket, job):
    listing = bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"videos/{job.id}")
    return [o["Key"] for o in listing.get("Contents", [])]


def incomplete_uploads(bucket):
    return bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def stored_digest(bucket, key):
    body = bucket.get_object(Bucket=BUCKET, Key=key)["Body"]
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: body.read(MiB), b""):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def assert_stored_exactly_the_output(job, comfy, bucket):
    assert job.status == S.COMPLETED, job.error
    out = job.provider_urls["output"]
    expected = comfy.output_sha256(out["filename"], out["subfolder"])
    assert job.video.name == key_of(job)
    assert stored_keys(bucket, job) == [key_of(job)]  # no second copy under another name
    assert stored_digest(bucket, key_of(job)) == (comfy.output_size, expected)
    assert job.video_size == comfy.output_size
    assert incomplete_uploads(bucket) == []


# ---------------------------------------------------------------------------- transient


@pytest.mark.parametrize("fault", ["cut", 500])
def test_single_put_fails_once_mid_upload_then_is_retried_and_the_job_completes(comfy, r2, bucket, user, api, fault):
    comfy.output_size = SMALL
    job = make_job(user)
    if fault == "cut":
        r2.cut("PUT", f"/{BUCKET}/videos/*", after=MiB, times=1)
    else:
        r2.fail("PUT", f"/{BUCKET}/videos/*", status=fault, times=1)
    job = run_until_uploaded_or_terminal(job)
    assert_stored_exactly_the_output(job, comfy, bucket)
    puts = r2.seen("PUT", object_path(job))
    assert [p.fault for p in puts] == [fault, None]  # failed once, retried once, whole
    # The user gets the whole video from the URL the API hands out (a redirect to a presigned URL).
    url = api.get(f"/api/jobs/{job.id}").json()["video_url"]
    redirect = api.get(url)
    assert redirect.status_code == 302
    got = httpx.get(redirect["Location"])
    assert got.status_code == 200 and len(got.content) == SMALL
    assert hashlib.sha256(got.content).hexdigest() == stored_digest(bucket, key_of(job))[1]


@pytest.mark.parametrize("fault", ["cut", 503])
def test_multipart_part_fails_once_mid_upload_then_is_retried_and_the_job_completes(comfy, r2, bucket, user, fault):
    comfy.output_size = LARGE
    job = make_job(user)
    part2 = {"partNumber": "2", "uploadId": None}
    if fault == "cut":
        r2.cut("PUT", f"/{BUCKET}/videos/*", after=3 * MiB, times=1, query=part2)
    else:
        r2.fail("PUT", f"/{BUCKET}/videos/*", status=fault, times=1, query=part2)
    job = run_until_uploaded_or_terminal(job)
    assert_stored_exactly_the_output(job, comfy, bucket)
    parts = r2.seen("PUT", object_path(job), query={"uploadId": None})
    assert sorted(int(p.query["partNumber"]) for p in parts) == [1, 2, 2, 3]
    assert [p.fault for p in parts if p.query["partNumber"] == "2"] == [fault, None]
    assert len(r2.seen("POST", object_path(job), query={"uploads": None})) == 1  # one multipart upload


# ---------------------------------------------------------------------------- persistent

PERSISTENT = pytest.mark.parametrize(
    "size, fault", [(SMALL, "cut"), (SMALL, 500), (LARGE, "cut"), (LARGE, 503)],
    ids=["put-cut", "put-500", "multipart-cut", "multipart-503"],
)


def break_uploads(r2, size, fault):
    """Every PutObject of a video (multipart: every UploadPart of part 2) fails from now on."""
    query = {"partNumber": "2", "uploadId": None} if size == LARGE else None
    if fault == "cut":
        r2.cut("PUT", f"/{BUCKET}/videos/*", after=MiB, times=None, query=query)
    else:
        r2.fail("PUT", f"/{BUCKET}/videos/*", status=fault, times=None, query=query)
    return query


def run_until_an_upload_failed(job, r2, query):
    """Slices until the job reached `uploading` and one upload (botocore's retries included) failed."""
    for _ in range(5):
        job = run_slice(job)
        if job.is_terminal or (job.status == S.UPLOADING and failed_puts(r2, job, query)):
            return job
    raise AssertionError(f"no upload was tried: job {job.status}")


def failed_puts(r2, job, query):
    return [p for p in r2.seen("PUT", object_path(job), query=query) if p.fault is not None]


def assert_nothing_stored(job, bucket):
    assert not job.video
    assert stored_keys(bucket, job) == []
    assert incomplete_uploads(bucket) == []


@PERSISTENT
def test_storage_that_keeps_failing_keeps_the_job_uploading_then_fails_it_clearly(
        comfy, r2, bucket, user, api, size, fault):
    comfy.output_size = size
    job = make_job(user)
    query = break_uploads(r2, size, fault)
    job = run_until_an_upload_failed(job, r2, query)
    # One slice's upload failed after botocore's retries: the job is still uploading (the video
    # is still on ComfyUI, R2 may come back), and nothing is half-stored.
    assert job.status == S.UPLOADING and not job.error
    assert len(failed_puts(r2, job, query)) == ATTEMPTS
    assert_nothing_stored(job, bucket)
    if size == LARGE:  # the failed multipart upload was aborted, not left behind
        assert len(r2.seen("DELETE", object_path(job), query={"uploadId": None})) == 1
    # R2 is still failing when the grace period is over: the job fails, saying why.
    VideoJob.objects.filter(pk=job.pk).update(
        status_changed_at=timezone.now() - timedelta(seconds=runner.STORAGE_GRACE + 1))
    job = run_slice(job)
    assert job.status == S.FAILED
    assert "Could not upload the video to the storage" in job.error and "R2" in job.error
    assert ("Connection was closed" if fault == "cut" else ERROR_CODES[fault][0]) in job.error
    assert len(failed_puts(r2, job, query)) == 2 * ATTEMPTS  # the last slice tried once more
    assert_nothing_stored(job, bucket)
    assert job.video_size is None
    body = api.get(f"/api/jobs/{job.id}").json()
    assert body["status"] == "failed" and body["video_url"] is None
    assert "Could not upload the video to the storage" in body["error"]
    assert body["error_class"] == "storage_refused" and "the storage refused it" in body["advice"]


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["put", "multipart"])
def test_storage_down_for_a_whole_slice_then_back_completes_the_job(comfy, r2, bucket, user, size):
    comfy.output_size = size
    job = make_job(user)
    query = break_uploads(r2, size, "cut")
    job = run_until_an_upload_failed(job, r2, query)
    assert job.status == S.UPLOADING
    assert_nothing_stored(job, bucket)
    r2.clear()  # R2 is back
    job = run_until_uploaded_or_terminal(job)
    # The retry stored the whole video under the job's own key (no leftover pushed it to another name).
    assert_stored_exactly_the_output(job, comfy, bucket)


def test_fal_job_into_a_failing_storage_fails_clearly_and_leaves_nothing(r2, bucket, user, settings, monkeypatch):
    monkeypatch.setattr(tasks, "enqueue", lambda func, *args: None)
    monkeypatch.setattr("django_q.tasks.async_task", lambda *a, **kw: None)
    settings.I2V_FOLLOW_SLICE = 10
    settings.I2V_FAL_POLL_SECONDS = 0
    with FalDouble(output_size=SMALL) as fal:
        settings.FAL_KEY, settings.FAL_QUEUE_URL = fal.key, fal.url
        job = make_job(user, workflow="wan22-i2v", backend="fal")
        query = break_uploads(r2, SMALL, 500)
        job = run_until_an_upload_failed(job, r2, query)
        assert job.status == S.UPLOADING and not job.error
        assert len(failed_puts(r2, job, query)) == ATTEMPTS
        assert_nothing_stored(job, bucket)
        VideoJob.objects.filter(pk=job.pk).update(
            status_changed_at=timezone.now() - timedelta(seconds=runner.STORAGE_GRACE + 1))
        job = run_slice(job)
    assert job.status == S.FAILED
    assert "Could not upload the video to the storage" in job.error and "InternalError" in job.error
    assert_nothing_stored(job, bucket)
