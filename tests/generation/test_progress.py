"""Progress covers the whole run, weighted by past runs' node timings, and reaches 1.0 only when
the video is stored; the ETA comes from those past runs."""

import threading

import pytest

from generation import progress as progress_model
from generation.models import VideoJob
from tests.generation.test_runner import configured, comfy, in_thread, make_job, requeued, run_to_end  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status


def test_node_timings_are_recorded_and_shown_in_the_admin(configured, user, admin_client):
    configured.run_seconds = 0.3
    job = run_to_end(make_job(user, workflow="wan22-i2v"))
    assert job.status == S.COMPLETED and job.progress == 1.0
    nodes = [entry[0] for entry in job.node_timings]
    assert nodes[-1] == progress_model.UPLOAD and "86" in nodes and "108" in nodes
    assert all(seconds is not None and seconds >= 0 for *_, seconds in job.node_timings)
    samplers = sum(e[3] for e in job.node_timings if e[1] == "KSamplerAdvanced")
    assert samplers > 0.05  # the double spends its run time mostly on sampler steps
    html = admin_client.get(f"/admin/generation/videojob/{job.id}/change/").content.decode()
    assert "86 KSamplerAdvanced" in html and "upload upload" in html


def test_progress_never_claims_the_end_while_running_and_an_eta_is_learned(configured, user, api):
    configured.run_seconds = 0.4
    first = run_to_end(make_job(user, workflow="wan22-i2v"))
    assert first.status == S.COMPLETED
    configured.hold = threading.Event()
    job = make_job(user, workflow="wan22-i2v")
    seen = []
    worker = in_thread(run_to_end, job)
    # Step the run node by node and sampler step by step, reading what a script would see.
    held = configured.wait_held(timeout=10)
    while held:
        body = api.get(f"/api/jobs/{job.id}").json()
        seen.append((body["status"], body["progress"], body["eta_seconds"]))
        configured.release_once()
        held = configured.next_hold(timeout=10)
    configured.hold.set()
    worker.join(30)
    job.refresh_from_db()
    assert job.status == S.COMPLETED and job.progress == 1.0
    running = [s for s in seen if s[0] in ("submitted", "running", "uploading")]
    assert len(running) >= 8  # the hold points of the nodes not cached and of the sampler steps
    assert all(p < 1.0 for _, p, _ in running)
    progresses = [p for _, p, _ in running]
    assert progresses == sorted(progresses)  # it never goes back
    assert progresses[-1] > progresses[0], seen  # and it moves on
    assert any(eta is not None for *_, eta in running), seen  # learned from the first run
    assert api.get(f"/api/jobs/{job.id}").json()["eta_seconds"] is None


def test_expected_seconds_is_the_median_per_node_and_drives_the_estimate():
    runs = [[["1", "A", 0, 1.0], ["2", "B", 1, 8.0], ["upload", "upload", 9, 1.0]],
            [["1", "A", 0, 3.0], ["2", "B", 3, 10.0], ["upload", "upload", 13, 1.0]],
            [["2", "B", 0, 9.0], ["upload", "upload", 9, 2.0]]]  # node 1 was cached
    expected = progress_model.expected_seconds(runs)
    assert expected == {"1": 1.0, "2": 9.0, "upload": 1.0}
    estimate = progress_model.Estimate(expected)
    value, left = estimate.at(["1"], "2", 0.5, 4.0)
    assert value == pytest.approx((1 + 4.5) / 11) and left == pytest.approx(4.5 + 1.0)
    cached = progress_model.Estimate(expected, cached={"1"})
    assert cached.at([], "2", 0.0, 0.0)[0] == 0.0 and cached.total == 10.0
