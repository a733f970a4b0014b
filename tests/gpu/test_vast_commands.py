"""Operator commands (vast_offers, vast_instances, vast_destroy, vast_reap, upload_models_to_r2) and the admin actions."""

import hashlib
import io
import os
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from gpu.models import ModelFile
from gpu import r2
from gpu.models import VastInstance
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)
from tests.gpu.vast_helpers import CHEAPEST_MATCHING, boot_to_ready, live_vast_ids, rent

pytestmark = pytest.mark.django_db
MiB = 1024 * 1024


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


# ---------------------------------------------------------------------- vast.ai commands


def test_vast_offers_lists_the_cheapest_matching_first(policy, vast):
    lines = run("vast_offers", "--limit", "3").splitlines()

    assert lines[0].split()[:3] == ["offer", "gpu", "vram"] and len(lines) == 4
    assert lines[1].split()[:4] == [str(CHEAPEST_MATCHING), "RTX", "4090", "24GB"] and "0.362" in lines[1]
    assert "Washington, US" in lines[1]


def test_vast_offers_without_an_api_key_says_what_to_set(policy, settings):
    settings.VASTAI_API_KEY = ""

    with pytest.raises(CommandError, match="set VASTAI_API_KEY"):
        run("vast_offers")


def test_vast_instances_shows_state_and_cost(policy, vast):
    instance = rent()
    VastInstance.objects.filter(pk=instance.pk).update(created_at=timezone.now() - timedelta(hours=1))

    out = run("vast_instances")

    row = next(line for line in out.splitlines() if str(instance.vast_id) in line)
    assert "creating" in row and "RTX 4090" in row and "$  0.36" in row and str(instance.id) in row
    assert "Spent today (UTC): $" in out and "of $20.00" in out
    assert instance.web_password not in out


def test_vast_destroy_by_vast_id_or_uuid(policy, vast):
    policy.max_instances = 2
    policy.save()
    a, b = rent(), rent()

    assert f"Instance {a.vast_id} is destroyed" in run("vast_destroy", str(a.vast_id))
    assert f"Instance {b.vast_id} is destroyed" in run("vast_destroy", str(b.id))
    assert live_vast_ids(vast) == []
    with pytest.raises(CommandError, match="No instance 999"):
        run("vast_destroy", "999")


def test_vast_reap_destroys_idle_instances_now(policy, vast, comfy):
    instance = boot_to_ready(rent(), vast, comfy)
    long_ago = timezone.now() - timedelta(hours=1)
    VastInstance.objects.filter(pk=instance.pk).update(created_at=long_ago, ready_at=long_ago)

    out = run("vast_reap")

    assert f"Destroyed idle instance {instance.vast_id}" in out and "Reconciled: nothing to do." in out
    assert live_vast_ids(vast) == []


# ---------------------------------------------------------------------- admin


def test_admin_rent_button_and_destroy_action(client, staff, policy, vast):
    client.force_login(staff)
    page = client.get(reverse("admin:gpu_vastinstance_changelist"))
    assert "Rent a GPU" in page.content.decode()
    assert "Rent a vast.ai GPU" in client.get(reverse("admin:gpu_gpuconfig_changelist"), follow=True).content.decode()

    resp = client.post(reverse("admin:gpu_vastinstance_rent"), follow=True)

    instance = VastInstance.objects.get()
    assert f"Rented vast.ai instance {instance.vast_id} (RTX 4090" in resp.content.decode()
    resp = client.post(reverse("admin:gpu_vastinstance_changelist"),
                       {"action": "destroy_selected", "_selected_action": [str(instance.pk)]}, follow=True)
    assert "Destroyed 1 instance(s)." in resp.content.decode()
    instance.refresh_from_db()
    assert instance.state == "destroyed" and live_vast_ids(vast) == []
    again = client.post(reverse("admin:gpu_vastinstance_rent"), follow=True)  # renting again after a destroy works
    assert "Rented vast.ai instance" in again.content.decode()


def test_admin_rent_at_the_limit_shows_why(client, staff, policy, vast):
    client.force_login(staff)
    rent()

    resp = client.post(reverse("admin:gpu_vastinstance_rent"), follow=True)

    assert "No instance rented: At the limit of 1 vast.ai instance" in resp.content.decode()


# ---------------------------------------------------------------------- upload_models_to_r2


@pytest.fixture
def model_dir(tmp_path, policy, r2_settings):
    """Local copies of every file of the manifest; the VAE is big enough for two multipart parts."""
    for model in ModelFile.objects.all():
        path = tmp_path / model.folder / model.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 9 * MiB if model.name == "wan21-vae" else 1000 + len(model.name)
        path.write_bytes(os.urandom(size))
    return tmp_path


def test_upload_models_to_r2_uploads_records_and_then_skips(model_dir, r2_settings):
    out = run("upload_models_to_r2", "--dir", str(model_dir))

    assert "Done: 5 uploaded, 0 already there, 0 not found." in out
    assert "uploading wan_2.1_vae.safetensors: 9.0/9.0 MiB (100%)" in out  # the progress line
    for model in ModelFile.objects.all():
        data = (model_dir / model.folder / model.filename).read_bytes()
        stored = r2_settings.get_object(Bucket="i2v-models", Key=model.r2_key)
        assert stored["Body"].read() == data and stored["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert (model.size, model.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    again = run("upload_models_to_r2", "--dir", str(model_dir))
    assert "Done: 0 uploaded, 5 already there, 0 not found." in again


def test_upload_models_to_r2_resumes_an_interrupted_upload(model_dir, r2_settings, monkeypatch):
    real_client = r2.client
    sent = []

    class DiesAfterOnePart:
        def __init__(self):
            self._s3 = real_client()

        def __getattr__(self, name):
            return getattr(self._s3, name)

        def upload_part(self, **kw):
            if sent:
                raise ConnectionResetError("the line dropped")
            sent.append(kw["PartNumber"])
            return self._s3.upload_part(**kw)

    monkeypatch.setattr(r2, "client", DiesAfterOnePart)
    with pytest.raises(CommandError, match="run the command again to resume"):
        run("upload_models_to_r2", "--only", "wan21-vae", "--dir", str(model_dir))
    assert sent == [1]
    monkeypatch.setattr(r2, "client", real_client)
    calls = []

    class Counting:
        def __init__(self):
            self._s3 = real_client()

        def __getattr__(self, name):
            return getattr(self._s3, name)

        def upload_part(self, **kw):
            calls.append(kw["PartNumber"])
            return self._s3.upload_part(**kw)

    monkeypatch.setattr(r2, "client", Counting)

    out = run("upload_models_to_r2", "--only", "wan_2.1_vae.safetensors", "--dir", str(model_dir))

    assert calls == [2] and "1 of 2 parts kept from an interrupted upload" in out
    data = (model_dir / "vae" / "wan_2.1_vae.safetensors").read_bytes()
    stored = r2_settings.get_object(Bucket="i2v-models", Key="models/vae/wan_2.1_vae.safetensors")
    assert stored["Body"].read() == data and stored["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert r2_settings.list_multipart_uploads(Bucket="i2v-models").get("Uploads", []) == []


def test_upload_models_to_r2_names_missing_and_unknown_models(policy, r2_settings, tmp_path):
    with pytest.raises(CommandError, match="No model 'nope' in the manifest; known: .*wan21-vae"):
        run("upload_models_to_r2", "--only", "nope", "--dir", str(tmp_path))
    with pytest.raises(CommandError, match="Not found: wan21-vae \\(expected at .*vae/wan_2.1_vae.safetensors\\)"):
        run("upload_models_to_r2", "--only", "wan21-vae", "--dir", str(tmp_path))


def test_upload_models_to_r2_without_r2_says_what_to_set(policy, settings):
    settings.R2_BUCKET = ""

    with pytest.raises(CommandError, match="R2 is not configured: set R2_BUCKET"):
        run("upload_models_to_r2")
