"""Enqueueing django-q2 tasks on one broker per process.

django-q2's `async_task` builds a new broker for every task it is not handed one: with Redis a new
client with a connection pool of its own, so a new TCP connection (~1.5 ms of CPU) on every job's
way to its GPU, and a connection left to the garbage collector. django-q2 has no setting for it;
it takes a `broker` argument, and this passes it the process's one."""

import os
import threading

from django_q.brokers import get_broker
from django_q.conf import Conf

_shared = {}
_lock = threading.Lock()


def broker():
    """This process's broker. Per process id: a forked worker builds its own."""
    key = (os.getpid(), Conf.CLUSTER_NAME)
    found = _shared.get(key)
    if found is None:
        with _lock:
            found = _shared.get(key) or _shared.setdefault(key, get_broker())
    return found


def async_task(func, *args, **kwargs):
    """django_q.tasks.async_task on this process's broker."""
    from django_q import tasks  # noqa: PLC0415 -- looked up at each call: tests stand in for it

    return tasks.async_task(func, *args, broker=broker(), **kwargs)
