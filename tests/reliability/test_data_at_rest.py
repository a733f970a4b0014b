"""Data at rest: the data directory and everything in it belong to the server's user alone; the
ComfyUI token and vast.ai instance passwords are stored encrypted (existing ones encrypted by the
migration); uploaded images lose their metadata (GPS position, camera) before they are stored."""

import io
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection
from PIL import Image

from generation.models import VideoJob
from gpu.models import GpuConfig, VastInstance
from tests.generation.test_generate_api import post_image
from tests.reliability.test_hostile_inputs import enqueued  # noqa: F401 -- fixture

ROOT = Path(__file__).resolve().parents[2]


def manage(data_dir, *args, code=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL", "REDIS_URL", "I2V_"))}
    env.update(I2V_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="i2v.settings")
    cmd = [sys.executable, "manage.py", *args] + (["-c", code] if code else [])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_data_dir_is_private(tmp_path):
    data = tmp_path / "var"
    manage(data, "migrate", "-v0")
    manage(data, "shell", code="from django.core.files.storage import default_storage as s; "
                               "from django.core.files.base import ContentFile; s.save('inputs/a.png', ContentFile(b'x'))")
    assert mode(data) == 0o700 and mode(data / "media") == 0o700
    for name in ("db.sqlite3", "secret_key"):
        assert mode(data / name) == 0o600, name
    assert mode(data / "media" / "inputs") == 0o700 and mode(data / "media" / "inputs" / "a.png") == 0o600
    assert not [p for p in data.rglob("*") if mode(p) & 0o077]  # nothing readable by group or others


def test_files_left_readable_from_before_are_closed_at_start(tmp_path):
    data = tmp_path / "var"
    manage(data, "migrate", "-v0")
    (data / "db.sqlite3").chmod(0o644)
    data.chmod(0o755)
    manage(data, "check")
    assert mode(data) == 0o700 and mode(data / "db.sqlite3") == 0o600


def test_media_saved_in_process_is_owner_only(db):
    name = default_storage.save("videos/clip.mp4", ContentFile(b"\x00" * 10))
    assert mode(Path(default_storage.path(name))) == 0o600


def raw(table, column):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table}")
        return [row[0] for row in cursor.fetchall()]


def test_comfyui_token_and_instance_password_are_encrypted_at_rest(db):
    config = GpuConfig.get()
    config.comfyui_token = "tok-3f9c2a7d5e"
    config.save()
    VastInstance.objects.create(web_password="pw-8b1e4c6a2f")
    assert "tok-3f9c2a7d5e" not in raw("gpu_gpuconfig", "comfyui_token")[0]
    assert "pw-8b1e4c6a2f" not in raw("gpu_vastinstance", "web_password")[0]
    assert GpuConfig.get().comfyui_token == "tok-3f9c2a7d5e"
    assert VastInstance.objects.get().web_password == "pw-8b1e4c6a2f"


def test_the_migration_encrypts_tokens_stored_in_plain_text(tmp_path):
    data = tmp_path / "var"
    manage(data, "migrate", "gpu", "0006", "-v0")
    manage(data, "migrate", "i2v", "-v0")
    manage(data, "shell", code="from gpu.models import GpuConfig; GpuConfig.get()")
    with sqlite3.connect(data / "db.sqlite3") as db:
        db.execute("UPDATE gpu_gpuconfig SET comfyui_token = 'plain-tok-51c0'")
    manage(data, "migrate", "-v0")
    with sqlite3.connect(data / "db.sqlite3") as db:
        stored = db.execute("SELECT comfyui_token FROM gpu_gpuconfig").fetchone()[0]
    assert stored and "plain-tok-51c0" not in stored
    out = manage(data, "shell", code="from gpu.models import GpuConfig; print(GpuConfig.get().comfyui_token)")
    assert out.strip().endswith("plain-tok-51c0")


def _jpeg_with_gps_upside_down():
    img = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6                       # Orientation: rotate 90° to display
    exif[0x010F] = "SpyCam-7731"            # Make
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPS IFD
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _png_with_text():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "home: 48.8582N 2.2945E")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 90, 200)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_uploaded_jpeg_is_stored_upright_without_exif(api, enqueued):
    original = _jpeg_with_gps_upside_down()
    assert b"SpyCam-7731" in original
    resp = post_image(api, {}, original, filename="in.jpg")
    assert resp.status_code == 202, resp.content
    stored = VideoJob.objects.get().input_image.read()
    assert b"SpyCam-7731" not in stored and b"Exif" not in stored
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == "JPEG" and dict(img.getexif()) == {}
        assert img.size == (32, 64)  # the orientation was applied to the pixels


def test_uploaded_png_loses_its_text_chunks(api, enqueued):
    resp = post_image(api, {}, _png_with_text())
    assert resp.status_code == 202, resp.content
    stored = VideoJob.objects.get().input_image.read()
    assert b"48.8582N" not in stored
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == "PNG" and not img.text and img.getpixel((5, 5)) == (0, 90, 200)


def test_image_from_the_generate_page_is_stored_without_exif(client, user, enqueued):
    client.force_login(user)
    image = io.BytesIO(_jpeg_with_gps_upside_down())
    image.name = "photo.jpg"
    resp = client.post("/generate", {"prompt": "a cat", "model": "comfyui:smoke", "image": image, "form_key": "k1"})
    assert resp.status_code in (200, 302), resp.content[:500]
    stored = VideoJob.objects.get().input_image.read()
    assert b"SpyCam-7731" not in stored


def test_encrypted_values_survive_a_key_change_with_the_old_key_as_fallback(db, settings):
    config = GpuConfig.get()
    config.comfyui_token = "tok-rotated-91ad"
    config.save()
    old_key = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-secret-key-" + "x" * 40, [old_key]
    assert GpuConfig.get().comfyui_token == "tok-rotated-91ad"
    settings.SECRET_KEY_FALLBACKS = []
    assert GpuConfig.get().comfyui_token == ""  # unreadable: to be entered again, not a crash
