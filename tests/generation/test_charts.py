"""The jobs page's per-day chart and the job page's node timeline: server-side SVG, no script."""

import re
from datetime import timedelta
from decimal import Decimal

from django.utils import timezone

from generation.models import VideoJob
from tests.generation.test_views import logged_in, make_job, no_worker  # noqa: F401

S = VideoJob.Status


def test_jobs_page_charts_jobs_and_money_per_day(logged_in, user, other_user):
    now = timezone.now()
    yesterday = now - timedelta(days=1)
    make_job(user, status=S.COMPLETED, finished_at=now, cost_usd=Decimal("0.50"))
    make_job(user, status=S.COMPLETED, finished_at=now, cost_usd=Decimal("0.25"), backend="fal")
    make_job(user, status=S.FAILED, finished_at=now, cost_usd=Decimal("0"))
    make_job(user, status=S.COMPLETED, finished_at=yesterday, cost_usd=Decimal("1.00"))
    make_job(user, status=S.COMPLETED, finished_at=now - timedelta(days=30), cost_usd=Decimal("9"))  # out of range
    make_job(other_user, status=S.FAILED, finished_at=now)  # not this user's
    html = logged_in.get("/jobs/").content.decode()
    today, before = timezone.localdate(now).strftime("%b %-d"), timezone.localdate(yesterday).strftime("%b %-d")
    assert f"<title>{today} done: 2</title>" in html and f"<title>{today} failed: 1</title>" in html
    assert f"<title>{before} done: 1</title>" in html and f"{before} failed" not in html
    assert f"<title>{today} GPU: $0.50</title>" in html and f"<title>{today} fal.ai: $0.25</title>" in html
    assert 'aria-label="Money per day, last 14 days: GPU $1.50; fal.ai $0.25"' in html
    assert 'aria-label="Jobs per day, last 14 days: done 3; failed 1"' in html
    assert "<script>" not in html and " style=" not in html


def test_jobs_page_without_finished_jobs_has_no_chart(logged_in, user):
    make_job(user)
    assert "Jobs per day" not in logged_in.get("/jobs/").content.decode()


def test_job_page_draws_the_run_node_by_node(logged_in, user):
    job = make_job(user, status=S.COMPLETED, submitted_at=timezone.now(), finished_at=timezone.now(),
                   node_timings=[["90", "VAELoader", 0.1, 2.0], ["86", "KSamplerAdvanced", 2.1, 30.0],
                                 ["87", "VAEDecode", 32.1, 12.5], ["upload", "upload", 44.6, 1.4]])
    html = logged_in.get(f"/jobs/{job.id}/").content.decode()
    assert "The run, node by node" in html
    assert "<title>86 KSamplerAdvanced: 30.00 s from 2.10 s</title>" in html
    assert "Upload to storage" in html and 'aria-label="Node timeline: 4 parts over 46.0 s"' in html
    widths = {node: float(w) for w, node in re.findall(r'width="([\d.]+)" height="\d+"><title>(\S+) ', html)}
    assert widths["86"] > widths["87"] > widths["90"]  # bar length follows the seconds


def test_running_job_shows_its_open_node_as_running(logged_in, user):
    job = make_job(user, status=S.RUNNING, submitted_at=timezone.now() - timedelta(seconds=5),
                   node_timings=[["90", "VAELoader", 0.1, 2.0], ["86", "KSamplerAdvanced", 2.1, None]])
    html = logged_in.get(f"/jobs/{job.id}/").content.decode()
    assert 'class="bar-running"' in html and "(running)" in html
