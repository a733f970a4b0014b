"""The answer of `GET /api/jobs/{id}` kept in the shared cache for a moment.

Scripts poll that endpoint for progress, so it is the one read that sees real load. The JSON of
a job (and its owner) is kept under `i2v:job:<id>` for `I2V_JOB_CACHE_SECONDS`, stamped with the
job's version (`i2v:jobv:<id>`) as it was before the row was read. Every write to a job that
touches a column of the answer, through `save()`, `delete()` or a queryset `update()` (the
worker's progress updates, the transitions), gives the job a new version once its transaction
commits; the worker's lease bookkeeping, which the answer doesn't show, does not. An answer is
served only while its version is the job's: one stored by a reader that read the row just before
a write, and stored it after the write, is never served (deleting the answer, as this did
before, left that reader's old answer in the cache for up to `I2V_JOB_CACHE_SECONDS`).

On by default only with Redis (`REDIS_URL`): the web processes and the worker then share one
cache. With the embedded defaults each process has its own memory, the worker's writes could not
reach the web processes' copies, so it stays off (0)."""

import contextlib
import contextvars
import logging
import secrets

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from generation import waiting

log = logging.getLogger(__name__)
PREFIX = "i2v:job:"
VERSION = "i2v:jobv:"
UNKNOWN = object()  # the cache could not say the job's version: what is read now is not stored


def enabled():
    return settings.I2V_JOB_CACHE_SECONDS > 0


# The cache is an accelerator: when it fails, reads go to the database and writes still happen
# (an answer whose job's new version could not be stored expires within I2V_JOB_CACHE_SECONDS).


def version_seconds():
    """How long a job's version outlives its last write: far longer than any answer stored before
    that write can live, so an answer is never taken for current because the version expired."""
    return max(60.0, 10 * settings.I2V_JOB_CACHE_SECONDS)


def get(job_id):
    """(the cached (owner_id, answer) or None, the job's version now). Read the row after this and
    hand the version to put(): one round trip for both."""
    if not enabled():
        return None, UNKNOWN
    try:
        found = cache.get_many([f"{PREFIX}{job_id}", f"{VERSION}{job_id}"])
    except Exception as exc:  # noqa: BLE001 - any cache failure means "not cached"
        log.warning("job cache unavailable: %s", exc)
        return None, UNKNOWN
    entry, version = found.get(f"{PREFIX}{job_id}"), found.get(f"{VERSION}{job_id}")
    if entry is None or entry[2] != version:
        return None, version  # none, or stored before the job's last write
    return entry[:2], version


def put(job_id, owner_id, answer, version):
    """Store the answer read after get() told `version`."""
    if enabled() and version is not UNKNOWN:
        try:
            cache.set(f"{PREFIX}{job_id}", (owner_id, answer, version), settings.I2V_JOB_CACHE_SECONDS)
        except Exception as exc:  # noqa: BLE001
            log.warning("job cache unavailable: %s", exc)


def _bump(versions):
    try:
        cache.set_many(versions, version_seconds())
    except Exception as exc:  # noqa: BLE001
        log.warning("job cache unavailable: %s", exc)


# Jobs whose id nobody has been told yet (the request creating them is still running): no answer
# can be cached for them, so writes to them need no new version (a round trip to Redis each, on
# the way of every new job to its GPU).
_unseen = contextvars.ContextVar("i2v_jobcache_unseen", default=frozenset())


@contextlib.contextmanager
def unseen(job_id):
    token = _unseen.set(_unseen.get() | {str(job_id)})
    try:
        yield
    finally:
        _unseen.reset(token)


def forget(*job_ids):
    if not enabled() or not job_ids:
        return
    if hidden := _unseen.get():
        job_ids = [job_id for job_id in job_ids if str(job_id) not in hidden]
        if not job_ids:
            return
    def new_versions():
        return {f"{VERSION}{job_id}": secrets.token_hex(8) for job_id in job_ids}

    if transaction.get_connection().in_atomic_block:
        # At once, for this transaction's own reads; others read the row as it was until the
        # commit, and the answers they store of it are dropped by the version the commit sets.
        _bump(new_versions())
    transaction.on_commit(lambda: _bump(new_versions()))  # at once outside a transaction


def shows(fields):
    """Whether writing these fields (names or attnames) can change a job's answer."""
    from generation.domain import JOB_JSON_FIELDS

    answer = set(JOB_JSON_FIELDS) | {name.removesuffix("_id") for name in JOB_JSON_FIELDS}
    return not answer.isdisjoint(fields)


def _forget_instance(sender, instance, update_fields=None, created=False, **kwargs):
    # A job just created has no answer cached (a GET of an unknown id caches nothing) and no waiter
    # (a wait is on a job's id, told to nobody yet): nothing to drop, nobody to wake.
    if not created and (update_fields is None or shows(update_fields)):
        forget(instance.pk)
        waiting.announce(instance.pk)
