"""django-q2's ORM broker, woken when a task is enqueued instead of polling every `poll` seconds.

django-q2's own ORM broker sleeps `Q_CLUSTER["poll"]` (0.5 s) whenever the queue is empty, so a
task enqueued just after a look waits up to that long: most of a short job's overhead. This
broker waits on a wake-up instead, with the poll as its ceiling: PostgreSQL's LISTEN/NOTIFY (the
NOTIFY is part of the enqueueing transaction, so it arrives exactly when the task is visible), or,
on SQLite (one machine by design), a datagram on a local socket sent after the commit. With Redis
(`REDIS_URL`) django-q2's Redis broker is used instead: its blocking pop already wakes at once.
Nothing here is needed for correctness: a lost wake-up costs one poll interval, never a task.
Hand-written because no maintained package offers a notifying ORM broker for django-q2.
"""

import hashlib
import logging
import select
import socket
import time

import psycopg
from django.db import connections, transaction
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf

log = logging.getLogger(__name__)
CHANNEL = "i2v_q"


class WakingORM(ORM):
    def __init__(self, list_key: str = None):
        super().__init__(list_key)
        self._waiter = None

    def enqueue(self, task):
        pk = super().enqueue(task)
        alias = Conf.ORM or "default"
        connection = connections[alias]
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"NOTIFY {CHANNEL}")  # delivered when the task's transaction commits
        else:
            transaction.on_commit(lambda: _LocalSocket.wake(alias), using=alias)
        return pk

    def dequeue(self):
        # Listen before looking: a task enqueued between an empty look and the LISTEN (or the
        # socket's bind) would otherwise wake nobody and wait out the whole poll.
        waiter = self._waiter or _waiter_for(Conf.ORM or "default")
        waiter.listen()
        self._waiter = waiter
        tasks = self._take()
        if tasks:
            return tasks
        waiter.wait(Conf.POLL)
        return self._take()

    def _take(self):
        # django-q2's ORM.dequeue, without its sleep when nothing was there.
        tasks = self.get_connection().filter(key=self.list_key, lock__lt=timezone.now())[0:Conf.BULK]
        taken = []
        for task in tasks:
            if self.get_connection().filter(id=task.id, lock=task.lock).update(lock=self.timeout(task)):
                taken.append((task.pk, task.payload))
        return taken or None


def _waiter_for(alias):
    if connections[alias].vendor == "postgresql":
        return _PostgresListener(alias)
    return _LocalSocket(alias)


class _PostgresListener:
    """A connection of its own in autocommit mode, LISTENing on the queue's channel."""

    def __init__(self, alias):
        self.alias = alias
        self.conn = None

    def listen(self):
        if self.conn is not None and not self.conn.closed:
            return
        try:
            params = connections[self.alias].get_connection_params()
            self.conn = psycopg.connect(**params, autocommit=True)
            self.conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            log.warning("queue wake-ups unavailable (%s); polling", exc)
            self.conn = None

    def wait(self, timeout):
        if self.conn is None:
            time.sleep(timeout)
            return
        try:
            # A NOTIFY that came after the LISTEN waits in the socket until this reads it.
            for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            log.warning("queue wake-ups unavailable (%s); polling", exc)
            self.conn = None
            time.sleep(timeout)


class _LocalSocket:
    """An abstract-namespace datagram socket named after the database file: the cluster's pusher
    binds it, anything that enqueues on the same machine sends it a byte."""

    def __init__(self, alias):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(self.address(alias))
            self.sock.setblocking(False)
        except OSError:  # another cluster on this database holds it: poll as django-q2 does
            self.sock.close()
            self.sock = None

    def listen(self):
        pass  # bound when made

    @staticmethod
    def address(alias) -> str:
        name = str(connections[alias].settings_dict.get("NAME"))
        return "\0i2v-q-" + hashlib.sha256(name.encode()).hexdigest()[:24]

    @classmethod
    def wake(cls, alias) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"1", cls.address(alias))
        except OSError:
            pass  # nobody listens (no cluster running, or it polls): the poll picks the task up

    def wait(self, timeout):
        if self.sock is None:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
            try:
                while self.sock.recv(64):  # drain: one look at the queue serves them all
                    pass
            except BlockingIOError:
                pass
