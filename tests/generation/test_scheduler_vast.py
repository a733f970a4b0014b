"""The scheduler and the vast.ai pool: rent when the queue warrants it, spread jobs, destroy idle GPUs."""

from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from generation import scheduler, tasks
from generation.models import RunStat, UserQuota, VideoJob, Workflow
from gpu.models import VastInstance
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)
from tests.gpu.vast_helpers import boot_to_ready, live_vast_ids, rent
from tests.helpers import png_bytes

pytestmark = pytest.mark.django_db
S = VideoJob.Status
I = VastInstance.State


def waiting_job(owner, **kw) -> VideoJob:
    wf = Workflow.objects.get(slug="smoke")
    job = VideoJob(owner=owner, prompt="p", workflow=wf, workflow_slug="smoke", width=64, height=64, frames=17, fps=8, **kw)
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(png_bytes()))
    job.save()
    return job


def booted_in(instance, seconds):
    """Make the instance look as if it took `seconds` to boot (the expected boot time is learned)."""
    VastInstance.objects.filter(pk=instance.pk).update(created_at=instance.ready_at - timedelta(seconds=seconds))


def learn(gpu_class, seconds):
    RunStat.objects.update_or_create(workflow_slug="smoke", width=64, height=64, frames=17, gpu_class=gpu_class,
                                     defaults={"runs": 5, "mean_seconds": seconds})


def test_jobs_go_to_the_least_loaded_ready_instance(policy, vast, comfy, user):
    policy.max_instances = 2
    policy.save()
    a, b = boot_to_ready(rent(), vast, comfy), boot_to_ready(rent(), vast, comfy)
    jobs = [waiting_job(user) for _ in range(4)]
    result = scheduler.run_pass()
    assert len(result.bound) == 4 and result.rent == 0
    places = sorted(VideoJob.objects.values_list("place", flat=True))
    assert places == sorted([f"vast:{a.pk}"] * 2 + [f"vast:{b.pk}"] * 2)
    assert all(j.instance_id for j in VideoJob.objects.all()) and len(jobs) == 4
    a.refresh_from_db()
    assert a.last_busy_at is not None


def test_a_booting_instance_counts_as_capacity_coming(policy, vast, comfy, user):
    policy.max_instances = 3
    policy.default_boot_seconds = 600
    policy.save()
    learn("RTX 4090", 100)
    learn("vast", 100)
    waiting_job(user)
    first = scheduler.run_pass()
    assert first.rent == 1
    scheduler.carry_out(first)
    assert VastInstance.objects.get().origin == "job"
    waiting_job(user)
    # A second job fits on the instance that is booting: no second rental.
    assert scheduler.run_pass().rent == 0 and VastInstance.objects.count() == 1


def test_scale_out_when_the_queue_would_keep_new_instances_busy_several_at_once(policy, vast, comfy, user):
    policy.max_instances = 3  # the double has three offers that match the policy
    policy.idle_minutes = 1
    policy.save()
    ready = boot_to_ready(rent(), vast, comfy)
    booted_in(ready, 60)
    learn("RTX 4090", 50)
    learn("vast", 50)
    for _ in range(60):
        waiting_job(user)
    UserQuota.objects.create(user=user, max_running=100)
    result = scheduler.run_pass()
    # Two fit on the ready instance; the rest is 2,900 s of work past a boot, and a rental pays off
    # with 6 × (60 s boot + 60 s idle tail) of it: four GPUs' worth, of which the cap allows two more.
    assert len(result.bound) == 2 and result.rent == 2
    scheduler.carry_out(result)
    assert result.rented == 2
    live = VastInstance.objects.filter(state__in=VastInstance.LIVE)
    assert live.count() == 3 and set(live.exclude(pk=ready.pk).values_list("origin", flat=True)) == {"scale-out"}
    assert len(live_vast_ids(vast)) == 3
    # At the cap: nothing more, however long the queue.
    assert scheduler.run_pass().rent == 0


def test_a_deadline_no_gpu_can_meet_rents_one_at_once(policy, vast, comfy, user):
    policy.max_instances = 2
    policy.save()
    ready = boot_to_ready(rent(), vast, comfy)
    booted_in(ready, 60)
    learn("RTX 4090", 100)
    learn("vast", 100)
    for _ in range(4):
        waiting_job(user)  # 400 s of work ahead on the one GPU
    urgent = waiting_job(user, deadline_at=timezone.now() + timedelta(seconds=240))
    result = scheduler.run_pass()
    assert result.rent == 1  # a new GPU (60 s boot + 100 s) meets the 240 s deadline; the queue would not
    urgent.refresh_from_db()
    assert urgent.place == ""


def test_no_scale_out_when_the_wait_is_shorter_than_a_boot(policy, vast, comfy, user):
    policy.max_instances = 3
    policy.default_boot_seconds = 600
    policy.save()
    booted_in(boot_to_ready(rent(), vast, comfy), 600)
    learn("RTX 4090", 30)
    for _ in range(6):
        waiting_job(user)
    assert scheduler.run_pass().rent == 0  # 4 × 30 s of waiting < a 600 s boot


def test_idle_instance_is_destroyed_after_idle_minutes_busy_and_recent_ones_stay(policy, vast, comfy, user):
    policy.max_instances = 3
    policy.save()
    idle, recent, busy = (boot_to_ready(rent(), vast, comfy) for _ in range(3))
    long_ago = timezone.now() - timedelta(minutes=policy.idle_minutes + 1)
    VastInstance.objects.filter(pk__in=[idle.pk, busy.pk]).update(created_at=long_ago, ready_at=long_ago,
                                                                   last_busy_at=long_ago)
    waiting_job(user, status=S.UPLOADING, instance=busy, place="")  # storing its video: still in use

    result = scheduler.run_pass()
    assert result.destroy == [idle.pk]
    scheduler.carry_out(result)
    states = dict(VastInstance.objects.values_list("pk", "state"))
    assert states == {idle.pk: I.DESTROYED, recent.pk: I.RUNNING, busy.pk: I.RUNNING}
    assert sorted(live_vast_ids(vast)) == sorted([recent.vast_id, busy.vast_id])
    idle.refresh_from_db()
    assert "idle for more than 15 min" in idle.destroy_reason and idle.cost_usd > 0


def test_idle_time_counts_from_the_last_job_finishing(policy, vast, comfy, user):
    instance = boot_to_ready(rent(), vast, comfy)
    long_ago = timezone.now() - timedelta(hours=1)
    VastInstance.objects.filter(pk=instance.pk).update(ready_at=long_ago, last_busy_at=long_ago)
    waiting_job(user, status=S.COMPLETED, instance=instance, finished_at=timezone.now() - timedelta(minutes=2))
    assert scheduler.run_pass().destroy == []


def test_a_job_whose_instance_is_destroyed_goes_back_to_the_queue(policy, vast, comfy, user, queued):
    from gpu import lifecycle

    instance = boot_to_ready(rent(), vast, comfy)
    job = waiting_job(user)
    scheduler.run_pass()
    job.refresh_from_db()
    assert job.place == f"vast:{instance.pk}"
    lifecycle.destroy_instance(instance, "destroyed by hand")
    result = scheduler.run_pass()
    job.refresh_from_db()
    assert result.requeued == [job.pk] and job.place == "" and job.status == S.QUEUED
    assert "the GPU it was placed on is gone" in job.note
    assert tasks.schedule().startswith("bound 0, waiting 1, rented 1")  # the queue asks for a new GPU
