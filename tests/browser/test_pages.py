"""The pages in a real browser: log in, generate and watch a job live, validation, cancel, jobs, GPU."""

import re
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone
from playwright.sync_api import expect

from generation.domain import sync_shipped_workflows
from generation.models import VideoJob, Workflow
from gpu.models import ModelFile
from gpu.models import GpuConfig, VastInstance
from tests.browser.conftest import sample_image
from tests.helpers import configured_comfyui
from tests.doubles.comfyui import ComfyUIDouble
from tests.doubles.vastai import VastAIDouble

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
S = VideoJob.Status
JOB_URL = re.compile(r"/jobs/([0-9a-f-]{36})/$")


@pytest.fixture
def workflows(db):
    # transaction=True tests flush the tables the data migration filled.
    sync_shipped_workflows(Workflow, ModelFile)


@pytest.fixture
def comfy(workflows):
    with configured_comfyui() as double:
        yield double


def log_in(page, live_server, username="alice", password="alice-pass-123", next_path="/"):
    page.goto(f"{live_server.url}{next_path}")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_server.url}{next_path}")


def choose_image(page, name="mountains.png"):
    page.set_input_files("#id_image", files=[{"name": name, "mimeType": "image/png", "buffer": sample_image()}])


def make_job(owner, **fields):
    wf = Workflow.objects.get(slug=fields.pop("workflow", "wan22-i2v"))
    d = wf.defaults
    job = VideoJob(owner=owner, prompt=fields.pop("prompt", "The dragon slowly turns its head"), workflow=wf,
                   workflow_slug=wf.slug, width=d["width"], height=d["height"], frames=d["frames"], fps=d["fps"],
                   steps=d.get("steps"), **fields)
    job.input_image.name = default_storage.save(f"inputs/{job.id}.png", ContentFile(sample_image()))
    job.save()
    return job


def steps_sent(comfy) -> int:
    """The sampler steps the ComfyUI double has reported so far (each sampler's last `progress`)."""
    last = {}
    for message in comfy.emitted:
        if message["type"] == "progress":
            last[message["data"]["node"]] = message["data"]["value"]
    return sum(last.values())


def wait_for_step(job_id, above, timeout=5.0):
    """The job's row once its step passes `above` or it ends (a bounded wait)."""
    end = time.monotonic() + timeout
    while True:
        row = VideoJob.objects.get(pk=job_id)
        if row.step > above or row.is_terminal or time.monotonic() > end:
            return row
        time.sleep(0.02)


def test_log_in_generate_and_watch_the_job_finish_live(page, live_server, user, comfy, worker_for, shots):
    comfy.hold = threading.Event()  # the double pauses before each node and sampler step
    log_in(page, live_server)
    expect(page.get_by_role("heading", name="Generate a video")).to_be_visible()

    choose_image(page)
    expect(page.locator("#image-preview")).to_be_visible()  # the client-side preview
    expect(page.locator("#image-hint")).to_contain_text("mountains.png")
    page.get_by_label("Prompt", exact=True).fill("The dragon slowly turns its head toward the camera, embers drifting")
    page.get_by_label("Negative prompt").fill("blurry, distorted")
    expect(page.get_by_label("Model")).to_have_value("comfyui:wan22-i2v")
    page.locator("details.advanced summary").click()
    page.get_by_label("Seed").fill("1234")
    expect(page.locator("#cost-estimate")).to_contain_text("No per-clip charge")
    shots(page, "generate")

    page.get_by_role("button", name="Generate video").click()
    expect(page).to_have_url(JOB_URL)
    job_id = JOB_URL.search(page.url).group(1)
    job = VideoJob.objects.get(pk=job_id)
    assert (job.owner, job.seed, job.negative_prompt) == (user, 1234, "blurry, distorted")
    # A marker that a reload would wipe: everything below must happen without one.
    page.evaluate("window.__stillTheSamePage = true")
    expect(page.locator(".badge")).to_have_text("Queued")

    worker = worker_for(job_id)
    seen_steps, seen_values, shot_taken = [], [], False
    for _ in range(80):
        try:
            comfy.wait_held(timeout=10)
        except TimeoutError:
            break
        comfy.release_once()
        # The double has sent what this hold point lets out once it holds again (or the run is over).
        running = comfy.next_hold(timeout=10)
        sent = steps_sent(comfy)
        if sent > (seen_steps[-1] if seen_steps else 0):
            # The worker saves a step within SAVE_EVERY; under a loaded CI that can take a while.
            row = wait_for_step(job_id, sent - 1, timeout=10)
            assert row.step == sent
            # The page shows the new step on its own, at its next poll.
            # The last step may already have handed over to the VAE decode when the page polls.
            done_sampling = "|Decoding the frames" if row.step == row.steps_total else ""
            expect(page.locator(".progress-message")).to_have_text(
                re.compile(f"Sampling: step {row.step} of {row.steps_total}{done_sampling}"), timeout=5000)
            seen_steps.append(row.step)
            seen_values.append(int(page.locator("#job-progress").get_attribute("value")))
            expect(page.locator(".tl-current .tl-label")).to_contain_text("Running")
            if row.step == 2 and not shot_taken:
                shots(page, "job-running")
                shot_taken = True
            if row.step == row.steps_total:
                break
        if running is None:
            break
    comfy.hold.set()
    worker.join()

    assert seen_steps == [1, 2, 3, 4]
    assert seen_values == sorted(seen_values) and seen_values[0] < seen_values[-1]
    expect(page.locator(".badge")).to_have_text("Completed", timeout=10_000)
    video = page.locator("video.player")
    expect(video).to_be_visible()
    expect(page.get_by_role("link", name="Download video")).to_have_attribute("href", f"/jobs/{job_id}/video")
    # The browser can actually load and play what the page points at.
    # A function, not an expression: Playwright polls an expression with eval, which the CSP forbids.
    page.wait_for_function("() => document.querySelector('video.player').readyState >= 1", timeout=10_000)
    assert page.evaluate("document.querySelector('video.player').duration") > 0
    assert page.evaluate("window.__stillTheSamePage") is True
    expect(page.get_by_role("button", name="Run again")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    # Polling stopped with the job: no further status requests.
    requests = []
    page.on("request", lambda r: requests.append(r.url) if r.url.endswith("/status") else None)
    page.wait_for_timeout(2500)
    assert requests == []
    shots(page, "job-completed")


def test_validation_errors_show_next_to_their_fields_and_keep_the_image(page, live_server, user, workflows, worker_for,
                                                                       shots):
    log_in(page, live_server)
    choose_image(page, "beach.png")
    page.get_by_label("Prompt", exact=True).fill("   ")
    page.locator("details.advanced summary").click()
    page.locator("#id_frames").fill("20")
    page.get_by_role("button", name="Generate video").click()

    expect(page.locator("#error-prompt")).to_have_text("Write a prompt: describe what should move and how.")
    expect(page.locator("#error-frames")).to_contain_text("Must be 4n+1")
    expect(page.get_by_label("Prompt", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(page.locator(".form-alert")).to_have_text("Please fix the 2 problems below.")
    assert page.url == f"{live_server.url}/"  # HTMX swapped the form in place
    expect(page.locator("#image-hint")).to_contain_text("Using beach.png")
    expect(page.locator("#image-preview")).to_be_visible()
    shots(page, "generate-errors")
    assert not VideoJob.objects.exists()

    # Fixing the fields is enough: the image was kept.
    page.get_by_label("Prompt", exact=True).fill("Waves roll onto the beach")
    page.locator("#id_frames").fill("33")
    page.get_by_role("button", name="Generate video").click()
    expect(page).to_have_url(JOB_URL)
    job = VideoJob.objects.get()
    assert (job.prompt, job.frames) == ("Waves roll onto the beach", 33)
    assert default_storage.open(job.input_image.name).read() == sample_image()


def test_cancel_a_running_job(page, live_server, user, comfy, worker_for):
    comfy.hold = threading.Event()
    job = make_job(user, workflow="smoke")
    worker = worker_for(job.id)
    comfy.wait_held(timeout=10)
    log_in(page, live_server, next_path=f"/jobs/{job.id}/")
    expect(page.locator(".badge")).to_have_text(re.compile("Submitted|Running"))
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator(".badge")).to_have_text("Cancelled", timeout=10_000)
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    worker.join()
    job.refresh_from_db()
    assert job.status == S.CANCELLED and not comfy.running_prompt_id


def test_jobs_page_badges_update_live(page, live_server, user, other_user, comfy, worker_for, shots):
    now = timezone.now()
    statuses = [S.COMPLETED, S.FAILED, S.CANCELLED, S.COMPLETED, S.COMPLETED]
    prompts = ["A lighthouse beam sweeps through the fog", "Cherry blossoms fall in slow motion",
               "A cat stretches on a sunny windowsill", "Northern lights ripple over a frozen lake",
               "Rain streaks down a neon-lit window"]
    for i, (status, prompt) in enumerate(zip(statuses, prompts)):
        make_job(user, prompt=prompt, status=status, created_at=now - timedelta(hours=i + 1))
    make_job(other_user, prompt="not alice's")
    comfy.hold = threading.Event()
    live = make_job(user, prompt="Waves roll onto the beach at sunset", workflow="smoke")
    log_in(page, live_server, next_path="/jobs/")
    cards = page.locator(".job-card")
    expect(cards).to_have_count(6)
    expect(cards.first).to_contain_text("Waves roll onto the beach")
    expect(page.get_by_text("not alice's")).to_have_count(0)
    badge = page.locator(f"#badge-{live.id}")
    expect(badge).to_contain_text("Queued")
    page.wait_for_function("() => [...document.querySelectorAll('.job-card img')].every(i => i.complete && i.naturalWidth > 0)")
    worker = worker_for(live.id)
    comfy.wait_held(timeout=10)
    expect(badge).to_contain_text(re.compile("Submitted|Running"))
    shots(page, "jobs")
    comfy.hold.set()
    worker.join()
    expect(badge).to_contain_text("Completed", timeout=10_000)

    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text("Cherry blossoms")


def test_gpu_page_configure_and_test_connection(page, live_server, staff, workflows, settings, shots):
    settings.VASTAI_API_KEY = ""
    log_in(page, live_server, username="carol", password="carol-pass-123", next_path="/gpu/")
    expect(page.get_by_role("heading", name="No GPU configured yet — configure one or rent one")).to_be_visible()
    shots(page, "gpu-empty")

    with ComfyUIDouble() as comfy, VastAIDouble() as vast:
        settings.VASTAI_API_KEY, settings.VASTAI_API_URL = vast.api_key, vast.url
        page.get_by_label("ComfyUI URL").fill("not a url")
        page.get_by_role("button", name="Save").click()
        expect(page.locator("#error-comfyui_url")).to_contain_text("must start with http:// or https://")
        assert GpuConfig.get().comfyui_url == ""
        page.get_by_label("ComfyUI URL").fill(comfy.url)
        page.get_by_role("button", name="Save").click()
        expect(page.get_by_text("GPU configuration saved.")).to_be_visible()
        assert GpuConfig.get().comfyui_url == comfy.url
        # The connection status loads after the page.
        expect(page.locator("#health")).to_contain_text("available (API ready)")
        expect(page.locator("#health")).to_contain_text("GPU: NVIDIA GeForce RTX 5090")
        page.get_by_role("button", name="Test connection").click()
        expect(page.locator("#test-result")).to_contain_text("ComfyUI is ready")
        page.get_by_label("URL to test").fill("http://127.0.0.1:9")
        page.get_by_role("button", name="Test connection").click()
        expect(page.locator("#test-result")).to_contain_text("Unreachable")

        # An instance running and the cheapest offers, as a rented GPU shows them.
        now = timezone.now()
        VastInstance.objects.create(vast_id=25000001, gpu_name="RTX 4090", dph_total=Decimal("0.345"),
                                    state=VastInstance.State.RUNNING, created_at=now - timedelta(minutes=47),
                                    ready_at=now - timedelta(minutes=40), last_busy_at=now - timedelta(minutes=6))
        page.reload()
        expect(page.locator("#instances tbody tr")).to_have_count(1)
        expect(page.locator("#instances")).to_contain_text("$0.35")
        page.get_by_role("button", name="Show the cheapest offers").click()
        expect(page.locator("#offers tbody tr").first).to_be_visible()
        expect(page.locator("#health")).to_contain_text("available (API ready)")
        page.get_by_label("URL to test").fill("")
        page.get_by_role("button", name="Test connection").click()
        expect(page.locator("#test-result")).to_contain_text("ComfyUI is ready")
        shots(page, "gpu")


def test_destroy_an_instance(page, live_server, staff, workflows, settings, monkeypatch):
    from gpu import lifecycle

    monkeypatch.setattr("django_q.tasks.async_task", lambda *args, **kw: None)
    with VastAIDouble(boot_seconds=None) as vast:
        settings.VASTAI_API_KEY, settings.VASTAI_API_URL = vast.api_key, vast.url
        config = GpuConfig.get()
        config.gpu_provider, config.default_workflow = "vastai", "smoke"  # smoke needs no model download
        config.save()
        instance = lifecycle.create_instance(offer_id=7310001, user=staff)
        assert vast.live_instances()
        log_in(page, live_server, username="carol", password="carol-pass-123", next_path="/gpu/")
        row = page.locator(f"#instance-{instance.id}")
        expect(row).to_contain_text(instance.gpu_name)
        page.once("dialog", lambda dialog: dialog.accept())
        row.get_by_role("button", name=re.compile("Destroy")).click()
        expect(page.locator("#instances")).to_contain_text("is being destroyed")
        instance.refresh_from_db()
        assert instance.state in (VastInstance.State.DESTROYING, VastInstance.State.DESTROYED)
        assert vast.live_instances() == []


def test_every_page_runs_under_the_csp_without_a_violation(page, live_server, staff, comfy):
    """Log in (with the admin's own form), then every page, the API docs and the admin: each answer
    carries the policy and Chromium reports no violation (the `page` fixture asserts that)."""
    resp = page.goto(f"{live_server.url}/admin/login/")
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    page.get_by_label("Username").fill("carol")
    page.get_by_label("Password").fill("carol-pass-123")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    for path, landmark in [("/", "Generate a video"), ("/jobs/", "Jobs"), ("/gpu/", "GPU"),
                           ("/account/", "Webhook signing secret"), ("/admin/gpu/gpuconfig/1/change/", None),
                           ("/api/docs", None)]:
        resp = page.goto(f"{live_server.url}{path}")
        policy = resp.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy and "object-src 'none'" in policy and "'unsafe-inline'" not in policy, path
        if landmark:
            expect(page.get_by_role("heading", name=landmark).first).to_be_visible()
    # htmx under the policy: the GPU page loads its health partial after render.
    page.goto(f"{live_server.url}/gpu/")
    expect(page.get_by_text("available (API ready)").first).to_be_visible()
    # Swagger UI (ninja's bundled copy) renders the operations under the policy.
    page.goto(f"{live_server.url}/api/docs")
    expect(page.get_by_text("/api/generate-video").first).to_be_visible()
    assert page.csp_violations == []


def test_use_an_instance_i_rented_see_its_cost_switch_auto_destroy_and_destroy_it(page, live_server, staff, workflows,
                                                                                  settings, monkeypatch, shots):
    from gpu import tunnel

    monkeypatch.setattr("django_q.tasks.async_task", lambda *args, **kw: None)
    with ComfyUIDouble(token="console-password") as comfy, VastAIDouble(comfyui_port=comfy.port) as vast:
        settings.VASTAI_API_KEY, settings.VASTAI_API_URL = vast.api_key, vast.url
        vast_id = vast.create_console_instance(web_password="console-password", label="my wan box", dph_base=0.412)
        vast.update_instance(vast_id, start_date=time.time() - 2 * 3600)
        old_url = vast.tunnel_url(vast_id)
        log_in(page, live_server, username="carol", password="carol-pass-123", next_path="/gpu/")

        form = page.locator("#adopt-form")
        form.get_by_label("vast.ai instance id").fill("31337")
        form.get_by_role("button", name="Use this instance").click()
        expect(page.locator("#error-adopt")).to_contain_text("vast.ai has no instance 31337 on this account")

        page.locator("#adopt-form").get_by_label("vast.ai instance id").fill(str(vast_id))
        page.locator("#adopt-form").get_by_label("Its Open URL").fill(old_url)
        page.locator("#adopt-form").get_by_role("button", name="Use this instance").click()
        expect(page.get_by_text(f"Using vast.ai instance {vast_id}: its cost is tracked here.")).to_be_visible()
        inst = VastInstance.objects.get(vast_id=vast_id)
        row = page.locator(f"#instance-{inst.id}")
        expect(row).to_contain_text("rented by you")
        expect(row).to_contain_text("$0.42")  # $/hour
        expect(row).to_contain_text("$0.8")  # two hours of it so far
        expect(row.locator(".auto-destroy")).to_contain_text("off")
        expect(page.locator("#adopted-report")).to_contain_text("i2v follows the tunnel: when its URL changes")
        expect(page.locator("#health")).to_contain_text("available (API ready)")  # with the instance's own password
        shots(page, "gpu-adopted")

        row.get_by_role("button", name=re.compile("Turn auto-destroy on")).click()
        expect(page.locator("#instances")).to_contain_text(f"Auto-destroy is on for instance {vast_id}")
        expect(page.locator(f"#instance-{inst.id} .auto-destroy")).to_contain_text("in ")  # the idle countdown
        inst.refresh_from_db()
        assert inst.auto_destroy

        # The tunnel rotates; a job finding the old URL dead makes i2v follow it; the page shows the new URL.
        new_url = vast.rotate_tunnel(vast_id)
        assert tunnel.follow_tunnel(old_url) == new_url
        page.reload()
        expect(page.locator("#connection-heading + dl")).to_contain_text(new_url)

        page.once("dialog", lambda dialog: dialog.accept())
        page.locator(f"#instance-{inst.id}").get_by_role("button", name=re.compile("Destroy")).click()
        expect(page.locator("#instances")).to_contain_text("is being destroyed")
        assert vast.instances[vast_id]["destroyed"] and vast.instances[vast_id]["label"] == "my wan box"
