"""Orphaned files (no job points at them) are deleted once old enough; nothing a job uses, nothing
recent, nothing outside videos/ and inputs/."""

import os
import time

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command

from generation.models import VideoJob
from generation.sweeper import sweep_storage
from tests.generation.test_runner import make_job

HOUR = 3600


@pytest.fixture(autouse=True)
def empty_media(settings, tmp_path):
    """Other tests leave files in the shared media folder; each test here starts from none."""
    settings.MEDIA_ROOT = str(tmp_path / "media")


def age(name, seconds):
    """Make a local file look `seconds` old (its modification time)."""
    path = default_storage.path(name)
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def files(user):
    job = make_job(user)
    job.video.name = default_storage.save(f"videos/{job.id}.mp4", ContentFile(b"the video"))
    job.save()
    names = {
        "used_video": job.video.name,
        "used_input": job.input_image.name,
        "lost_retry_video": default_storage.save(f"videos/{job.id}_aB3dE9f.mp4", ContentFile(b"a copy")),
        "failed_create_input": default_storage.save("inputs/2026/11/abandoned.png", ContentFile(b"img")),
        "kept_form_image": default_storage.save("inputs/pending/0123abcd.png", ContentFile(b"img")),
        "fresh_orphan": default_storage.save("videos/being-uploaded.mp4", ContentFile(b"partial")),
        "not_ours": default_storage.save("models/wan.gguf", ContentFile(b"weights")),
    }
    for key, name in names.items():
        if key != "fresh_orphan":
            age(name, 7 * HOUR)
    return job, names


def test_sweep_deletes_old_orphans_only(files, settings):
    settings.I2V_SWEEP_AFTER = 6 * HOUR
    job, names = files
    deleted = sweep_storage()
    assert sorted(deleted) == sorted([names["lost_retry_video"], names["failed_create_input"], names["kept_form_image"]])
    for key in ("lost_retry_video", "failed_create_input", "kept_form_image"):
        assert not default_storage.exists(names[key])
    for key in ("used_video", "used_input", "fresh_orphan", "not_ours"):
        assert default_storage.exists(names[key]), key
    job.refresh_from_db()
    with job.video.open("rb") as fh:
        assert fh.read() == b"the video"


def test_dry_run_command_lists_and_keeps(files, capsys):
    job, names = files
    call_command("sweep_storage", "--dry-run")
    out = capsys.readouterr().out
    assert names["lost_retry_video"] in out and "would delete 3 orphaned file(s)" in out
    assert default_storage.exists(names["lost_retry_video"])


def test_nothing_to_sweep_on_a_fresh_install(db):
    assert sweep_storage() == []


def test_the_schedule_exists_after_migrate(db):
    from django_q.models import Schedule

    schedule = Schedule.objects.get(name="i2v: storage sweeper")
    assert schedule.func == "generation.sweeper.sweep_storage" and schedule.schedule_type == Schedule.HOURLY


def test_sweep_on_r2_keeps_what_jobs_use(user, settings, s3_server):
    """On a real S3 server (moto over HTTP): orphans go, what jobs reference stays."""
    settings.R2_BUCKET = "videos"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
        "bucket_name": "videos", "endpoint_url": s3_server, "region_name": "auto", "access_key": "k",
        "secret_key": "s", "file_overwrite": False, "default_acl": None}}}
    job = make_job(user)
    job.video.name = default_storage.save(f"videos/{job.id}.mp4", ContentFile(b"the video"))
    job.save()
    orphan = default_storage.save(f"videos/{job.id}_x1.mp4", ContentFile(b"a copy"))
    orphan_input = default_storage.save("inputs/pending/abc.png", ContentFile(b"img"))
    # S3 keeps its own modification times: sweep everything older than "now".
    assert sorted(sweep_storage(older_than=-60)) == sorted([orphan, orphan_input])
    assert default_storage.exists(job.video.name) and default_storage.exists(job.input_image.name)
    assert not default_storage.exists(orphan) and not default_storage.exists(orphan_input)
    assert VideoJob.objects.get(pk=job.pk).video.name == job.video.name
