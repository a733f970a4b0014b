"""Renting, booting, destroying and reconciling vast.ai GPUs (gpu.offers, gpu.onstart, gpu.lifecycle,
gpu.reconciler), against the vast.ai and ComfyUI doubles over HTTP."""

import json
import logging
import subprocess
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from generation.models import Workflow
from gpu.models import ModelFile
from gpu import lifecycle, onstart, reconciler, tasks
from gpu import offers as vast_offers
from gpu.models import ApiPace, BadMachine, GpuConfig, VastInstance
from gpu.vastai import ENV_VALUE_MAX, ONSTART_MAX
from tests.conftest import free_port
from tests.gpu.vast_helpers import *  # noqa: F401,F403 (fixtures)
from tests.gpu.vast_helpers import CHEAPEST_MATCHING, NEXT_CHEAPEST, boot_to_ready, live_vast_ids, rent
from tests.helpers import StaticServer

pytestmark = pytest.mark.django_db
I = VastInstance.State


# ---------------------------------------------------------------------- offers


def test_search_offers_follow_the_policy_cheapest_first(policy, vast):
    offers = vast_offers.search_offers(limit=10)

    ids = [o["id"] for o in offers]
    assert ids[0] == CHEAPEST_MATCHING
    assert [o["dph_total"] for o in offers] == sorted(o["dph_total"] for o in offers)
    # Unverified, unreliable, slow-line, 12 GB and over-$1 offers are left out.
    assert not {7310002, 7310004, 7310006, 7310008, 7310010, 7310005} & set(ids)
    body = vast.requests_to("POST", "/bundles/")[-1].json
    assert body["gpu_ram"] == {"gte": 24000} and body["reliability"] == {"gte": 0.98}
    assert body["inet_down"] == {"gte": 500.0} and body["verified"] == {"eq": True}
    assert body["direct_port_count"] == {"gte": 4} and body["allocated_storage"] == 80.0


def test_search_offers_gpu_names_and_bad_machines_narrow_the_result(policy, vast):
    policy.gpu_names = "RTX 5090, RTX 4090"
    policy.save()
    BadMachine.objects.create(machine_id=41001, reason="exited last time")

    offers = [vast_offers.offer_json(o) for o in vast_offers.search_offers()]

    assert {o["gpu_name"] for o in offers} <= {"RTX 5090", "RTX 4090"}
    assert CHEAPEST_MATCHING not in {o["id"] for o in offers}
    assert offers[0] == {"id": NEXT_CHEAPEST, "gpu_name": "RTX 5090", "num_gpus": 1, "vram_gb": 31.8,
                         "dph": offers[0]["dph"], "reliability": 0.995, "location": "Prague, CZ", "inet_down": 850.0,
                         "machine_id": 41007, "verified": True}
    assert offers[0]["dph"] == 0.5647  # $0.548/h for the GPU + 80 GB of disk at $0.15/GB/month


# ---------------------------------------------------------------------- create


def test_create_instance_rents_the_cheapest_offer_with_password_ports_and_label(policy, vast, caplog):
    caplog.set_level(logging.DEBUG)
    instance = rent()

    assert instance.state == I.CREATING and instance.vast_id in live_vast_ids(vast)
    assert instance.offer_id == CHEAPEST_MATCHING and instance.gpu_name == "RTX 4090" and instance.machine_id == 41001
    assert instance.dph_total == Decimal("0.3617")  # $/hour with the disk
    body = vast.requests_to("PUT", f"/asks/{CHEAPEST_MATCHING}/")[-1].json
    env = body["env"]
    assert body["label"] == f"i2v:{instance.id}" and vast.instances[instance.vast_id]["label"] == instance.label
    assert env["WEB_PASSWORD"] == instance.web_password and len(instance.web_password) >= 24
    assert env["-p 8188:8188"] == "1" and env["-p 1111:1111"] == "1"
    assert env["OPEN_BUTTON_PORT"] == "1111" and env["OPEN_BUTTON_TOKEN"] == "1"
    assert "localhost:8188:18188" in env["PORTAL_CONFIG"] and env["PROVISIONING_SCRIPT"] == "file:///provisioning.sh"
    assert all(len(v) <= ENV_VALUE_MAX for v in env.values())
    assert body["image"] == policy.docker_image and body["disk"] == 80 and body["runtype"] == "jupyter_direct"
    onstart = body["onstart"]
    assert len(onstart) <= ONSTART_MAX and onstart.rstrip().endswith("entrypoint.sh")
    assert "cat > /provisioning.sh" in onstart and "ComfyUI-GGUF" in onstart
    # The password is never logged, never shown.
    assert instance.web_password not in caplog.text
    assert instance.web_password not in str(lifecycle.instance_json(instance))


def test_create_instance_without_api_key_says_what_to_set(policy, settings, vast):
    settings.VASTAI_API_KEY = ""

    with pytest.raises(lifecycle.ProvisioningError) as err:
        rent()

    assert "set VASTAI_API_KEY" in str(err.value) and err.value.status == 503
    assert vast.count("PUT", "/asks/*") == 0 and not VastInstance.objects.exists()


def test_create_instance_at_max_instances_is_refused(policy, vast):
    rent()

    with pytest.raises(lifecycle.ProvisioningError) as err:
        rent()

    assert "At the limit of 1 vast.ai instance" in str(err.value) and err.value.status == 409
    assert len(live_vast_ids(vast)) == 1


def test_create_instance_over_the_daily_spend_cap_is_refused(policy, vast):
    now = timezone.now()
    # An earlier rental today at $2/h (counted from midnight UTC at the earliest).
    VastInstance.objects.create(vast_id=1, state=I.DESTROYED, dph_total=Decimal("2"), created_at=now - timedelta(hours=1),
                                destroyed_at=now)
    spent = vast_offers.spend_today()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert spent == (Decimal(2) * Decimal((now - max(midnight, now - timedelta(hours=1))).total_seconds()) / 3600).quantize(Decimal("0.0001"))
    policy.max_daily_spend = spent + Decimal("0.30")  # less than an hour of the cheapest offer
    policy.save()

    with pytest.raises(lifecycle.ProvisioningError) as err:
        rent()

    assert "Daily spend cap" in str(err.value) and f"${spent:.2f} already spent" in str(err.value)
    assert vast.count("PUT", "/asks/*") == 0 and VastInstance.objects.count() == 1


def test_create_instance_takes_the_next_offer_when_one_vanishes(policy, vast):
    vast.fail_http(f"/asks/{CHEAPEST_MATCHING}/", status=410,
                   body={"success": False, "error": "no_such_ask", "msg": "error 410/3907: ask is no longer available"})

    instance = rent()

    assert instance.offer_id == NEXT_CHEAPEST and instance.gpu_name == "RTX 5090" and instance.machine_id == 41007
    assert vast.count("PUT", "/asks/*") == 2 and live_vast_ids(vast) == [instance.vast_id]


def test_create_instance_for_an_offer_outside_the_policy_is_refused(policy, vast):
    with pytest.raises(lifecycle.ProvisioningError) as err:
        rent(offer_id=7310008)  # a 12 GB RTX 3060

    assert "Offer 7310008 is not available or does not match the GPU policy" in str(err.value)
    assert "≥ 24 GB VRAM" in str(err.value) and vast.count("PUT", "/asks/*") == 0


def test_create_instance_with_no_matching_offer_says_to_widen_the_policy(policy, vast):
    policy.max_dph = Decimal("0.05")
    policy.save()

    with pytest.raises(lifecycle.ProvisioningError) as err:
        rent()

    assert "No vast.ai offer matches the GPU policy" in str(err.value) and "≤ $0.05/h" in str(err.value)


def test_models_without_r2_are_refused_before_renting(policy, vast):
    policy.default_workflow = "wan22-i2v"
    policy.save()

    with pytest.raises(lifecycle.ProvisioningError) as err:
        rent()

    assert "needs 5 model file(s)" in str(err.value) and "R2_BUCKET" in str(err.value)
    assert "upload_models_to_r2" in str(err.value)
    assert vast.count("PUT", "/asks/*") == 0 and not VastInstance.objects.exists()


def test_small_manifest_goes_inline_with_presigned_urls(policy, vast, r2_settings):
    policy.default_workflow = "wan22-i2v"
    policy.save()
    wf = Workflow.objects.get(slug="wan22-i2v")
    wf.model_files.set(ModelFile.objects.filter(name="wan21-vae"))
    ModelFile.objects.filter(name="wan21-vae").update(size=1234, sha256="ab" * 32)

    instance = rent()

    onstart = vast.requests_to("PUT", "/asks/*")[-1].json["onstart"]
    assert len(onstart) <= ONSTART_MAX and onstart.count("X-Amz-Signature=") == 1
    assert "/i2v-models/models/vae/wan_2.1_vae.safetensors?" in onstart
    assert "'vae/wan_2.1_vae.safetensors' '1234' '" + "ab" * 32 + "'" in onstart
    assert instance.provisioning_key == "" and "Contents" not in r2_settings.list_objects_v2(Bucket="i2v-models")


def test_large_manifest_goes_through_one_presigned_url_of_a_short_lived_script(policy, vast, comfy, r2_settings):
    policy.default_workflow = "wan22-i2v"
    policy.save()
    wf = Workflow.objects.get(slug="wan22-i2v")
    for n in range(4):  # more models than an onstart can hold presigned URLs for
        wf.model_files.add(ModelFile.objects.create(name=f"extra-{n}", filename=f"extra_{n}.safetensors", folder="loras",
                                                    r2_key=f"models/loras/extra_{n}.safetensors"))

    instance = rent()

    onstart = vast.requests_to("PUT", "/asks/*")[-1].json["onstart"]
    assert len(onstart) <= ONSTART_MAX and onstart.count("X-Amz-Signature=") == 1
    key = f"i2v/provisioning/{instance.id}.sh"
    assert instance.provisioning_key == key and key in onstart
    script = r2_settings.get_object(Bucket="i2v-models", Key=key)["Body"].read().decode()
    assert script.count("X-Amz-Signature=") == 9  # one presigned URL per model of the manifest
    assert "'unet/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf' '' ''" in script and "'loras/extra_3.safetensors'" in script
    # Once ready, the script (it holds presigned URLs) is deleted.
    boot_to_ready(instance, vast, comfy)
    assert "Contents" not in r2_settings.list_objects_v2(Bucket="i2v-models", Prefix="i2v/provisioning/")


def test_provisioning_script_downloads_checks_and_skips_models(policy, r2_settings, tmp_path):
    """The generated script, run by bash with curl against presigned URLs of a real S3 server."""
    good, bad = b"gguf weights " * 1000, b"vae weights " * 500
    import hashlib

    r2_settings.put_object(Bucket="i2v-models", Key="models/unet/a.gguf", Body=good)
    r2_settings.put_object(Bucket="i2v-models", Key="models/vae/b.safetensors", Body=bad)
    models = [
        ModelFile(name="a", filename="a.gguf", folder="unet", r2_key="models/unet/a.gguf", size=len(good),
                  sha256=hashlib.sha256(good).hexdigest()),
        ModelFile(name="b", filename="b.safetensors", folder="vae", r2_key="models/vae/b.safetensors", size=len(bad),
                  sha256="0" * 64),  # wrong on purpose
    ]
    urls = {m.name: onstart.r2.presigned_get(m.r2_key, 600) for m in models}
    script = tmp_path / "provisioning.sh"
    script.write_text(onstart.provisioning_script(models, urls))
    comfy_dir = tmp_path / "ComfyUI"
    (comfy_dir / "custom_nodes" / "ComfyUI-GGUF").mkdir(parents=True)  # already installed: no git clone
    env = {"PATH": "/usr/bin:/bin", "COMFYUI_DIR": str(comfy_dir), "HOME": str(tmp_path)}

    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)

    assert first.returncode == 1, first.stdout + first.stderr
    assert (comfy_dir / "models/unet/a.gguf").read_bytes() == good
    assert not (comfy_dir / "models/vae/b.safetensors").exists() and "b.safetensors has the wrong sha256" in first.stdout
    second = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert "unet/a.gguf is already there" in second.stdout


# ---------------------------------------------------------------------- wait until ready


def test_instance_boots_through_loading_and_the_portal_placeholder_to_ready(policy, vast, comfy):
    instance = rent()
    comfy.token = instance.web_password

    step = lifecycle.wait_until_ready(instance)
    assert not step.done and step.delay >= lifecycle.POLL_MIN
    instance.refresh_from_db()
    assert instance.state == I.CREATING and instance.actual_status == "" and instance.checked_at

    vast.advance(instance.vast_id, "loading")
    lifecycle.wait_until_ready(instance)
    instance.refresh_from_db()
    assert instance.state == I.LOADING and instance.actual_status == "loading" and "Pulling image" in instance.status_msg

    vast.advance(instance.vast_id, "running")
    assert not lifecycle.wait_until_ready(instance).done  # the container runs; ComfyUI is still provisioning
    instance.refresh_from_db()
    assert instance.state == I.LOADING and instance.status_msg.startswith("ComfyUI is still starting")
    assert comfy.count("GET", "/system_stats") == 1

    comfy.placeholder = False
    step = lifecycle.wait_until_ready(instance)
    instance.refresh_from_db()
    assert step.done and instance.state == I.RUNNING and instance.ready_at
    assert instance.comfyui_url == f"http://127.0.0.1:{comfy.port}"
    assert instance.status_msg.startswith("Ready")
    # Every ComfyUI call carried the instance's password (the double answers 401 otherwise).
    assert {r.headers.get("Authorization") for r in comfy.requests} == {f"Bearer {instance.web_password}"}


def test_wait_honours_a_429_from_vast(policy, vast):
    instance = rent()
    vast.rate_limit("/instances/*", method="GET", retry_after=7)

    step = lifecycle.wait_until_ready(instance)

    assert not step.done and step.delay == 7 and "rate-limiting" in step.message
    instance.refresh_from_db()
    assert instance.state == I.CREATING and instance.checked_at is None
    vast.advance(instance.vast_id, "loading")
    lifecycle.wait_until_ready(instance)
    instance.refresh_from_db()
    assert instance.state == I.LOADING


def test_ports_come_from_the_list_when_the_by_id_answer_lacks_them(policy, vast, comfy):
    vast.show_includes_ports = False
    instance = rent()

    ready = boot_to_ready(instance, vast, comfy)

    assert ready.comfyui_url == f"http://127.0.0.1:{comfy.port}" and vast.count("GET", "/api/v1/instances/") >= 1


def test_instance_that_exits_is_destroyed_and_replaced_on_another_machine(policy, vast):
    first = rent()
    vast.advance(first.vast_id, "exited")

    step = lifecycle.wait_until_ready(first)

    first.refresh_from_db()
    assert step.done and first.state == I.FAILED and first.destroyed_at
    assert "went exited on machine 41001" in first.error and "Error response from daemon" in first.error
    assert vast.instances[first.vast_id]["destroyed"]
    assert BadMachine.objects.filter(machine_id=41001).exists()
    second = VastInstance.objects.get(state=I.CREATING)
    assert second.attempt == 2 and second.machine_id != 41001 and second.offer_id == NEXT_CHEAPEST
    assert live_vast_ids(vast) == [second.vast_id]


def test_replacements_stop_after_three_dead_machines(policy, vast):
    policy.max_instances = 1
    policy.save()
    rent()
    for _ in range(lifecycle.MAX_BOOT_ATTEMPTS):
        row = VastInstance.objects.get(state=I.CREATING)
        vast.advance(row.vast_id, "offline")
        lifecycle.wait_until_ready(row)

    assert VastInstance.objects.filter(state=I.FAILED).count() == 3
    assert not VastInstance.objects.filter(state__in=VastInstance.LIVE).exists() and live_vast_ids(vast) == []
    assert BadMachine.objects.count() == 3


def test_boot_timeout_destroys_the_instance_and_fails_it(policy, vast):
    instance = rent()
    vast.advance(instance.vast_id, "loading")
    lifecycle.wait_until_ready(instance)
    VastInstance.objects.filter(pk=instance.pk).update(created_at=timezone.now() - timedelta(minutes=31))

    step = lifecycle.wait_until_ready(instance)

    instance.refresh_from_db()
    assert step.done and instance.state == I.FAILED and instance.destroyed_at
    assert "did not become ready within 30 minutes" in instance.error and "Pulling image" in instance.error
    assert live_vast_ids(vast) == [] and VastInstance.objects.count() == 1  # no replacement for a slow boot
    assert instance.cost_usd > 0


def test_ready_needs_the_workflow_model_files(policy, vast, comfy):
    policy.default_workflow = "wan22-i2v"
    policy.save()
    Workflow.objects.get(slug="wan22-i2v").model_files.clear()  # nothing to download; the graph still needs them
    comfy.models = {"vae": ["wan_2.1_vae.safetensors"]}
    instance = rent()
    vast.advance(instance.vast_id, "running")
    comfy.token, comfy.placeholder = instance.web_password, False

    step = lifecycle.wait_until_ready(instance)

    instance.refresh_from_db()
    assert not step.done and instance.state == I.LOADING and "waiting for model files" in instance.status_msg
    assert "unet_gguf/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf" in instance.status_msg
    VastInstance.objects.filter(pk=instance.pk).update(comfyui_seen_at=timezone.now() - timedelta(minutes=3))
    lifecycle.wait_until_ready(instance)
    instance.refresh_from_db()
    assert instance.state == I.FAILED and "ComfyUI started without 4 model file(s)" in instance.error
    assert live_vast_ids(vast) == []


def test_tunnel_from_the_portal_is_used_when_the_direct_port_is_closed(policy, vast, comfy):
    vast.comfyui_port = free_port()  # nothing listens there
    with StaticServer({"/get-all-quick-tunnels": (200, {"Content-Type": "application/json"},
                                                  f'[{{"targetUrl":"http://localhost:8188","tunnelUrl":"{comfy.url}"}},'
                                                  f'{{"targetUrl":"http://localhost:1111","tunnelUrl":"https://x"}}]'.encode())}) as portal:
        vast.portal_port = int(portal.url.rsplit(":", 1)[1])
        instance = boot_to_ready(rent(), vast, comfy)

    assert instance.comfyui_url == comfy.url and instance.portal_url == portal.url


def test_wrong_password_at_comfyui_fails_without_retrying(policy, vast, comfy):
    instance = rent()
    vast.advance(instance.vast_id, "running")
    comfy.token, comfy.placeholder = "not-the-instance-password", False

    assert lifecycle.wait_until_ready(instance).done

    instance.refresh_from_db()
    assert instance.state == I.FAILED and "rejected its WEB_PASSWORD" in instance.error
    assert live_vast_ids(vast) == [] and VastInstance.objects.count() == 1


def test_wait_task_hands_itself_back_until_ready(policy, vast, comfy, queued, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        instance = rent()
    assert ("gpu.tasks.wait_for_instance", str(instance.pk)) in queued  # enqueued by the rental
    queued.clear()

    assert tasks.wait_for_instance(str(instance.pk)) == "continued"
    assert queued == [("gpu.tasks.wait_for_instance", str(instance.pk))]
    vast.advance(instance.vast_id, "running")
    comfy.token, comfy.placeholder = instance.web_password, False
    assert tasks.wait_for_instance(str(instance.pk)) == "ready"
    assert tasks.wait_for_instance(str(instance.pk)) == "done"  # a duplicate delivery is harmless
    # Ready wakes the scheduler; the duplicate does nothing at all.
    assert queued == [("gpu.tasks.wait_for_instance", str(instance.pk)), ("generation.tasks.schedule",)]


# ---------------------------------------------------------------------- destroy, reap, reconcile


def test_destroy_is_idempotent_and_accepts_an_instance_vast_already_lost(policy, vast, comfy):
    instance = boot_to_ready(rent(), vast, comfy)

    lifecycle.destroy_instance(instance, "test")
    lifecycle.destroy_instance(instance, "test again")

    instance.refresh_from_db()
    assert instance.state == I.DESTROYED and instance.destroyed_at and instance.destroy_reason == "test"
    assert vast.count("DELETE", "/instances/*") == 1 and live_vast_ids(vast) == []
    other = rent()
    with lifecycle.vast_client() as client:
        client.destroy_instance(other.vast_id)  # destroyed outside i2v
    lifecycle.destroy_instance(other, "cleanup")
    other.refresh_from_db()
    assert other.state == I.DESTROYED and "vast.ai no longer had it" in other.status_msg


def test_destroy_while_vast_is_unreachable_stays_destroying_until_the_reconciler(policy, vast, settings):
    instance = rent()
    settings.VASTAI_API_URL = f"http://127.0.0.1:{free_port()}/api/v0"

    with pytest.raises(lifecycle.ProvisioningError) as err:
        lifecycle.destroy_instance(instance, "operator")

    assert err.value.status == 503 and "Cannot reach vast.ai" in str(err.value)
    instance.refresh_from_db()
    assert instance.state == I.DESTROYING and "will retry" in instance.status_msg
    settings.VASTAI_API_URL = vast.url
    report = reconciler.reconcile()
    instance.refresh_from_db()
    assert report["retried"] == [instance.vast_id] and instance.state == I.DESTROYED and live_vast_ids(vast) == []


def test_reconcile_destroys_unknown_and_known_destroyed_rentals_and_marks_vanished_rows(policy, vast):
    known = rent()
    with lifecycle.vast_client() as client:
        stray = client.create_instance(CHEAPEST_MATCHING + 4, image="x", disk_gb=10, env={}, onstart="",
                                       label="i2v:00000000-0000-0000-0000-000000000000")["id"]
        foreign = client.create_instance(NEXT_CHEAPEST, image="x", disk_gb=10, env={}, onstart="",
                                         label="someone-elses-box")["id"]
        zombie = client.create_instance(7310003, image="x", disk_gb=10, env={}, onstart="", label="i2v:zombie")["id"]
        client.destroy_instance(known.vast_id)  # gone behind our back
    dead_row = VastInstance.objects.create(vast_id=zombie, state=I.DESTROYED, destroyed_at=timezone.now())
    VastInstance.objects.filter(pk=known.pk).update(created_at=timezone.now() - timedelta(minutes=5))

    report = reconciler.reconcile()

    assert sorted(report["destroyed"]) == sorted([stray, zombie]) and report["marked_gone"] == [known.vast_id]
    assert live_vast_ids(vast) == [foreign]  # not labelled i2v: — not ours, left alone
    known.refresh_from_db()
    assert known.state == I.DESTROYED and "no longer has" in known.status_msg
    assert dead_row.pk and reconciler.reconcile() == {key: [] for key in report}
    with lifecycle.vast_client() as client:
        client.destroy_instance(foreign)


def _strays(vast, count, label="i2v:00000000-0000-0000-0000-000000000000") -> list[int]:
    """Rentals the database does not know, made behind the app's back."""
    offers = [vast.add_offer(7390000 + len(vast.offers) + n, "RTX 3060", 2.5)["id"] for n in range(count)]
    with lifecycle.vast_client() as client:
        return [client.create_instance(offer, image="x", disk_gb=10, env={}, onstart="", label=label)["id"] for offer in offers]


def test_reconcile_reads_every_page_of_the_v1_list_when_v0_is_gone(policy, vast, comfy):
    vast.v0_list_gone, vast.list_page_size = True, 2
    policy.max_instances = 3
    policy.save()
    ours = [boot_to_ready(rent(), vast, comfy) for _ in range(3)]
    strays = _strays(vast, 2)
    long_ago = timezone.now() - timedelta(minutes=5)
    VastInstance.objects.filter(pk__in=[i.pk for i in ours]).update(created_at=long_ago)

    report = reconciler.reconcile()

    assert sorted(report["destroyed"]) == sorted(strays) and report["marked_gone"] == []  # 5 instances, 3 pages
    assert sorted(live_vast_ids(vast)) == sorted(i.vast_id for i in ours)
    assert set(VastInstance.objects.values_list("state", flat=True)) == {I.RUNNING}
    pages = vast.requests_to("GET", "/api/v1/instances/")
    assert len(pages) == 3 and [p.query.get("after_token") for p in pages][0] is None
    assert vast.count("GET", "/instances/") == 0


def test_reconcile_changes_nothing_when_a_page_of_the_list_fails(policy, vast, comfy):
    vast.list_page_size = 2
    policy.max_instances = 3
    policy.save()
    ours = [boot_to_ready(rent(), vast, comfy) for _ in range(3)]
    stray = _strays(vast, 1)
    VastInstance.objects.update(created_at=timezone.now() - timedelta(minutes=5))
    vast.fail_list_page(2, times=10)  # page 2 (our third instance and the stray) cannot be read

    with pytest.raises(lifecycle.ProvisioningError) as err:
        reconciler.reconcile()

    assert err.value.transient and "Listing vast.ai instances failed" in str(err.value)
    assert set(VastInstance.objects.values_list("state", flat=True)) == {I.RUNNING}  # none believed gone
    assert sorted(live_vast_ids(vast)) == sorted([i.vast_id for i in ours] + stray)
    vast.fail_list_page(2, times=0)
    assert reconciler.reconcile()["destroyed"] == stray


def test_the_v0_list_is_read_only_when_vast_has_no_v1_list(policy, vast):
    vast.v1_list = False
    stray = _strays(vast, 1)

    assert reconciler.reconcile()["destroyed"] == stray
    assert vast.count("GET", "/api/v1/instances/") == 1 and vast.count("GET", "/instances/") == 1


def test_adopting_a_lost_rental_asks_for_its_label_only(policy, vast, queued):
    foreign = _strays(vast, 1, label="someone-elses-box")
    vast.lose_create_answers = 1  # vast.ai rents the machine, but its answer never arrives

    instance = rent()

    assert instance.vast_id in live_vast_ids(vast) and instance.state == I.CREATING
    lookups = vast.requests_to("GET", "/api/v1/instances/")
    assert [json.loads(r.query["select_filters"]) for r in lookups] == [{"label": {"eq": instance.label}}]
    with lifecycle.vast_client() as client:
        client.destroy_instance(foreign[0])


def test_reconcile_adopts_a_rental_whose_answer_was_lost(policy, vast, queued):
    vast.fail_http("/asks/*", status=502, body="bad gateway")  # the rental happens, the answer is lost...
    with pytest.raises(lifecycle.ProvisioningError):
        rent()
    row = VastInstance.objects.get()
    assert row.state == I.FAILED and row.vast_id is None  # ...and the double rented nothing: a 502 before creating
    assert live_vast_ids(vast) == []

    # A reservation whose rental did happen (the worker died before storing the id) is adopted by its label.
    orphan = VastInstance.objects.create(state=I.CREATING, web_password="x")
    with lifecycle.vast_client() as client:
        vast_id = client.create_instance(CHEAPEST_MATCHING, image="x", disk_gb=10, env={}, onstart="", label=orphan.label)["id"]
    report = reconciler.reconcile()
    orphan.refresh_from_db()
    assert report["adopted"] == [vast_id] and orphan.vast_id == vast_id and orphan.state == I.CREATING
    assert ("gpu.tasks.wait_for_instance", str(orphan.pk)) in queued


def test_reconcile_restarts_a_stalled_wait_and_fails_unconfirmed_reservations(policy, vast, queued):
    instance = rent()
    queued.clear()
    old = timezone.now() - timedelta(minutes=5)
    VastInstance.objects.filter(pk=instance.pk).update(created_at=old, checked_at=old)
    never = VastInstance.objects.create(state=I.CREATING, web_password="x", created_at=old)

    report = reconciler.reconcile()

    assert report["restarted_waits"] == [instance.vast_id] and report["failed_reservations"] == [str(never.pk)]
    assert queued == [("gpu.tasks.wait_for_instance", str(instance.pk))]
    never.refresh_from_db()
    assert never.state == I.FAILED and "never confirmed" in never.error


def test_schedules_for_costs_and_the_reconciler_exist():
    import importlib

    from django.apps import apps
    from django_q.models import Schedule

    importlib.import_module("gpu.migrations.0003_schedules").add(apps, None)
    importlib.import_module("gpu.migrations.0005_save_costs_schedule").forward(apps, None)
    # What `migrate` ran; again, as a re-run must not duplicate them.
    rows = {s.func: s for s in Schedule.objects.filter(func__startswith="gpu.tasks.")}
    assert set(rows) == {"gpu.tasks.save_costs", "gpu.tasks.reconcile"}
    assert all(s.schedule_type == "I" and s.minutes == 1 and s.repeats == -1 for s in rows.values())


def test_tasks_do_nothing_without_an_api_key(settings, db):
    settings.VASTAI_API_KEY = ""

    assert tasks.reconcile() == "vast.ai is not configured"


def test_calls_to_one_vast_endpoint_are_spaced_by_its_interval_across_clients(policy, vast, settings):
    settings.VASTAI_PACE_SCALE = 0.25  # show: 2 s apart at vast.ai, 0.5 s here
    instance = rent()
    first, second = lifecycle.vast_client(), lifecycle.vast_client()  # they share nothing but the database

    for client in (first, second, first, second):
        client.show_instance(instance.vast_id)

    times = [r.at for r in vast.requests_to("GET", "/instances/*")]
    # Measured where the requests arrive: allow 50 ms for one of them to be delivered late (a
    # loaded machine); unspaced, they would arrive within a few ms of each other.
    assert len(times) == 4 and min(b - a for a, b in zip(times, times[1:])) >= 0.5 - 0.05
    assert ApiPace.objects.get(endpoint="show").next_at > 0
    first.close()
    second.close()
