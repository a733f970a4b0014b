import os
import re

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.files.storage import default_storage
from django.http import FileResponse, Http404, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from generation.models import VideoJob
from i2v.auth import bearer_user


def _get_job_for_user(user, job_id):
    """The job if `user` may see it (owner or staff); 404 otherwise, so ids don't leak."""
    qs = VideoJob.objects.all() if user.is_staff else VideoJob.objects.filter(owner=user)
    try:
        return qs.get(pk=job_id)
    except VideoJob.DoesNotExist:
        raise Http404("No such job.")


@require_GET
@login_required
def home(request):
    return render(request, "generation/home.html")


RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _file_chunks(fh, start, length, chunk=256 * 1024):
    try:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                break
            remaining -= len(data)
            yield data
    finally:
        fh.close()


@require_GET
def job_video(request, job_id):
    """The job's video, behind an ownership check, with HTTP range support (browsers seek)."""
    user = request.user if request.user.is_authenticated else bearer_user(request)
    if user is None:
        if request.headers.get("Authorization"):
            return HttpResponse("Invalid or revoked token.", status=401, content_type="text/plain")
        return redirect(f"{settings.LOGIN_URL}?next={request.path}")
    job = _get_job_for_user(user, job_id)
    if not job.video:
        raise Http404("This job has no video yet.")
    if settings.R2_BUCKET:
        return redirect(default_storage.url(job.video.name))
    try:
        size = default_storage.size(job.video.name)
        fh = default_storage.open(job.video.name, "rb")
    except (FileNotFoundError, OSError):
        raise Http404("The video file is missing from storage.")
    filename = f"i2v-{job.id}{os.path.splitext(job.video.name)[1] or '.mp4'}"
    match = RANGE_RE.match(request.headers.get("Range", ""))
    if match and (match.group(1) or match.group(2)):
        first, last = match.groups()
        if first:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        else:
            start, end = max(0, size - int(last)), size - 1
        if start >= size or start > end:
            fh.close()
            resp = HttpResponse(status=416)
            resp["Content-Range"] = f"bytes */{size}"
            return resp
        resp = StreamingHttpResponse(_file_chunks(fh, start, end - start + 1), status=206, content_type="video/mp4")
        resp["Content-Range"] = f"bytes {start}-{end}/{size}"
        resp["Content-Length"] = str(end - start + 1)
    else:
        resp = FileResponse(fh, content_type="video/mp4")
        resp["Content-Length"] = str(size)
    resp["Accept-Ranges"] = "bytes"
    resp["Content-Disposition"] = f'inline; filename="{filename}"'
    resp["Cache-Control"] = "private, max-age=3600"
    return resp
