import copy
import json

import pytest

from generation.models import VideoJob, Workflow
from gpu.models import GpuConfig
from tests.doubles.comfyui import ComfyUIDouble


def workflow_form_data(wf, **changes):
    data = {"slug": wf.slug, "name": wf.name, "description": wf.description, "graph": json.dumps(wf.graph),
            "bindings": json.dumps(wf.bindings), "output_node": wf.output_node, "defaults": json.dumps(wf.defaults),
            "is_active": "on", "model_files": [m.pk for m in wf.model_files.all()]}
    data.update(changes)
    return data


def test_admin_refuses_workflow_with_dangling_link(client, staff):
    client.force_login(staff)
    wf = Workflow.objects.get(slug="smoke")
    graph = copy.deepcopy(wf.graph)
    graph["5"]["inputs"]["images"] = ["99", 0]
    resp = client.post(f"/admin/generation/workflow/{wf.pk}/change/", workflow_form_data(wf, graph=json.dumps(graph)))
    assert resp.status_code == 200
    assert "links to missing node 99" in resp.content.decode()
    wf.refresh_from_db()
    assert wf.graph["5"]["inputs"]["images"] != ["99", 0]


def test_admin_checks_workflow_against_the_configured_server(client, staff):
    client.force_login(staff)
    wf = Workflow.objects.get(slug="smoke")
    graph = copy.deepcopy(wf.graph)
    graph["5"]["inputs"]["fps"] = 500.0
    with ComfyUIDouble() as comfy:
        config = GpuConfig.get()
        config.comfyui_url = comfy.url
        config.save()
        resp = client.post(f"/admin/generation/workflow/{wf.pk}/change/", workflow_form_data(wf, graph=json.dumps(graph)))
    assert resp.status_code == 200
    assert "above the maximum 120" in resp.content.decode()


def test_admin_saves_a_valid_workflow_change(client, staff):
    client.force_login(staff)
    wf = Workflow.objects.get(slug="smoke")
    resp = client.post(f"/admin/generation/workflow/{wf.pk}/change/", workflow_form_data(wf, name="Smoke v2"))
    assert resp.status_code == 302
    wf.refresh_from_db()
    assert wf.name == "Smoke v2"


def test_admin_job_page_plays_the_video(client, staff):
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    job = VideoJob.objects.create(owner=staff, input_image="inputs/x.png", prompt="p", workflow_slug="smoke",
                                  width=64, height=64, frames=17, fps=8, status="completed")
    job.video.name = default_storage.save(f"videos/{job.id}.mp4", ContentFile(b"mp4"))
    job.save()
    client.force_login(staff)
    page = client.get(f"/admin/generation/videojob/{job.pk}/change/").content.decode()
    assert f'<video src="/jobs/{job.id}/video"' in page
    listing = client.get("/admin/generation/videojob/?status__exact=completed").content.decode()
    assert str(job.id) in listing
    # Every link on the page works: the input and the video go through the auth-checked views,
    # never to /media/ (which nothing serves), and "Video" is one field.
    assert "/media/" not in page
    assert f'href="/jobs/{job.id}/image"' in page and f'href="/jobs/{job.id}/video"' in page
    assert page.count(">Video:</label>") == 1
    assert client.get(f"/jobs/{job.id}/video").status_code == 200


def test_admin_names_webhook_deliveries_in_plain_english(client, staff):
    job = VideoJob.objects.create(owner=staff, input_image="inputs/x.png", prompt="p", workflow_slug="smoke",
                                  width=64, height=64, frames=17, fps=8)
    job.webhook_deliveries.create(attempt=1, url="https://example.com/hook", status_code=500)
    client.force_login(staff)
    page = client.get(f"/admin/generation/videojob/{job.pk}/change/").content.decode()
    assert "Webhook deliveries" in page and "deliverys" not in page.lower()
