"""Following the tunnel: when the quick-tunnel URL of a vast.ai instance stops answering, i2v reads
the new one from the instance's portal, switches the configuration, and waiting jobs go on there."""

import threading

import pytest

from generation import runner
from generation import tasks as job_tasks
from generation.models import VideoJob
from gpu import tunnel
from gpu.models import GpuConfig, GpuConfigChange, VastInstance
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)
from tests.gpu.vast_helpers import smoke_job

pytestmark = pytest.mark.django_db(transaction=True)
S = VideoJob.Status
PASSWORD = "console-web-password-2"


@pytest.fixture
def adopted(staff_api, policy, vast, comfy):
    """A console instance adopted with its tunnel URL as the configured ComfyUI URL."""
    comfy.placeholder, comfy.token = False, PASSWORD
    vast_id = vast.create_console_instance(web_password=PASSWORD, label="")
    resp = staff_api.post("/api/gpu/config", {"vastai_instance_id": vast_id, "comfyui_url": vast.tunnel_url(vast_id)})
    assert resp.status_code == 200, resp.content
    return VastInstance.objects.get(vast_id=vast_id)


@pytest.mark.parametrize("old", ["gone", "refused"])
def test_jobs_waiting_when_the_tunnel_rotates_switch_to_the_new_url_and_complete(adopted, vast, comfy, user, old,
                                                                                  vast_settings):
    old_url = vast.tunnel_url(adopted.vast_id)
    comfy.hold = threading.Event()
    first, second = smoke_job(user), smoke_job(user)
    assert job_tasks.schedule().startswith("bound 2")  # two slots on the configured URL: the adopted GPU
    job_tasks.run_job(str(first.id))
    job_tasks.run_job(str(second.id))
    comfy.wait_held()
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.comfyui_url == second.comfyui_url == old_url and first.instance == adopted  # its busy time

    new_url = vast.rotate_tunnel(adopted.vast_id, old=old)
    job_tasks.run_job(str(second.id))  # the old URL: 530 / error 1033, or refused

    config = GpuConfig.get()
    adopted.refresh_from_db()
    assert config.comfyui_url == new_url and adopted.comfyui_url == new_url
    change = GpuConfigChange.objects.get(field="comfyui_url", source="tunnel")
    assert (change.old_value, change.new_value) == (old_url, new_url)
    assert set(VideoJob.objects.values_list("comfyui_url", flat=True)) == {new_url}
    comfy.hold.set()
    vast_settings.I2V_FOLLOW_SLICE = 2  # slices long enough to upload the video
    for job in (first, second):
        for _ in range(40):
            if job_tasks.run_job(str(job.id)) == "done":
                break
        job.refresh_from_db()
        assert job.status == S.COMPLETED, job.error
        assert job.note == runner.TUNNEL_NOTE and job.instance == adopted and job.cost_usd > 0
        assert comfy.prompt_posts[job.prompt_id] == 1  # followed on, not submitted again
    assert vast.portal(adopted.vast_id).requests[-1].headers["Authorization"] == f"Bearer {PASSWORD}"


def test_the_portal_is_asked_once_however_many_jobs_find_the_url_dead(adopted, vast, comfy):
    old_url = vast.tunnel_url(adopted.vast_id)
    vast.tunnel(adopted.vast_id).gone()  # dead, and the portal still lists it (cloudflared restarting)
    asked = len(vast.portal(adopted.vast_id).requests)

    assert [tunnel.follow_tunnel(old_url) for _ in range(5)] == [None] * 5

    assert len(vast.portal(adopted.vast_id).requests) == asked + 1
    assert GpuConfig.get().comfyui_url == old_url and not GpuConfigChange.objects.filter(source="tunnel").exists()


def test_a_new_tunnel_where_comfyui_does_not_answer_is_not_taken(adopted, vast, comfy):
    old_url = vast.tunnel_url(adopted.vast_id)
    vast.rotate_tunnel(adopted.vast_id)
    comfy.placeholder = True  # the portal's "not ready" page, through the new tunnel and the direct port

    assert tunnel.follow_tunnel(old_url) is None
    assert GpuConfig.get().comfyui_url == old_url


def test_when_no_tunnel_answers_the_direct_port_is_used(adopted, vast, comfy):
    old_url = vast.tunnel_url(adopted.vast_id)
    vast.tunnel(adopted.vast_id).gone()
    vast.portal(adopted.vast_id).tokens = set()  # the portal no longer takes the token: ask vast.ai where it is

    new = tunnel.follow_tunnel(old_url)

    assert new == f"http://127.0.0.1:{comfy.port}" and GpuConfig.get().comfyui_url == new


def test_a_url_that_is_no_instances_is_not_followed(policy, vast, comfy):
    config = GpuConfig.get()
    config.comfyui_url = comfy.url
    config.save()

    assert tunnel.follow_tunnel(comfy.url) is None


def test_a_worker_that_found_the_old_url_dead_does_not_overwrite_the_switch_another_made(
        adopted, vast, comfy, user, vast_settings, monkeypatch):
    """Two workers meet the dead URL at once; one follows the tunnel while the other is still writing
    its "unreachable since …" note. The job keeps the switch's note and completes with it."""
    comfy.hold = threading.Event()
    first, second = smoke_job(user), smoke_job(user)
    assert job_tasks.schedule().startswith("bound 2")
    job_tasks.run_job(str(first.id))
    job_tasks.run_job(str(second.id))
    comfy.wait_held()
    new_url = vast.rotate_tunnel(adopted.vast_id)

    # The second worker: its own look at the portal comes back empty (the first worker is at it);
    # between reading the job and writing its note, the first worker switches every job over.
    follow = runner.follow_moved_tunnel
    monkeypatch.setattr(runner, "follow_moved_tunnel", lambda job: False)
    unreachable_note = runner.scheduler.unreachable_note

    def note_while_the_other_worker_switches(url, since, reason):
        follow(VideoJob.objects.get(pk=first.pk))
        return unreachable_note(url, since, reason)

    monkeypatch.setattr(runner.scheduler, "unreachable_note", note_while_the_other_worker_switches)
    monkeypatch.setattr(runner, "UNREACHABLE_PAUSE", 0)
    job_tasks.run_job(str(second.id))
    monkeypatch.undo()

    second.refresh_from_db()
    assert second.comfyui_url == new_url and second.note == runner.TUNNEL_NOTE
    comfy.hold.set()
    vast_settings.I2V_FOLLOW_SLICE = 2
    for _ in range(40):
        if job_tasks.run_job(str(second.id)) == "done":
            break
    second.refresh_from_db()
    assert second.status == S.COMPLETED and second.note == runner.TUNNEL_NOTE
