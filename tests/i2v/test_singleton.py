import pytest

from gpu.models import GpuConfig


def test_gpuconfig_is_a_single_row(db):
    first = GpuConfig.get()
    second = GpuConfig(comfyui_url="http://127.0.0.1:8188")
    second.save()
    assert GpuConfig.objects.count() == 1
    assert GpuConfig.get().pk == first.pk
    assert GpuConfig.get().comfyui_url == "http://127.0.0.1:8188"


def test_gpuconfig_cannot_be_deleted(db):
    config = GpuConfig.get()
    with pytest.raises(ValueError):
        config.delete()
    assert GpuConfig.objects.count() == 1


def test_gpuconfig_admin_is_one_page(client, staff):
    client.force_login(staff)
    resp = client.get("/admin/gpu/gpuconfig/")
    assert resp.status_code == 302
    assert resp["Location"].endswith(f"/admin/gpu/gpuconfig/{GpuConfig.get().pk}/change/")
    page = client.get(resp["Location"]).content.decode()
    assert "Test connection" in page
    assert client.get("/admin/gpu/gpuconfig/add/").status_code == 403


def test_gpuconfig_admin_token_is_write_only(client, staff):
    config = GpuConfig.get()
    config.comfyui_token = "s3cret-token-value"
    config.save()
    client.force_login(staff)
    page = client.get(f"/admin/gpu/gpuconfig/{config.pk}/change/").content.decode()
    assert "s3cret-token-value" not in page
    assert "Currently set" in page
