"""Hostile input against POST /api/generate-video (and the generate form at /): each one is a 4xx
with a message a person can act on, and nothing is stored: no VideoJob row, no file under
media/inputs, no task queued. The basic cases (empty / non-image / truncated / bomb / SVG files,
file:// gopher:// and metadata URLs, a redirect to the metadata address, NUL bytes, negative and
2**63 seeds) live in tests/generation/test_generate_api.py; this file adds the rest."""

import io
import socket
import zipfile

import pytest
from django.conf import settings

from generation.models import VideoJob
from tests.generation.test_generate_api import _bomb, post_image
from tests.helpers import StaticServer, png_bytes


@pytest.fixture
def enqueued(monkeypatch):
    calls = []
    monkeypatch.setattr("django_q.tasks.async_task", lambda func, *args, **kw: calls.append((func, args)))
    return calls


def stored_inputs():
    """The job input files. (inputs/pending/ is the form's by-design hold of a *valid* upload across
    a re-render with another field's error, so the user need not choose the file again.)"""
    inputs = settings.MEDIA_ROOT / "inputs"
    return sorted(p.name for p in inputs.iterdir() if p.is_file()) if inputs.exists() else []


@pytest.fixture
def nothing_stored(db, enqueued):
    """Asserts, after the test, that the request left no job, no input file and no task."""
    before = stored_inputs()
    yield
    assert VideoJob.objects.count() == 0
    assert stored_inputs() == before
    assert enqueued == []


def _zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("evil.html", "<script>alert(1)</script>")
    return buf.getvalue()


def _noisy_png_cut_in_half():
    import os

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
TEN_MB = "x" * (10 * 1024 * 1024)


@pytest.mark.parametrize("image, filename, words", [
    (b"MZ\x90\x00" + b"\x00" * 200, "in.png", "not a readable"),          # an .exe renamed .png
    (HTML, "in.png", "not a readable"),                                   # HTML renamed .png
    (b"", "in.png", "empty"),
    (_noisy_png_cut_in_half(), "in.png", "not a readable"),               # cut in the middle of the pixels
    (_bomb(), "bomb.png", "limit is 4096"),
    (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>", "x.svg", "not a readable"),
    (HTML + png_bytes(), "in.png", "not a readable"),                     # polyglot: HTML first
    (_zip() + png_bytes(), "in.png", "not a readable"),                   # polyglot: zip first
], ids=["exe", "html", "zero-byte", "truncated", "bomb", "svg-script", "html-then-png", "zip-then-png"])
def test_hostile_image_file_is_422(api, nothing_stored, image, filename, words):
    resp = post_image(api, {}, image, filename=filename)
    assert resp.status_code == 422, resp.content
    detail = resp.json()["detail"]
    assert detail.startswith("image:") and words in detail, detail


def test_polyglot_png_with_trailing_html_and_zip_is_accepted_as_a_png(api, client, user, enqueued):
    """A PNG followed by HTML and a zip *is* a PNG: Pillow decodes every pixel, so refusing it would
    refuse real files some tools write (trailing metadata). What keeps it harmless: the stored
    name comes from the decoded format (`.png`, never the uploaded name), it is served back as
    image/png with `nosniff`, and ComfyUI only reads the pixels."""
    data = png_bytes() + HTML + _zip()
    resp = post_image(api, {}, data, filename="evil.html")
    assert resp.status_code == 202, resp.content
    job = VideoJob.objects.get(pk=resp.json()["id"])
    assert job.input_image.name.endswith(".png") and "evil" not in job.input_image.name
    client.force_login(user)
    served = client.get(f"/jobs/{job.pk}/image")
    assert served.status_code == 200
    assert served["Content-Type"] == "image/png" and served["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("field, value, words", [
    ("width", "-16", "greater than or equal to 16"),
    ("height", str(10**30), "less than or equal to 1280"),
    ("frames", "-1", "greater than or equal to 17"),
    ("fps", str(2**64), "less than or equal to 60"),
    ("steps", "-5", "greater than or equal to 1"),
    ("steps", "1e308", "valid integer"),
    ("seed", str(-2**63), "greater than or equal to 0"),
    ("seed", "9" * 5000, "seed"),
    ("width", "NaN", "valid integer"),
    ("negative_prompt", "a\x00b", "NUL"),
    ("workflow", "../../etc/passwd", "workflow"),
], ids=lambda v: v if len(str(v)) < 20 else str(v)[:12] + "…")
def test_hostile_number_or_text_field_is_422(api, nothing_stored, field, value, words):
    resp = post_image(api, {field: value}, png_bytes())
    assert resp.status_code == 422, resp.content
    detail = resp.json()["detail"]
    assert detail.startswith(field) and words in detail, detail


@pytest.mark.parametrize("width", [-16, 10**30, 1e308, float("1e400") if False else 1e300])
def test_hostile_json_numbers_are_422(api, nothing_stored, width):
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": "http://x.test/a.png",
                                            "width": width})
    assert resp.status_code == 422, resp.content
    assert resp.json()["detail"].startswith("width")


def test_json_infinity_and_nan_literals_are_422(api, nothing_stored):
    for literal in ("Infinity", "NaN", "1e400"):
        body = '{"prompt": "x", "workflow": "smoke", "image_url": "http://x.test/a.png", "width": %s}' % literal
        resp = api.client.post("/api/generate-video", data=body, content_type="application/json",
                               headers={"Authorization": f"Bearer {api.key}"})
        assert resp.status_code in (400, 422), (literal, resp.content)
        assert resp.json()["detail"]


def test_ten_megabyte_prompt_multipart_is_4xx_with_a_message(api, nothing_stored):
    resp = post_image(api, {"prompt": TEN_MB}, png_bytes())
    assert resp.status_code == 422 and resp.json()["detail"] == "prompt: String should have at most 2000 characters"


def test_ten_megabyte_prompt_json_is_4xx_with_a_message(api, nothing_stored):
    resp = api.post("/api/generate-video", {"prompt": TEN_MB, "workflow": "smoke", "image_url": "http://x.test/a.png"})
    assert resp.status_code == 422 and resp.json()["detail"] == "prompt: String should have at most 2000 characters"


def test_nul_bytes_in_json_prompt_are_422(api, nothing_stored):
    resp = api.post("/api/generate-video", {"prompt": "a\u0000b", "workflow": "smoke", "image_url": "http://x.test/a.png"})
    assert resp.status_code == 422 and "NUL" in resp.json()["detail"]


def test_nul_in_idempotency_key_is_rejected(api, nothing_stored):
    # Django's test client refuses a raw NUL in a header; a control character takes its place.
    resp = post_image(api, {}, png_bytes(), headers={"Idempotency-Key": "a\x07b"})
    assert resp.status_code == 422 and "Idempotency-Key" in resp.json()["detail"]


@pytest.mark.parametrize("url, words", [
    ("file:///etc/passwd", "http"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "http"),
    ("http://169.254.169.254/latest/meta-data/iam/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://2852039166/", "four decimal numbers"),  # 169.254.169.254 as one decimal number
    ("ftp://example.com/a.png", "http"),
    ("javascript:alert(1)", "http"),
])
def test_hostile_image_url_is_422(api, nothing_stored, url, words):
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": url})
    assert resp.status_code == 422, resp.content
    detail = resp.json()["detail"]
    assert detail.startswith("image_url") and words in detail, detail


def test_redirect_to_metadata_via_dns_name_is_422(api, nothing_stored, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *args, **kw):
        if host == "metadata.attacker.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with StaticServer({"/r": (302, {"Location": "http://metadata.attacker.test/latest/"}, b"")}) as srv:
        resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke", "image_url": f"{srv.url}/r"})
    assert resp.status_code == 422, resp.content
    assert "link-local" in resp.json()["detail"]


def test_dns_name_resolving_to_link_local_is_422(api, nothing_stored, monkeypatch):
    calls = []

    def fake(host, port, *args, **kw):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port or 80))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    resp = api.post("/api/generate-video", {"prompt": "x", "workflow": "smoke",
                                            "image_url": "http://images.attacker.test/cat.png"})
    assert resp.status_code == 422, resp.content
    assert resp.json()["detail"].startswith("image_url") and "link-local" in resp.json()["detail"]
    assert "images.attacker.test" in calls


def test_right_to_left_unicode_is_text_stored_verbatim_and_rendered_escaped(api, client, user, enqueued):
    prompt = "\u202e<script>alert(1)</script>\u202c مرحبا \u200f🐉"
    resp = post_image(api, {"prompt": prompt}, png_bytes())
    assert resp.status_code == 202, resp.content
    assert resp.json()["prompt"] == prompt
    job = VideoJob.objects.get(pk=resp.json()["id"])
    assert job.prompt == prompt
    client.force_login(user)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "\u202e&lt;script&gt;alert(1)&lt;/script&gt;\u202c مرحبا" in page
    assert "<script>alert(1)" not in page


# The generate form at / takes the same checks and shows the message next to the field.

@pytest.mark.parametrize("fields, image, words", [
    ({}, b"this is not an image", "not a readable"),
    ({}, b"", "empty"),
    ({}, _bomb(), "limit is 4096"),
    ({"prompt": "a\x00b"}, png_bytes(), "NUL"),
    ({"width": "-16"}, png_bytes(), "16"),
    ({"seed": str(10**30)}, png_bytes(), "seed"),
])
def test_form_refuses_hostile_input_with_a_message(client, user, nothing_stored, fields, image, words):
    client.force_login(user)
    data = {"prompt": "a dragon", "model": "comfyui:smoke", **fields, "image": io.BytesIO(image)}
    data["image"].name = "in.png"
    resp = client.post("/generate", data)
    assert resp.status_code == 422, resp.status_code
    assert words.lower() in resp.content.decode().lower()


def test_form_ten_megabyte_prompt_is_4xx(client, user, nothing_stored):
    client.force_login(user)
    data = {"prompt": TEN_MB, "model": "comfyui:smoke", "image": io.BytesIO(png_bytes())}
    data["image"].name = "in.png"
    resp = client.post("/generate", data)
    assert resp.status_code == 422, resp.status_code
    assert "at most 2000 characters" in resp.content.decode()


def test_gpu_config_explicit_null_provider_is_not_a_500(staff_api):
    """Found by schemathesis: `{"gpu_provider": null}` hit the NOT NULL column (500). Null leaves it as it is."""
    before = staff_api.get("/api/gpu/config").json()["gpu_provider"]
    resp = staff_api.post("/api/gpu/config", {"gpu_provider": None})
    assert resp.status_code == 200, resp.content
    assert resp.json()["gpu_provider"] == before
