"""The generate form's empty fields say what they will be for the chosen model; a failed login keeps the name."""

import re

import pytest
from playwright.sync_api import expect

from generation.domain import sync_shipped_workflows
from generation.models import Workflow
from gpu.models import ModelFile
from tests.browser.test_pages import log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_advanced_placeholders_follow_the_chosen_model(page, live_server, user):
    sync_shipped_workflows(Workflow, ModelFile)
    log_in(page, live_server)
    page.get_by_text("Advanced").click()
    width, frames = page.locator("#id_width"), page.locator("#id_frames")
    expect(width).to_have_attribute("placeholder", "832")
    expect(frames).to_have_attribute("placeholder", "81")
    smoke = Workflow.objects.get(slug="smoke")
    page.select_option("#id_model", label=smoke.name)
    expect(width).to_have_attribute("placeholder", "64")
    expect(frames).to_have_attribute("placeholder", "17")
    expect(page.locator("legend")).to_contain_text("empty = 64×64")
    page.select_option("#id_model", label="Wan 2.2 (GPU)")
    expect(width).to_have_attribute("placeholder", "832")


def test_failed_login_keeps_the_username(page, live_server, user):
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("not-her-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("didn't match")
    expect(page.get_by_label("Username")).to_have_value("alice")
    expect(page.get_by_label("Password")).to_be_focused()
    assert re.search(r"/accounts/login/", page.url)


def test_charts_show_on_the_jobs_page_and_the_run_on_the_job_page(page, live_server, user, worker_for, shots, settings):
    from decimal import Decimal

    from django.utils import timezone

    from gpu.models import GpuConfig
    from tests.browser.test_pages import make_job
    from tests.doubles.comfyui import ComfyUIDouble

    sync_shipped_workflows(Workflow, ModelFile)
    with ComfyUIDouble(run_seconds=1.0) as comfy:
        config = GpuConfig.get()
        config.comfyui_url, config.gpu_provider = comfy.url, "local"
        config.save()
        job = make_job(user)
        # The run in one slice: a node that starts while the worker reconnects between slices is
        # missing from the timeline (ComfyUI keeps no events for a client that is away).
        settings.I2V_FOLLOW_SLICE = 10
        worker_for(job.id).join(60)
    make_job(user, status="failed", finished_at=timezone.now(), cost_usd=Decimal("0"), error="No GPU is configured")
    make_job(user, status="completed", finished_at=timezone.now(), cost_usd=Decimal("0.2025"), backend="fal")
    log_in(page, live_server, next_path="/jobs/")
    jobs_chart = page.get_by_role("img", name=re.compile(r"Jobs per day, last 14 days: done 2; failed 1"))
    expect(jobs_chart).to_be_visible()
    expect(page.get_by_role("img", name=re.compile(r"Money per day.*fal\.ai \$0\.20"))).to_be_visible()
    assert jobs_chart.bounding_box()["height"] > 80
    shots(page, "jobs-chart")
    page.goto(f"{live_server.url}/jobs/{job.id}/")
    timeline = page.get_by_role("img", name=re.compile(r"Node timeline: \d+ parts"))
    expect(timeline).to_be_visible()
    expect(timeline.locator("rect.bar-node")).to_have_count(len(job.workflow.graph))
    expect(timeline.locator("rect.bar-upload")).to_have_count(1)
    shots(page, "job-timeline")
