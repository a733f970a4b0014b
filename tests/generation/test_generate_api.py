import io

import pytest
from django.core.files.storage import default_storage
from PIL import Image

from generation.models import VideoJob
from tests.helpers import StaticServer, png_bytes


@pytest.fixture
def enqueued(monkeypatch):
    calls = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda func, *args, **kw: calls.append((func, args)))
    return calls


def post_image(api, data=None, image=None, headers=None, filename="in.png"):
    fields = {"prompt": "a dragon turns its head", "workflow": "smoke", **(data or {})}
    if image is not None:
        fields["image"] = io.BytesIO(image)
        fields["image"].name = filename
    return api.post("/api/generate-video", data=fields, headers=headers, json=False)


def test_generate_multipart_creates_queued_job_and_one_task(api, user, enqueued, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        resp = post_image(api, {"width": "64", "height": "64", "frames": "17", "fps": "8", "seed": "7"}, png_bytes())
    assert resp.status_code == 202, resp.content
    body = resp.json()
    assert body["status"] == "queued" and body["backend"] == "comfyui" and body["workflow"] == "smoke"
    assert (body["width"], body["height"], body["frames"], body["fps"], body["seed"]) == (64, 64, 17, 8, 7)
    job = VideoJob.objects.get(pk=body["id"])
    assert job.owner == user
    assert default_storage.open(job.input_image.name).read() == png_bytes()
    # The request's own scheduling pass found no GPU configured: the job failed at once, saying so.
    job.refresh_from_db()
    assert job.status == "failed" and "No GPU is configured" in job.error and enqueued == []


def test_generate_places_the_job_on_a_free_gpu_at_once(api, user, enqueued, django_capture_on_commit_callbacks):
    from gpu.models import GpuConfig

    GpuConfig.objects.filter(pk=GpuConfig.get().pk).update(comfyui_url="http://127.0.0.1:9", gpu_provider="local")
    with django_capture_on_commit_callbacks(execute=True):
        resp = post_image(api, {}, png_bytes())
    job = VideoJob.objects.get(pk=resp.json()["id"])
    # Placed by the request's own pass, and handed straight to a worker: no scheduling task between.
    assert job.place == "config" and job.status == "queued"
    assert enqueued == [("generation.tasks.run_job", (str(job.id),))]


@pytest.mark.django_db(transaction=True)  # the pass runs when the job's row commits, before the answer
def test_generate_answer_says_where_the_job_was_placed(api, user, enqueued):
    from gpu.models import GpuConfig

    GpuConfig.objects.filter(pk=GpuConfig.get().pk).update(comfyui_url="http://127.0.0.1:9", gpu_provider="local")
    body = post_image(api, {}, png_bytes()).json()
    # Placed on the configured GPU by the request's own pass: it waits in no queue of i2v's.
    assert body["place"] == "config" and body["queue_position"] is None and body["expected_start_at"] is None
    assert body["status"] == "queued" and VideoJob.objects.get(pk=body["id"]).place == "config"


def test_generate_uses_workflow_defaults(api, enqueued):
    resp = post_image(api, {"workflow": "wan22-i2v"}, png_bytes())
    assert resp.status_code == 202
    body = resp.json()
    assert (body["width"], body["height"], body["frames"], body["fps"]) == (832, 480, 81, 16)


def test_seed_endpoint_vastai_generate_video_works_too(api, enqueued):
    resp = api.post("/api/vastai/generate-video", data={"prompt": "x", "workflow": "smoke",
                    "image": io.BytesIO(png_bytes())}, json=False)
    assert resp.status_code == 202
    assert resp.json()["backend"] == "comfyui"


def test_generate_json_with_image_url(api, enqueued):
    with StaticServer({"/cat.jpg": (200, {"Content-Type": "image/jpeg"}, png_bytes(fmt="JPEG"))}) as srv:
        resp = api.post("/api/generate-video", {"prompt": "cat", "workflow": "smoke", "image_url": f"{srv.url}/cat.jpg"})
    assert resp.status_code == 202, resp.content
    job = VideoJob.objects.get(pk=resp.json()["id"])
    assert job.input_image.name.endswith(".jpg")
    assert job.image_url.endswith("/cat.jpg")


@pytest.mark.parametrize("url, words", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("file:///etc/passwd", "http"),
    ("gopher://127.0.0.1/x", "http"),
])
def test_generate_refuses_unsafe_image_urls(api, enqueued, url, words):
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": url})
    assert resp.status_code == 422
    assert "image_url" in resp.json()["detail"] and words in resp.json()["detail"]
    assert VideoJob.objects.count() == 0 and enqueued == []


def test_generate_refuses_redirect_to_metadata(api, enqueued):
    with StaticServer({"/r": (302, {"Location": "http://169.254.169.254/latest/"}, b"")}) as srv:
        resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": f"{srv.url}/r"})
    assert resp.status_code == 422
    assert "link-local" in resp.json()["detail"]
    assert VideoJob.objects.count() == 0


@pytest.mark.parametrize("field, value, words", [
    ("width", "100", "multiple of 16"),
    ("width", "1296", "less than or equal to 1280"),
    ("height", "0", "greater than or equal to 16"),
    ("frames", "80", "4n+1"),
    ("frames", "165", "less than or equal to 161"),
    ("frames", "13", "greater than or equal to 17"),
    ("fps", "0", "greater than or equal to 1"),
    ("fps", "61", "less than or equal to 60"),
    ("seed", "-1", "greater than or equal to 0"),
    ("seed", str(2**63), "less than or equal to"),
    ("prompt", "", "at least 1 character"),
    ("prompt", "x" * 2001, "at most 2000 characters"),
    ("prompt", "a\x00b", "NUL"),
    ("width", "abc", "valid integer"),
    ("backend", "gpu", "comfyui"),
    ("colour", "red", "unknown field"),
    ("workflow", "nope", "unknown workflow"),
])
def test_generate_bad_field_is_422_naming_it(api, enqueued, field, value, words):
    resp = post_image(api, {field: value}, png_bytes())
    assert resp.status_code == 422, resp.content
    detail = resp.json()["detail"]
    assert detail.startswith(field) and words in detail, detail
    assert VideoJob.objects.count() == 0 and enqueued == []


def _bomb():
    # A PNG whose header claims 30000×30000: refused before any pixel is decoded.
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def _gif():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize("image, words", [
    (b"", "empty"),
    (b"this is not an image at all", "not a readable"),
    (png_bytes()[:60], "not a readable"),
    (_bomb(), "limit is 4096"),
    (png_bytes(4100, 8), "limit is 4096"),
    (_gif(), "not supported"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "not a readable"),
])
def test_generate_bad_image_is_422(api, enqueued, image, words):
    resp = post_image(api, {}, image)
    assert resp.status_code == 422, resp.content
    assert resp.json()["detail"].startswith("image") and words in resp.json()["detail"]
    assert "Error" not in resp.json()["detail"]  # no exception class names: a sentence a person can act on
    assert VideoJob.objects.count() == 0


def test_generate_without_image_is_422(api, enqueued):
    resp = api.post("/api/generate-video", {"prompt": "x"})
    assert resp.status_code == 422 and "image" in resp.json()["detail"]


def test_generate_garbage_json_is_400(api):
    resp = api.client.post("/api/generate-video", data="{nope", content_type="application/json",
                           headers={"Authorization": f"Bearer {api.key}"})
    assert resp.status_code == 400 and "JSON" in resp.json()["detail"]


def test_generate_requires_auth(db, anon_api, enqueued):
    resp = post_image(anon_api, {}, png_bytes())
    assert resp.status_code == 401
    assert VideoJob.objects.count() == 0


def test_idempotency_key_returns_the_same_job(api, enqueued, django_capture_on_commit_callbacks):
    from gpu.models import GpuConfig

    GpuConfig.objects.filter(pk=GpuConfig.get().pk).update(comfyui_url="http://127.0.0.1:9", gpu_provider="local")
    with django_capture_on_commit_callbacks(execute=True):
        first = post_image(api, {}, png_bytes(), headers={"Idempotency-Key": "abc-1"})
        second = post_image(api, {}, png_bytes(), headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    # One job, handed to a worker once.
    assert VideoJob.objects.count() == 1 and enqueued == [("generation.tasks.run_job", (first.json()["id"],))]


def test_idempotency_key_with_a_different_request_is_409_naming_the_key(api, enqueued):
    first = post_image(api, {"prompt": "a cat"}, png_bytes(), headers={"Idempotency-Key": "my-clip-1"})
    assert first.status_code == 202
    other_prompt = post_image(api, {"prompt": "a dog"}, png_bytes(), headers={"Idempotency-Key": "my-clip-1"})
    assert other_prompt.status_code == 409
    assert "'my-clip-1'" in other_prompt.json()["detail"] and first.json()["id"] in other_prompt.json()["detail"]
    other_image = post_image(api, {"prompt": "a cat"}, png_bytes(color=(1, 2, 3)), headers={"Idempotency-Key": "my-clip-1"})
    assert other_image.status_code == 409
    same = post_image(api, {"prompt": "a cat"}, png_bytes(), headers={"Idempotency-Key": "my-clip-1"})
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    assert VideoJob.objects.count() == 1


def test_idempotency_key_of_a_failed_job_starts_a_new_job(api, enqueued):
    first = post_image(api, {"prompt": "a cat"}, png_bytes(), headers={"Idempotency-Key": "my-clip-1"}).json()
    VideoJob.objects.filter(pk=first["id"]).update(status="failed", error="No GPU is configured")
    again = post_image(api, {"prompt": "a cat"}, png_bytes(), headers={"Idempotency-Key": "my-clip-1"})
    assert again.status_code == 202 and again.json()["id"] != first["id"] and again.json()["status"] == "queued"
    # The failed job keeps its record; the key now stands for the new job.
    assert VideoJob.objects.get(pk=first["id"]).status == "failed"
    replay = post_image(api, {"prompt": "a cat"}, png_bytes(), headers={"Idempotency-Key": "my-clip-1"})
    assert replay.status_code == 200 and replay.json()["id"] == again.json()["id"]


def test_idempotency_key_expires_after_24_hours(api, enqueued):
    from datetime import timedelta

    from django.utils import timezone

    first = post_image(api, {"prompt": "a cat"}, png_bytes(), headers={"Idempotency-Key": "daily"}).json()
    VideoJob.objects.filter(pk=first["id"]).update(created_at=timezone.now() - timedelta(hours=23))
    assert post_image(api, {"prompt": "a dog"}, png_bytes(), headers={"Idempotency-Key": "daily"}).status_code == 409
    VideoJob.objects.filter(pk=first["id"]).update(created_at=timezone.now() - timedelta(hours=25))
    later = post_image(api, {"prompt": "a dog"}, png_bytes(), headers={"Idempotency-Key": "daily"})
    assert later.status_code == 202 and later.json()["id"] != first["id"]


def test_idempotency_key_is_per_user(api, client, other_token, enqueued):
    from tests.conftest import Api

    a = post_image(api, {}, png_bytes(), headers={"Idempotency-Key": "same"})
    b = post_image(Api(client, other_token), {}, png_bytes(), headers={"Idempotency-Key": "same"})
    assert a.json()["id"] != b.json()["id"]
    assert VideoJob.objects.count() == 2


def test_jobs_list_is_own_newest_first_paginated_and_filtered(api, client, other_token, enqueued):
    from tests.conftest import Api

    ids = [post_image(api, {"prompt": f"p{i}"}, png_bytes()).json()["id"] for i in range(3)]
    post_image(Api(client, other_token), {}, png_bytes())
    VideoJob.objects.filter(pk=ids[0]).update(status="failed")
    page = api.get("/api/jobs?limit=2").json()
    assert page["count"] == 3 and [j["id"] for j in page["items"]] == [ids[2], ids[1]]
    rest = api.get("/api/jobs?limit=2&offset=2").json()
    assert [j["id"] for j in rest["items"]] == [ids[0]]
    failed = api.get("/api/jobs?status=failed").json()
    assert [j["id"] for j in failed["items"]] == [ids[0]]
    assert api.get("/api/jobs?status=bogus").status_code == 422
    assert api.get("/api/jobs?limit=1000").status_code == 422


def test_other_users_job_is_404(api, client, other_token, enqueued):
    from tests.conftest import Api

    job_id = post_image(api, {}, png_bytes()).json()["id"]
    other = Api(client, other_token)
    assert other.get(f"/api/jobs/{job_id}").status_code == 404
    assert other.post(f"/api/jobs/{job_id}/cancel").status_code == 404
    assert other.get(f"/jobs/{job_id}/video").status_code == 404
    assert api.get(f"/api/jobs/{job_id}").json()["id"] == job_id
    assert api.get("/api/jobs/not-a-uuid").status_code in (404, 422)


def test_cancel_queued_job(api, enqueued):
    job_id = post_image(api, {}, png_bytes()).json()["id"]
    resp = api.post(f"/api/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert VideoJob.objects.get(pk=job_id).status == "cancelled"
    again = api.post(f"/api/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_one_job_reads_every_field_as_stored(api, staff_api, user, settings, enqueued):
    """`GET /api/jobs/{id}` (what scripts poll) reads the row with its own prebuilt SELECT; it
    answers exactly what the job looks like through the ORM, for the owner and for staff, with
    datetimes, decimals, ids and the video URL converted as the ORM would (SQLite stores them
    as text)."""
    from decimal import Decimal

    from django.utils import timezone

    from generation import domain
    from gpu.models import VastInstance

    job_id = post_image(api, {"prompt": "a ‮ rtl prompt", "negative_prompt": "blur"}, png_bytes()).json()["id"]
    instance = VastInstance.objects.create(vast_id=4242)
    now = timezone.now()
    VideoJob.objects.filter(pk=job_id).update(
        status="completed", progress=1.0, step=4, steps_total=4, current_node="9", queue_position=None,
        prompt_id="p-1", error="", note="resubmitted once", cost_usd=Decimal("0.0123"),
        started_at=now, finished_at=now, video="videos/x.mp4", video_size=1234, instance=instance)
    job = VideoJob.objects.get(pk=job_id)
    assert domain.job_json(domain.read_job(user, job_id)) == domain.job_json(job)
    answer = api.get(f"/api/jobs/{job_id}").json()
    assert answer == staff_api.get(f"/api/jobs/{job_id}").json()
    assert answer["instance_id"] == str(instance.pk) and answer["cost_usd"] == 0.0123
    assert answer["video_url"] == f"http://testserver/api/jobs/{job_id}/video" and answer["video_size"] == 1234
    assert answer["prompt"] == "a ‮ rtl prompt" and answer["note"] == "resubmitted once"
    listed = api.get("/api/jobs?limit=1").json()["items"][0]
    assert answer == listed
    for key in ("started_at", "finished_at", "created_at"):
        assert answer[key].startswith(getattr(job, key).strftime("%Y-%m-%dT%H:%M:%S"))


@pytest.fixture
def job_cache(settings):
    settings.I2V_JOB_CACHE_SECONDS = 30


def test_polled_job_is_answered_from_the_cache_without_the_database(api, job_cache, enqueued):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    job_id = post_image(api, {}, png_bytes()).json()["id"]
    first = api.get(f"/api/jobs/{job_id}").json()
    with CaptureQueriesContext(connection) as ctx:
        again = api.get(f"/api/jobs/{job_id}").json()
    assert again == first and len(ctx.captured_queries) == 0


def test_every_kind_of_job_write_shows_at_once_through_the_cache(api, job_cache, enqueued):
    """The worker's progress updates (queryset update), transitions and saves, and a cancel,
    each show in the very next poll even though the answer is cached for 30 s."""
    job_id = post_image(api, {}, png_bytes()).json()["id"]
    assert api.get(f"/api/jobs/{job_id}").json()["step"] == 0
    VideoJob.objects.filter(pk=job_id).update(step=2, steps_total=4, progress=0.5)
    assert api.get(f"/api/jobs/{job_id}").json()["step"] == 2
    job = VideoJob.objects.get(pk=job_id)
    job.transition("running")
    assert api.get(f"/api/jobs/{job_id}").json()["status"] == "running"
    job.refresh_from_db()
    job.note = "the GPU is warming up"
    job.save()
    assert api.get(f"/api/jobs/{job_id}").json()["note"] == "the GPU is warming up"
    cancelled = api.post(f"/api/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert api.get(f"/api/jobs/{job_id}").json() == cancelled.json()
    VideoJob.objects.filter(pk=job_id).delete()
    assert api.get(f"/api/jobs/{job_id}").status_code == 404


def test_a_poll_that_read_the_job_just_before_it_changed_never_serves_the_old_answer_again(api, job_cache, enqueued,
                                                                                         monkeypatch):
    """A poll reads the row, then the worker's write commits, then the poll stores what it read
    (its answer is the job as it was when it asked). The next poll answers the change, not that
    old answer for the 30 s it is cached."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from generation import domain

    job_id = post_image(api, {}, png_bytes()).json()["id"]
    read_job = domain.read_job

    def read_while_the_worker_writes(user, job_id):
        job = read_job(user, job_id)
        monkeypatch.setattr(domain, "read_job", read_job)
        VideoJob.objects.filter(pk=job_id).update(step=2, steps_total=4, progress=0.5)
        return job

    monkeypatch.setattr(domain, "read_job", read_while_the_worker_writes)
    assert api.get(f"/api/jobs/{job_id}").json()["step"] == 0
    assert api.get(f"/api/jobs/{job_id}").json()["step"] == 2
    with CaptureQueriesContext(connection) as ctx:  # and the new answer is the one cached
        assert api.get(f"/api/jobs/{job_id}").json()["step"] == 2
    assert len(ctx.captured_queries) == 0


def test_a_cached_job_is_still_404_for_other_users_and_visible_to_staff(api, client, other_token, staff_api,
                                                                       job_cache, enqueued):
    from tests.conftest import Api

    job_id = post_image(api, {}, png_bytes()).json()["id"]
    assert api.get(f"/api/jobs/{job_id}").status_code == 200  # now cached
    other = Api(client, other_token)
    assert other.get(f"/api/jobs/{job_id}").status_code == 404
    assert staff_api.get(f"/api/jobs/{job_id}").json()["id"] == job_id


def test_a_failing_cache_costs_speed_not_answers_or_writes(api, settings, enqueued):
    """The job cache pointed at a Redis that is not there: polls are answered from the
    database and job writes still land."""
    from tests.conftest import free_port

    settings.I2V_JOB_CACHE_SECONDS = 30
    settings.CACHES = {"default": {"BACKEND": "i2v.cache.RedisCache",
                                   "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
                                   "OPTIONS": {"socket_connect_timeout": 0.5}}}
    job_id = post_image(api, {}, png_bytes()).json()["id"]
    assert api.get(f"/api/jobs/{job_id}").json()["step"] == 0
    VideoJob.objects.filter(pk=job_id).update(step=3)
    assert api.get(f"/api/jobs/{job_id}").json()["step"] == 3


def test_the_workers_lease_bookkeeping_keeps_the_cached_answer(api, job_cache, enqueued):
    """Writes the answer doesn't show (the worker's lease, taken and released every slice) keep the
    cache: the next poll is still answered without the database."""
    from datetime import timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    job_id = post_image(api, {}, png_bytes()).json()["id"]
    first = api.get(f"/api/jobs/{job_id}").json()
    VideoJob.objects.filter(pk=job_id).update(lease_token="t", lease_until=timezone.now() + timedelta(seconds=60))
    with CaptureQueriesContext(connection) as ctx:
        assert api.get(f"/api/jobs/{job_id}").json() == first
    assert len(ctx.captured_queries) == 0
