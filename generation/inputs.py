"""Validation of what a user sends to generate a video: the image and the parameters."""

import io
import math
import warnings
from datetime import datetime, timedelta, timezone
from typing import Literal, Optional, Union

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpu import netguard

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MAX_SEED = 2**63 - 1
MAX_DEADLINE_SECONDS = 7 * 86400


class InputError(ValueError):
    """Bad input; `field` names what to fix."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _no_control_chars(value: str, allow_newlines=True) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


class GenerateParams(BaseModel):
    """The fields of a generate request (multipart form fields or JSON)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    backend: Literal["comfyui", "fal"] = "comfyui"
    workflow: str = Field(default="", max_length=64)
    width: Optional[int] = Field(default=None, ge=16, le=1280)
    height: Optional[int] = Field(default=None, ge=16, le=1280)
    frames: Optional[int] = Field(default=None, ge=17, le=161)
    fps: Optional[int] = Field(default=None, ge=1, le=60)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    steps: Optional[int] = Field(default=None, ge=1, le=100)
    image_url: Optional[str] = Field(default=None, max_length=2000)
    webhook_url: Optional[str] = Field(default=None, max_length=2000)
    # Finish by then if any place can: seconds from now, or an ISO 8601 time.
    deadline: Optional[Union[float, datetime]] = None

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value):
        if value is None:
            return None
        now = datetime.now(timezone.utc)
        if isinstance(value, datetime):
            value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
            seconds = (value - now).total_seconds()
        else:
            seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError("must be in the future: seconds from now (e.g. 600) or a time such as 2026-12-01T18:00:00Z")
        if seconds > MAX_DEADLINE_SECONDS:
            raise ValueError(f"must be within {MAX_DEADLINE_SECONDS // 86400} days")
        return now + timedelta(seconds=seconds)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value):
        return _no_control_chars(value)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value):
        if value is not None and value % 16:
            raise ValueError(f"must be a multiple of 16 (got {value}; try {max(16, round(value / 16) * 16)})")
        return value

    @field_validator("frames")
    @classmethod
    def _four_n_plus_one(cls, value):
        if value is not None and (value - 1) % 4:
            raise ValueError(f"must be 4n+1, e.g. 17, 33, 49, 81 (got {value})")
        return value

    @field_validator("image_url", "webhook_url")
    @classmethod
    def _http_url(cls, value):
        if value in (None, ""):
            return None
        from gpu.urls_check import validate_service_url

        return validate_service_url(value) if "://" in value else _raise("must be an http(s) URL")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_reachable(cls, value):
        # Refused now rather than at the job's end; the delivery checks again when it connects.
        return netguard.check_url(value) if value else value


def _raise(message):
    raise ValueError(message)


def check_image(data: bytes, field="image") -> tuple[str, int, int]:
    """Decode `data` as PNG, JPEG or WEBP within the limits; returns (extension, width, height)."""
    if not data:
        raise InputError(field, "the file is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(field, f"the file is {len(data) / 1e6:.1f} MB; the limit is 20 MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                width, height = img.size
                if fmt not in FORMATS:
                    raise InputError(field, f"{fmt or 'this'} images are not supported; send a PNG, JPEG or WEBP")
                # The header's size is checked before any pixel is decoded (decompression bombs).
                if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                    raise InputError(field, f"the image is {width}×{height}; the limit is {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE}")
                img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(field, f"the image is too large to decode; the limit is {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(field, "not a readable PNG, JPEG or WEBP image: the file is not a picture, or it is damaged")
    return FORMATS[fmt], width, height


def clean_image(data: bytes, field="image") -> tuple[bytes, str]:
    """Check `data` (check_image) and re-encode it without metadata: EXIF (GPS position, camera,
    time), XMP, ICC and text chunks are dropped, after the EXIF orientation is applied to the
    pixels so the picture still stands the right way up. Returns (bytes, extension)."""
    ext, _, _ = check_image(data, field)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
    out = io.BytesIO()
    if ext == "jpg":
        if upright.mode not in ("RGB", "L", "CMYK"):
            upright = upright.convert("RGB")
        upright.save(out, format="JPEG", quality=95, subsampling=0)
    elif ext == "webp":
        upright.save(out, format="WEBP", lossless=True)
    else:
        upright.save(out, format="PNG")
    return out.getvalue(), ext


def fetch_image(url: str) -> bytes:
    """Download an image from a user-supplied URL through the SSRF guard, at most 20 MB."""
    try:
        with netguard.http_client(timeout=httpx.Timeout(15.0, connect=5.0), follow_redirects=True, max_redirects=5) as http:
            with http.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise InputError("image_url", f"the server answered HTTP {resp.status_code}")
                chunks, total = [], 0
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > MAX_IMAGE_BYTES:
                        raise InputError("image_url", "the image is larger than 20 MB")
                    chunks.append(chunk)
                return b"".join(chunks)
    except InputError:
        raise
    except httpx.HTTPError as exc:
        reason = netguard.blocked_reason(exc)
        if reason:
            raise InputError("image_url", reason)
        if isinstance(exc, httpx.TimeoutException):
            raise InputError("image_url", "the image server did not answer in time")
        if isinstance(exc, httpx.TooManyRedirects):
            raise InputError("image_url", "too many redirects")
        if isinstance(exc, httpx.ConnectError):
            raise InputError("image_url", "could not connect to the image's server; check the URL")
        if isinstance(exc, httpx.RemoteProtocolError):
            raise InputError("image_url", "the image's server closed the connection before sending the image")
        raise InputError("image_url", "the download of the image failed; check the URL")
