"""Django's SQLite backend, its writers let in one after another by a lock file (`make run`'s
default database).

SQLite lets one writer in at a time and makes the others wait by sleeping and trying again: 1, 2,
5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms (its default busy handler, the only one Python's sqlite3
offers). A writer that has been refused a few times sleeps 25-100 ms between tries, however soon
the lock is free, and loses it to writers that came later and sleep less. With ten jobs at once
the web server's inserts and scheduling passes kept the queue's pusher and the workers' leases,
each one short write, out for 100-120 ms at a time (traced), while the jobs they carry to their
GPUs waited.

Here every write, a transaction (`BEGIN IMMEDIATE` to its end) or a write statement outside one,
first takes an exclusive flock on `<database>-writer`: a writer that must wait blocks in the kernel
and is woken when the lock is let go, and the lock is let go when a process dies. Threads of one
process queue on a lock of their own first. Neither wait outlasts the database's timeout (20 s): a
thread kept that long by another of its process fails with "database is locked", and a process kept
that long by another goes on to SQLite's own wait, as without the gate; a writer that holds on
makes the others fail as before, never hang. Only the waiting changes:
SQLite's own lock still decides, and a program writing to the file without this gate (the sqlite3
shell) is waited for as before.
Hand-written: Python's sqlite3 has no busy-handler hook, and no maintained backend does this.
"""

import fcntl
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from django.db import OperationalError
from django.db.backends.sqlite3 import base

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class _Gate:
    """One per database file and process: a lock for its threads, then the file lock."""

    gates: dict = {}
    made = threading.Lock()

    def __init__(self, path: str):
        self.threads = threading.Lock()
        self.fd = os.open(f"{path}-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.pid = os.getpid()
        self.held = False
        # Where a writer that must wait for another process waits in the kernel, for at most the
        # database's timeout (flock itself has no timeout).
        self.waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer-gate")

    @classmethod
    def of(cls, path: str) -> "_Gate":
        with cls.made:
            gate = cls.gates.get(path)
            if gate is None or gate.pid != os.getpid():  # a forked child opens its own
                gate = cls.gates[path] = cls(path)
            return gate

    def enter(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self.threads.acquire(timeout=timeout):
            raise OperationalError("database is locked")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
            return
        except BlockingIOError:
            pass
        except BaseException:
            self.threads.release()
            raise
        waited = self.waiter.submit(fcntl.flock, self.fd, fcntl.LOCK_EX)
        try:
            waited.result(timeout=max(0.0, deadline - time.monotonic()))
            self.held = True
        except FutureTimeout:
            # Not let in within the timeout (a writer that holds on): this write goes on without the
            # gate, and SQLite's own timeout decides, as without it. The lock, once had, is let go.
            waited.add_done_callback(lambda done: done.exception() or fcntl.flock(self.fd, fcntl.LOCK_UN))
        except BaseException:
            self.threads.release()
            raise

    def leave(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.threads.release()


class CursorWrapper(base.SQLiteCursorWrapper):
    wrapper = None  # the DatabaseWrapper, set by create_cursor

    def execute(self, query, params=None):
        return self._through_gate(query, super().execute, params)

    def executemany(self, query, param_list):
        return self._through_gate(query, super().executemany, param_list)

    def _through_gate(self, query, run, params):
        gate = self.wrapper.gate_for(query)
        if gate is None:
            return run(query, params)
        gate.enter(self.wrapper.timeout)
        try:
            return run(query, params)
        finally:
            gate.leave()


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = None  # made with the connection; None for an in-memory database
        self.holding = False  # the gate is held for this connection's open transaction

    @property
    def timeout(self) -> float:
        return float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))

    def get_new_connection(self, conn_params):
        conn = super().get_new_connection(conn_params)
        self.gate = None if self.is_in_memory_db() else self._gate()
        return conn

    def _gate(self) -> _Gate:
        return _Gate.of(os.path.abspath(str(self.settings_dict["NAME"])))

    def _gate_here(self) -> _Gate:
        if self.gate.pid != os.getpid():  # a connection carried over a fork: the child's own gate
            self.gate = self._gate()
        return self.gate

    def create_cursor(self, name=None):
        cursor = self.connection.cursor(factory=CursorWrapper)
        cursor.wrapper = self
        return cursor

    def gate_for(self, query: str):
        """The gate to pass for this statement, or None: a write outside a transaction."""
        if self.gate is None or self.holding or self.in_atomic_block:
            return None
        return self._gate_here() if query.lstrip()[:7].upper().startswith(WRITES) else None

    def _start_transaction_under_autocommit(self):
        if self.gate is None:
            return super()._start_transaction_under_autocommit()
        self._gate_here().enter(self.timeout)
        self.holding = True
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._let_go()
            raise

    def _let_go(self):
        if self.holding:
            self.holding = False
            self.gate.leave()

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._let_go()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._let_go()

    def _close(self):
        try:
            return super()._close()
        finally:
            self._let_go()
