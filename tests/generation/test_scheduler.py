"""The scheduler: jobs wait in i2v's queue and are placed fairly, only where a slot is free."""

import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import F
from django.utils import timezone

from generation import scheduler, tasks
from generation.domain import job_json
from generation.models import RunStat, UserQuota, VideoJob
from generation.scheduler import Clocks, Estimator, WaitingJob, fair_order
from gpu.models import ComfyUIServer, GpuConfig
from tests.doubles.comfyui import ComfyUIDouble
from tests.generation.test_runner import make_job, requeued, run_to_end  # noqa: F401 (fixture)
from tests.helpers import png_bytes

S = VideoJob.Status


def _jobs(user, n, start=0.0):
    return [WaitingJob(f"{user}{i + 1}", user, start + i, "comfyui", None, ("smoke", 64, 64, 17)) for i in range(n)]


# ---------------------------------------------------------------------- the order (pure)


def _order(by_user, start=None, weights=None):
    return [job.id for job, _ in fair_order(by_user, start or {}, weights or {})]


def test_fair_order_takes_turns_across_users_each_users_jobs_in_order():
    by_user = {"a": _jobs("a", 5), "b": _jobs("b", 2, start=10), "c": _jobs("c", 1, start=20)}
    assert _order(by_user) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5"]


def test_weight_two_gets_two_turns_to_one():
    by_user = {"a": _jobs("a", 6), "b": _jobs("b", 6, start=10)}
    order = _order(by_user, weights={"a": 2})
    assert order[:6] == ["a1", "b1", "a2", "a3", "b2", "a4"]


def test_a_user_whose_clock_ran_ahead_waits_for_the_others():
    by_user = {"a": _jobs("a", 3), "b": _jobs("b", 3, start=10)}
    assert _order(by_user, start={"a": 2.0, "b": 0.0})[:4] == ["b1", "b2", "a1", "b3"]


def test_placements_take_turns_whoever_freed_the_slot():
    clocks = Clocks()
    clocks.placed(1, clocks.start(1), 1)  # A placed twice in a row while alone...
    clocks.placed(1, clocks.start(1), 1)
    # ...B arrives: it starts at the shared clock, not at zero (waiting earns no credit), and goes first.
    assert clocks.start(2) == 1.0 < clocks.start(1) == 2.0
    order = [job.owner_id for job, _ in fair_order({1: _jobs(1, 3), 2: _jobs(2, 3, start=10)},
                                                   {u: clocks.start(u) for u in (1, 2)}, {})]
    assert order == [2, 1, 2, 1, 2, 1]


def test_the_waiting_jobs_read_with_the_lock_are_ordered_oldest_first_and_only_when_they_are_all():
    """The pass reads up to scheduler.HEAD waiting jobs in no order (the scan stops early) and
    orders them itself; HEAD of them may not be all, and then it reads what it needs instead."""
    now = timezone.now()
    head = [("b", 1, "comfyui", "smoke", 64, 64, 17, now), ("a", 2, "comfyui", "smoke", 64, 64, 17, now - timedelta(1))]
    assert scheduler._all_waiting(head) == [("a", 2, "comfyui", "smoke", 64, 64, 17), ("b", 1, "comfyui", "smoke", 64, 64, 17)]
    assert scheduler._all_waiting(head * (scheduler.HEAD // 2)) is None


def test_estimator_prefers_learned_run_times_and_falls_back_to_the_default():
    estimate = Estimator({("smoke", 64, 64, 17, "RTX 4090"): 12.5, ("smoke", 64, 64, 17, "RTX 5090"): 7.5,
                          ("wan", 480, 832, 81, "RTX 4090"): 200}, default=300)
    assert estimate(("smoke", 64, 64, 17), "RTX 4090") == 12.5
    # A GPU that never ran this kind: as the others did on average, not the default.
    assert estimate(("smoke", 64, 64, 17), "RTX 3090") == 10.0
    assert estimate(("wan", 480, 832, 49), "RTX 4090") == 300  # a kind nobody ran yet


# ---------------------------------------------------------------------- placing jobs (database)


pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def comfy():
    with ComfyUIDouble() as double:
        yield double


@pytest.fixture
def one_gpu(comfy, requeued, settings):  # noqa: F811
    settings.I2V_FOLLOW_SLICE = 5
    config = GpuConfig.get()
    config.comfyui_url, config.gpu_provider = comfy.url, "local"
    config.save()
    return comfy


def _state(jobs):
    for job in jobs:
        job.refresh_from_db()
    return [job.place or "-" for job in jobs]


def test_a_gpu_takes_one_running_and_one_waiting_job_the_rest_wait_in_i2v(one_gpu, user):
    jobs = [make_job(user) for _ in range(5)]
    assert _state(jobs) == ["config", "config", "-", "-", "-"]
    waiting = [job_json(job) for job in jobs[2:]]
    assert [w["queue_position"] for w in waiting] == [0, 1, 2]
    starts = [w["expected_start_at"] for w in waiting]
    assert all(starts) and starts == sorted(starts) and starts[0] > timezone.now()
    assert all(w["status"] == "queued" and w["place"] is None for w in waiting)

    # The first finishes on ComfyUI (its GPU slot frees once the video is being stored): the next is placed.
    run_to_end(jobs[0])
    assert _state(jobs)[2:] == ["config", "-", "-"]
    assert one_gpu.max_queued <= 2


def test_jobs_spread_over_every_configured_comfyui(one_gpu, user):
    with ComfyUIDouble() as second:
        server = ComfyUIServer.objects.create(name="home", url=second.url)
        jobs = [make_job(user) for _ in range(4)]
        assert sorted(_state(jobs)) == ["config", "config", f"server:{server.pk}", f"server:{server.pk}"]
        for job in jobs:
            assert run_to_end(job).status == S.COMPLETED
        assert len(one_gpu.prompt_posts) == 2 and len(second.prompt_posts) == 2
        assert max(one_gpu.max_queued, second.max_queued) <= 2


def test_a_gpu_added_later_takes_jobs_at_once_though_it_has_no_history(one_gpu, user):
    run_to_end(make_job(user))  # the configured GPU's run time is known now
    with ComfyUIDouble() as second:
        server = ComfyUIServer.objects.create(name="new", url=second.url)
        jobs = [make_job(user) for _ in range(2)]
        # Not both on the known GPU (one running, one in its queue) while the new one idles.
        assert sorted(_state(jobs)) == ["config", f"server:{server.pk}"]


def test_another_users_job_goes_before_the_first_users_backlog(one_gpu, user, other_user):
    backlog = [make_job(user) for _ in range(6)]
    mine = make_job(other_user)
    assert _state(backlog)[:2] == ["config", "config"] and mine.place == ""
    assert job_json(mine)["queue_position"] == 0  # ahead of alice's four waiting jobs
    run_to_end(backlog[0])
    mine.refresh_from_db()
    assert mine.place == "config" and _state(backlog)[2:] == ["-", "-", "-", "-"]


def test_max_running_per_user_holds_the_rest_back(one_gpu, user):
    UserQuota.objects.create(user=user, max_running=1)
    jobs = [make_job(user) for _ in range(3)]
    assert _state(jobs) == ["config", "-", "-"]


def test_a_backlog_longer_than_the_pass_reads_with_its_lock_does_not_hide_a_later_users_job(one_gpu, user,
                                                                                             other_user):
    """The pass reads up to scheduler.HEAD waiting jobs with its lock; when more wait, it reads
    each user's first few instead, so the other user's job, newer than the whole backlog, still
    takes the second turn."""
    UserQuota.objects.create(user=user, max_running=100)
    backlog = [make_job(user, place=False) for _ in range(scheduler.HEAD + 1)]
    mine = make_job(other_user, place=False)
    result = scheduler.run_pass(seen=scheduler.AFTER_COMMIT)
    assert sorted(result.bound) == sorted([str(backlog[0].pk), str(mine.pk)])
    assert _state([backlog[0], mine, backlog[1]]) == ["config", "config", "-"]


def test_each_users_limit_holds_when_more_users_have_limits_than_the_pass_reads_at_once(one_gpu, user):
    """The pass reads every user's limits with its lock while there are at most
    scheduler.QUOTAS_AHEAD; past that, those of the users it places."""
    others = get_user_model().objects.bulk_create(
        [get_user_model()(username=f"quota-{i}") for i in range(scheduler.QUOTAS_AHEAD + 1)])
    UserQuota.objects.bulk_create([UserQuota(user=other, weight=2) for other in others])
    UserQuota.objects.create(user=user, max_running=1)  # the newest row: not among the first QUOTAS_AHEAD
    jobs = [make_job(user, place=False) for _ in range(3)]
    scheduler.run_pass(seen=scheduler.AFTER_COMMIT)
    assert _state(jobs) == ["config", "-", "-"]


def test_max_waiting_answers_429_naming_the_limit(api, user, requeued, settings):  # noqa: F811
    settings.I2V_MAX_WAITING = 2
    import io

    def post():
        image = io.BytesIO(png_bytes())
        image.name = "in.png"
        return api.post("/api/generate-video", data={"prompt": "waves", "workflow": "smoke", "image": image}, json=False)

    # One GPU slot (no worker runs here): the first job is placed, the next two wait.
    GpuConfig.objects.filter(pk=GpuConfig.get().pk).update(comfyui_url="http://127.0.0.1:9", gpu_provider="local",
                                                           slots_per_gpu=1)
    assert [post().status_code for _ in range(3)] == [202, 202, 202]
    refused = post()
    assert refused.status_code == 429
    assert refused.json()["detail"].startswith("You have 2 jobs waiting, the limit is 2 (max_waiting)")
    assert VideoJob.objects.count() == 3
    UserQuota.objects.create(user=user, max_waiting=3)
    assert post().status_code == 202


@pytest.mark.parametrize("deadline, detail", [
    ("soon", "deadline"),
    ("-5", "must be in the future"),
    ("2001-01-01T00:00:00Z", "must be in the future"),
    ("999999999", "within 7 days"),
])
def test_bad_deadline_is_a_422_naming_the_field(api, requeued, deadline, detail):  # noqa: F811
    resp = api.post("/api/generate-video", {"prompt": "p", "workflow": "smoke", "image_url": "http://127.0.0.1:9/x.png",
                                            "deadline": deadline})
    assert resp.status_code == 422 and "deadline" in resp.json()["detail"] and detail in resp.json()["detail"]


def test_deadline_in_seconds_becomes_a_time_on_the_job(one_gpu, user):
    from generation.inputs import GenerateParams

    params = GenerateParams.model_validate({"prompt": "p", "deadline": "600"})
    assert abs((params.deadline - timezone.now()).total_seconds() - 600) < 5


def test_a_job_on_a_server_switched_off_goes_back_to_the_queue_and_runs_elsewhere(one_gpu, user):
    with ComfyUIDouble() as second:
        server = ComfyUIServer.objects.create(name="home", url=second.url)
        GpuConfig.objects.filter(pk=1).update(slots_per_gpu=1)
        first, job = make_job(user), make_job(user)
        assert _state([first, job]) == ["config", f"server:{server.pk}"]
        ComfyUIServer.objects.filter(pk=server.pk).update(enabled=False)
        run_to_end(first)  # frees the configured URL; the pass finds the job's server gone
        job.refresh_from_db()
        assert job.place == "config" and "the GPU it was placed on is gone" not in job.note
        assert run_to_end(job).status == S.COMPLETED
        assert len(second.prompt_posts) == 0 and one_gpu.prompt_posts[job.prompt_id] == 1


def test_finished_runs_teach_the_expected_run_time(one_gpu, user):
    job = run_to_end(make_job(user))
    stat = RunStat.objects.get()
    assert (stat.workflow_slug, stat.width, stat.gpu_class, stat.runs) == ("smoke", job.width, f"url:{one_gpu.url}", 1)
    # ComfyUI's own execution time (history timestamps), not the time the job waited in its queue.
    assert 0 < stat.mean_seconds <= (job.uploading_at - job.submitted_at).total_seconds()
    run_to_end(make_job(user))
    assert RunStat.objects.get().runs == 2


def test_the_expected_run_time_is_a_mean_over_about_the_last_ten_runs(user):
    """The first run sets it; the next nine average in; after that each run moves it a tenth of
    the way, so a GPU that got faster is believed within a few dozen runs."""
    kind = VideoJob(workflow_slug="smoke", width=64, height=64, frames=17, gpu_class="RTX 4090")
    other = VideoJob(workflow_slug="smoke", width=64, height=64, frames=17, gpu_class="RTX 5090")
    scheduler.record_run(kind, 10.0)
    scheduler.record_run(other, 3.0)
    assert RunStat.objects.get(gpu_class="RTX 4090").mean_seconds == 10.0
    scheduler.record_run(kind, 20.0)
    assert RunStat.objects.get(gpu_class="RTX 4090").mean_seconds == pytest.approx(15.0)
    for _ in range(8):
        scheduler.record_run(kind, 15.0)
    assert RunStat.objects.get(gpu_class="RTX 4090").mean_seconds == pytest.approx(15.0)
    scheduler.record_run(kind, 25.0)  # the eleventh: a tenth of the way
    stat = RunStat.objects.get(gpu_class="RTX 4090")
    assert (stat.runs, stat.mean_seconds) == (11, pytest.approx(16.0))
    assert RunStat.objects.get(gpu_class="RTX 5090").mean_seconds == 3.0  # each kind learns its own


def test_parallel_passes_never_bind_one_slot_twice(one_gpu, user):
    GpuConfig.objects.filter(pk=1).update(slots_per_gpu=3)
    jobs = [make_job(user, place=False) for _ in range(12)]
    UserQuota.objects.create(user=user, max_running=20)
    errors = []

    def passes():
        try:
            for _ in range(5):
                scheduler.run_pass()
        except Exception as exc:  # reported below: a failing pass must fail the test
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=passes) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert VideoJob.objects.filter(place="config").count() == 3 and _state(jobs).count("config") == 3


def test_jobs_arriving_together_are_all_placed_by_two_passes_not_ten(one_gpu, user):
    """Ten requests commit their jobs at once, then each asks for a pass: the first two passes
    run (the first places every job) and the other eight see that and skip theirs."""
    GpuConfig.objects.filter(pk=1).update(slots_per_gpu=10)
    UserQuota.objects.create(user=user, max_running=20)
    jobs = [make_job(user, place=False) for _ in range(10)]
    seen = scheduler.passes_so_far()  # what each request reads once its job is committed
    results = [scheduler.run_pass(seen=seen) for _ in jobs]
    assert _state(jobs) == ["config"] * 10 and len(results[0].bound) == 10
    assert [r.skipped for r in results] == [False, False] + [True] * 8


def test_a_pass_is_skipped_only_once_a_later_one_has_seen_the_change(one_gpu, user):
    seen = scheduler.passes_so_far()
    scheduler.run_pass()  # may have begun before the change: does not count
    job = make_job(user, place=False)
    assert not scheduler.run_pass(seen=seen).skipped and _state([job]) == ["config"]
    assert scheduler.run_pass(seen=seen).skipped


def test_a_pass_for_a_committed_change_waits_its_turn_and_skips_when_two_later_passes_saw_it(one_gpu, user):
    """A request's pass (place_now) takes the lock when it is free, with no count read. When
    another pass holds the lock, the request reads the count and waits; if two passes ran
    meanwhile (the second began after the change), it skips: a burst still runs two passes."""
    from django.db import connection, transaction

    from generation.models import SchedulerState

    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip("SQLite: no row locks, the count is read before the pass as before")
    scheduler.run_pass()  # the state row exists
    job = make_job(user, place=False)
    held, release, outcome = threading.Event(), threading.Event(), {}

    def other_pass():  # a pass in another process, holding the lock until told
        try:
            with transaction.atomic():
                SchedulerState.objects.select_for_update().get(pk=1)
                held.set()
                release.wait(10)
                SchedulerState.objects.filter(pk=1).update(passes=F("passes") + 2)  # two passes' worth
        finally:
            connection.close()

    def request():
        try:
            outcome["result"] = scheduler.place_now()
        finally:
            connection.close()

    holder = threading.Thread(target=other_pass)
    holder.start()
    assert held.wait(10)
    asker = threading.Thread(target=request)
    asker.start()
    asker.join(0.5)
    assert asker.is_alive(), "the request's pass ran while another held the lock"
    release.set()
    holder.join(10), asker.join(10)
    assert outcome["result"].skipped and _state([job]) == ["-"]
    # With the lock free, the next request's pass runs and places it.
    assert not scheduler.place_now().skipped and _state([job]) == ["config"]


def test_no_gpu_configured_fails_waiting_jobs_with_what_to_set(requeued, user):  # noqa: F811
    job = make_job(user)
    assert job.status == S.FAILED and "No GPU is configured" in job.error


def test_cancelled_waiting_job_is_never_placed(one_gpu, user, api):
    GpuConfig.objects.filter(pk=1).update(slots_per_gpu=1)
    first, waiting = make_job(user), make_job(user)
    assert waiting.place == ""
    assert api.post(f"/api/jobs/{waiting.id}/cancel").json()["status"] == "cancelled"
    run_to_end(first)
    waiting.refresh_from_db()
    assert waiting.status == S.CANCELLED and waiting.place == "" and one_gpu.prompt_posts.total() == 1


def test_job_page_shows_queue_position_and_expected_start(one_gpu, user, client):
    client.force_login(user)
    GpuConfig.objects.filter(pk=1).update(slots_per_gpu=1)
    make_job(user), make_job(user)
    waiting = make_job(user)
    html = client.get(f"/jobs/{waiting.id}/").content.decode()
    assert "Waiting in the queue: 1 job ahead of it, expected to start in about" in html


def test_admin_sets_per_user_limits(staff, client):
    client.force_login(staff)
    other = get_user_model().objects.create_user("dave", password="x")
    resp = client.post("/admin/generation/userquota/add/", {"user": other.pk, "weight": 3, "max_waiting": 5,
                                                             "max_running": 2, "fal_daily_usd": "1.50"})
    assert resp.status_code == 302, resp.content.decode()[:2000]
    quota = UserQuota.objects.get(user=other)
    assert (quota.weight, quota.waiting_limit, quota.running_limit, quota.fal_limit) == (3, 5, 2, Decimal("1.50"))
    page = client.get("/admin/generation/userquota/").content.decode()
    assert "dave" in page


def test_watchdog_runs_a_pass(one_gpu, user):
    job = make_job(user, place=False)
    tasks.watchdog()
    job.refresh_from_db()
    assert job.place == "config"


def test_unknown_place_key_resolves_to_nothing(db):
    from gpu import capacity

    assert capacity.resolve(f"vast:{uuid.uuid4()}") is None and capacity.resolve("server:x") is None
    assert capacity.resolve("nonsense") is None


def test_expected_start_follows_learned_run_times(one_gpu, user):
    GpuConfig.objects.filter(pk=1).update(slots_per_gpu=1)
    probe = make_job(user, place=False)
    RunStat.objects.create(workflow_slug="smoke", width=probe.width, height=probe.height, frames=probe.frames,
                           gpu_class=f"url:{one_gpu.url}", runs=3, mean_seconds=100)
    probe.delete()
    make_job(user)
    second, third = make_job(user), make_job(user)
    now = timezone.now()
    s2, s3 = job_json(second)["expected_start_at"], job_json(third)["expected_start_at"]
    assert timedelta(seconds=90) < s2 - now < timedelta(seconds=110)
    assert timedelta(seconds=190) < s3 - now < timedelta(seconds=210)
