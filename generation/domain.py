"""Generation business logic: creating, running and finishing VideoJobs."""

from django.conf import settings
from django.core.files.storage import default_storage
from django.urls import reverse


def video_url(job) -> str:
    """Where the job's video can be fetched: R2 (presigned or public) or the local auth-checked view."""
    if not job.video:
        return ""
    if settings.R2_BUCKET:
        return default_storage.url(job.video.name)
    return reverse("generation:job_video", args=[job.id])
