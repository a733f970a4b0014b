import threading

import pytest
from django.db import connection

from generation.models import VideoJob
from gpu.models import IllegalTransition, VastInstance

S = VideoJob.Status
JOB_ALLOWED = {
    S.QUEUED: {S.PROVISIONING, S.SUBMITTED, S.RUNNING, S.UPLOADING, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.PROVISIONING: {S.SUBMITTED, S.RUNNING, S.UPLOADING, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.SUBMITTED: {S.RUNNING, S.UPLOADING, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.RUNNING: {S.UPLOADING, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.UPLOADING: {S.COMPLETED, S.FAILED, S.CANCELLED},
    S.COMPLETED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
}
I = VastInstance.State
INSTANCE_ALLOWED = {
    I.CREATING: {I.LOADING, I.RUNNING, I.DESTROYING, I.FAILED},
    I.LOADING: {I.RUNNING, I.DESTROYING, I.FAILED},
    I.RUNNING: {I.DESTROYING, I.FAILED},
    I.DESTROYING: {I.DESTROYED, I.FAILED},
    I.FAILED: {I.DESTROYING, I.DESTROYED},
    I.DESTROYED: set(),
}


def make_job(user, status=S.QUEUED):
    return VideoJob.objects.create(
        owner=user, input_image="inputs/x.png", prompt="p", workflow_slug="smoke",
        width=64, height=64, frames=17, fps=8, status=status,
    )


@pytest.mark.parametrize("frm", list(S))
@pytest.mark.parametrize("to", list(S))
def test_job_transition_allowed_or_refused(user, frm, to):
    job = make_job(user, frm)
    if to in JOB_ALLOWED[frm]:
        assert job.transition(to) is True
        job.refresh_from_db()
        assert job.status == to
        stamp = VideoJob.STAMPS[to]
        assert getattr(job, stamp) is not None
    else:
        with pytest.raises(IllegalTransition):
            job.transition(to)
        job.refresh_from_db()
        assert job.status == frm


@pytest.mark.parametrize("frm", list(I))
@pytest.mark.parametrize("to", list(I))
def test_instance_transition_allowed_or_refused(db, frm, to):
    inst = VastInstance.objects.create(state=frm)
    if to in INSTANCE_ALLOWED[frm]:
        assert inst.transition(to) is True
        inst.refresh_from_db()
        assert inst.state == to
    else:
        with pytest.raises(IllegalTransition):
            inst.transition(to)
        inst.refresh_from_db()
        assert inst.state == frm


def test_job_transition_from_stale_state_loses(user):
    job = make_job(user)
    stale = VideoJob.objects.get(pk=job.pk)
    assert job.transition(S.CANCELLED)
    # The stale copy still believes the job is queued: its move must not apply.
    assert stale.transition(S.SUBMITTED, prompt_id="abc") is False
    job.refresh_from_db()
    assert job.status == S.CANCELLED
    assert job.prompt_id == ""


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_transitions_exactly_one_wins(django_user_model):
    owner = django_user_model.objects.create_user("race")
    job = make_job(owner, S.RUNNING)
    barrier = threading.Barrier(2)
    results = {}

    def attempt(name, to):
        copy = VideoJob.objects.get(pk=job.pk)
        barrier.wait()
        try:
            results[name] = copy.transition(to)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=attempt, args=("cancel", S.CANCELLED)),
        threading.Thread(target=attempt, args=("upload", S.UPLOADING)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [False, True]
    job.refresh_from_db()
    winner = "cancel" if results["cancel"] else "upload"
    assert job.status == (S.CANCELLED if winner == "cancel" else S.UPLOADING)


def test_a_compare_and_set_writes_every_kind_of_value_as_the_orm_reads_it_back(user):
    """set_if (the prebuilt compare-and-set behind transitions, progress, posted_at and the lease's
    release) stores datetimes, decimals, JSON, files and a related row as update() would, and
    writes nothing when the job is no longer as expected."""
    from decimal import Decimal

    from django.utils import timezone

    from generation.models import set_if

    job = make_job(user, S.RUNNING)
    instance = VastInstance.objects.create(vast_id=4243)
    now = timezone.now()
    fields = {"status": S.COMPLETED, "finished_at": now, "cost_usd": Decimal("0.0123"), "video": "videos/x.mp4",
              "node_timings": [["9", "SaveVideo", 0.5, 0.01]], "provider_urls": {"output": {"filename": "a.mp4"}},
              "instance": instance, "eta_at": None, "progress": 1.0}
    assert set_if(job.pk, "status", S.RUNNING, fields) is True
    job.refresh_from_db()
    assert (job.status, job.finished_at, job.cost_usd, job.video.name) == (S.COMPLETED, now, Decimal("0.0123"), "videos/x.mp4")
    assert job.node_timings == [["9", "SaveVideo", 0.5, 0.01]] and job.provider_urls == {"output": {"filename": "a.mp4"}}
    assert job.instance == instance and job.eta_at is None and job.progress == 1.0
    # No longer running: a stale writer changes nothing.
    assert set_if(job.pk, "status", S.RUNNING, {"progress": 0.5}) is False
    job.refresh_from_db()
    assert job.progress == 1.0
    # Set only while still unset (posted_at: the POST to ComfyUI is stamped once).
    assert set_if(job.pk, "posted_at", None, {"posted_at": now}) is True
    assert set_if(job.pk, "posted_at", None, {"posted_at": timezone.now()}) is False
    job.refresh_from_db()
    assert job.posted_at == now
