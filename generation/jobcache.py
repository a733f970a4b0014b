"""The answer of `GET /api/jobs/{id}` kept in the shared cache for a moment.

Scripts poll that endpoint for progress, so it is the one read that sees real load. The JSON of
a job (and its owner) is kept under `i2v:job:<id>` for `I2V_JOB_CACHE_SECONDS`; every write to a
job that touches a column of the answer, through `save()`, `delete()` or a queryset `update()`
(the worker's progress updates, the transitions), drops it at once and again after the
transaction commits; the worker's lease bookkeeping, which the answer doesn't show, does not. What is left: a reader
that read the row just before a write may store the old answer after the write dropped it; that
answer lives at most `I2V_JOB_CACHE_SECONDS`.

On by default only with Redis (`REDIS_URL`): the web processes and the worker then share one
cache. With the embedded defaults each process has its own memory, the worker's writes could not
reach the web processes' copies, so it stays off (0)."""

import contextlib
import contextvars
import logging

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from generation import waiting

log = logging.getLogger(__name__)
PREFIX = "i2v:job:"


def enabled():
    return settings.I2V_JOB_CACHE_SECONDS > 0


# The cache is an accelerator: when it fails, reads go to the database and writes still happen
# (an entry a failed delete left behind expires within I2V_JOB_CACHE_SECONDS).


def get(job_id):
    if not enabled():
        return None
    try:
        return cache.get(f"{PREFIX}{job_id}")
    except Exception as exc:  # noqa: BLE001 - any cache failure means "not cached"
        log.warning("job cache unavailable: %s", exc)
        return None


def put(job_id, owner_id, answer):
    if enabled():
        try:
            cache.set(f"{PREFIX}{job_id}", (owner_id, answer), settings.I2V_JOB_CACHE_SECONDS)
        except Exception as exc:  # noqa: BLE001
            log.warning("job cache unavailable: %s", exc)


def _delete(keys):
    try:
        cache.delete_many(keys)
    except Exception as exc:  # noqa: BLE001
        log.warning("job cache unavailable: %s", exc)


# Jobs whose id nobody has been told yet (the request creating them is still running): no answer
# can be cached for them, so writes to them drop nothing (a round trip to Redis each, on the way
# of every new job to its GPU).
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
    keys = [f"{PREFIX}{job_id}" for job_id in job_ids]
    if transaction.get_connection().in_atomic_block:
        _delete(keys)
        # A reader in between may have stored the row as it was before this transaction commits.
    transaction.on_commit(lambda: _delete(keys))  # at once outside a transaction


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
