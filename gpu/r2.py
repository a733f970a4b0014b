"""The one client for Cloudflare R2 (S3 API through boto3) outside django-storages.

Used for model files: presigned GET URLs that a vast.ai instance downloads from, the
short-lived provisioning script of an instance, and the resumable multipart upload of
`upload_models_to_r2`. Settings: R2_BUCKET, R2_ENDPOINT_URL (or R2_ACCOUNT_ID),
R2_ACCESS_KEY_ID, R2_SECRET_ACCESS_KEY.
Every failure is an R2Error whose message names what to fix; keys never appear in it.
"""

import hashlib
import math

from django.conf import settings

MiB = 1024 * 1024
MIN_PART = 8 * MiB  # boto3's default chunk; R2 wants 5 MiB..5 GiB parts, all equal but the last
MAX_PARTS = 10000
PRESIGN_MAX = 604800  # R2's longest presigned URL: 7 days


class R2Error(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


def configured() -> bool:
    return bool(settings.R2_BUCKET and settings.R2_ENDPOINT_URL)


def bucket() -> str:
    if not configured():
        raise R2Error("R2 is not configured: set R2_BUCKET and R2_ENDPOINT_URL (or R2_ACCOUNT_ID), R2_ACCESS_KEY_ID "
                      "and R2_SECRET_ACCESS_KEY")
    return settings.R2_BUCKET


def client():
    import boto3
    from botocore.config import Config

    bucket()
    return boto3.client(
        "s3",
        endpoint_url=settings.R2_ENDPOINT_URL,
        region_name="auto",
        aws_access_key_id=settings.R2_ACCESS_KEY_ID or None,
        aws_secret_access_key=settings.R2_SECRET_ACCESS_KEY or None,
        config=Config(**settings.R2_CLIENT_CONFIG),
    )


def _explain(exc, what) -> R2Error:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        hint = " (check R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY)" if code in ("AccessDenied", "InvalidAccessKeyId",
                                                                              "SignatureDoesNotMatch", 403) else ""
        return R2Error(f"R2 refused {what}: {code} {err.get('Message') or ''}".rstrip() + hint)
    if isinstance(exc, BotoCoreError):
        return R2Error(f"Cannot reach R2 at {settings.R2_ENDPOINT_URL} for {what}: {type(exc).__name__}")
    return R2Error(f"R2 failed {what}: {exc}")


def presigned_get(key, expires: int, *, s3=None) -> str:
    """A URL anyone can GET `key` with for `expires` seconds (capped at R2's 7 days)."""
    s3 = s3 or client()
    expires = max(60, min(int(expires), PRESIGN_MAX))
    return s3.generate_presigned_url("get_object", Params={"Bucket": bucket(), "Key": key}, ExpiresIn=expires)


def put_text(key, text: str, *, content_type="text/x-shellscript", s3=None) -> None:
    s3 = s3 or client()
    try:
        s3.put_object(Bucket=bucket(), Key=key, Body=text.encode(), ContentType=content_type)
    except Exception as exc:
        raise _explain(exc, f"storing {key}") from None


def delete(key, *, s3=None) -> None:
    s3 = s3 or client()
    try:
        s3.delete_object(Bucket=bucket(), Key=key)
    except Exception as exc:
        raise _explain(exc, f"deleting {key}") from None


def head(key, *, s3=None) -> dict | None:
    """The object's metadata, or None if it is not there."""
    from botocore.exceptions import ClientError

    s3 = s3 or client()
    try:
        return s3.head_object(Bucket=bucket(), Key=key)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404 or \
                exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _explain(exc, f"reading {key}") from None
    except Exception as exc:
        raise _explain(exc, f"reading {key}") from None


def file_sha256(path, progress=None, chunk=8 * MiB) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done)
    return digest.hexdigest()


def part_size_for(size: int) -> int:
    """Equal parts of a whole number of MiB, at least 8 MiB, at most 10,000 of them.

    Derived from the size alone, so a resumed upload cuts the file exactly as the
    interrupted one did."""
    return max(MIN_PART, math.ceil(size / MAX_PARTS / MiB) * MiB)


def upload_resumable(path, key, *, size, sha256, progress=None, s3=None) -> dict:
    """Multipart-upload a local file to `key`, continuing an interrupted upload of it.

    Parts that R2 already holds with the right size and MD5 (its part ETag) are kept;
    the rest are sent. The object carries its sha256 as metadata. `progress(sent, total)`
    is called after each part. Returns {"parts": n, "reused": n kept from before}.
    """
    s3 = s3 or client()
    name = bucket()
    part_size = part_size_for(size)
    count = max(1, math.ceil(size / part_size))
    try:
        upload_id, have = _resume_point(s3, name, key, part_size, size)
        if upload_id is None:
            upload_id = s3.create_multipart_upload(Bucket=name, Key=key, ContentType="application/octet-stream",
                                                   Metadata={"sha256": sha256})["UploadId"]
        parts, reused, sent = [], 0, 0
        with open(path, "rb") as fh:
            for number in range(1, count + 1):
                data = fh.read(part_size)
                md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
                etag = have.get(number)
                if etag is not None and etag.strip('"') == md5:
                    reused += 1
                else:
                    etag = s3.upload_part(Bucket=name, Key=key, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
                sent += len(data)
                if progress:
                    progress(sent, size)
        s3.complete_multipart_upload(Bucket=name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        # A resumed upload was started for an earlier version of the file: its sha256 metadata is stale.
        if (s3.head_object(Bucket=name, Key=key).get("Metadata") or {}).get("sha256") != sha256:
            s3.copy_object(Bucket=name, Key=key, CopySource={"Bucket": name, "Key": key}, Metadata={"sha256": sha256},
                           MetadataDirective="REPLACE", ContentType="application/octet-stream")
    except R2Error:
        raise
    except Exception as exc:
        raise _explain(exc, f"uploading {key}") from None
    return {"parts": count, "reused": reused}


def _resume_point(s3, name, key, part_size, size):
    """(upload id, {part number: etag}) of an unfinished upload of `key` cut like this one, else (None, {}).

    Unfinished uploads cut differently (another part size) are aborted: R2 needs equal parts."""
    uploads = [u for u in s3.list_multipart_uploads(Bucket=name, Prefix=key).get("Uploads", []) if u["Key"] == key]
    uploads.sort(key=lambda u: u.get("Initiated") or 0, reverse=True)
    chosen, have = None, {}
    for upload in uploads:
        if chosen is None:
            parts = {}
            listing = s3.list_parts(Bucket=name, Key=key, UploadId=upload["UploadId"])
            ok = True
            while True:
                for part in listing.get("Parts", []):
                    expected = min(part_size, size - (part["PartNumber"] - 1) * part_size)
                    if part["Size"] != expected:
                        ok = False
                    parts[part["PartNumber"]] = part["ETag"]
                if not listing.get("IsTruncated"):
                    break
                listing = s3.list_parts(Bucket=name, Key=key, UploadId=upload["UploadId"],
                                        PartNumberMarker=listing["NextPartNumberMarker"])
            if ok:
                chosen, have = upload["UploadId"], parts
                continue
        s3.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload["UploadId"])
    return chosen, have
