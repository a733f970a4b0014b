"""Files in the storage that no job points at, removed once they are old enough.

They come from failures the job itself survives: an upload that succeeded although its answer
was lost (the retry saves under a new name), a worker killed between its upload and its
bookkeeping, an input image of a job whose creation failed, an image the generate form kept for
a session that never came back. Only `videos/` and `inputs/` are looked at, and only files older
than `I2V_SWEEP_AFTER` (6 h by default): no upload, job creation or form in progress still holds
a file that old. A schedule runs it every hour (migration 0007); `manage.py sweep_storage` by hand.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone

from generation.models import VideoJob

log = logging.getLogger(__name__)
ROOTS = ("videos", "inputs")


def _walk(storage, path):
    try:
        dirs, files = storage.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in files:
        yield f"{path}/{name}"
    for sub in dirs:
        yield from _walk(storage, f"{path}/{sub}")


def orphans(older_than=None, storage=None):
    """Names under videos/ and inputs/ that no job references, last modified before the cutoff."""
    storage = storage or default_storage
    seconds = settings.I2V_SWEEP_AFTER if older_than is None else older_than
    cutoff = timezone.now() - timedelta(seconds=seconds)
    found = []
    for root in ROOTS:
        for name in _walk(storage, root):
            found.append(name)
    if not found:
        return []
    referenced = set(VideoJob.objects.exclude(video="").values_list("video", flat=True))
    referenced |= set(VideoJob.objects.exclude(input_image="").values_list("input_image", flat=True))
    old = []
    for name in found:
        if name in referenced:
            continue
        try:
            modified = storage.get_modified_time(name)
        except (OSError, NotImplementedError):
            continue
        if modified < cutoff:
            old.append(name)
    return old


def sweep_storage(older_than=None, dry_run=False):
    """Delete the orphans (see `orphans`); returns their names."""
    names = orphans(older_than)
    for name in names:
        if not dry_run:
            try:
                default_storage.delete(name)
            except OSError as exc:
                log.warning("storage sweep: could not delete %s: %s", name, exc)
                continue
    if names:
        log.info("storage sweep: %s %d orphaned file(s)", "found" if dry_run else "deleted", len(names))
    return names
