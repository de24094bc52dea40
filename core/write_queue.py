"""The writer-thread queue with group commits that core/db.py (SQLite) and
core/storage/postgres.py (PostgreSQL) share: one piece of code for queueing writes, batching
them and telling each caller how its write went.

An *urgent* write (somebody waits for it) starts a commit at once when the writer is idle;
writes that arrive while it commits share the next one. *Lazy* writes gather for up to
``linger_s`` or ride along with the next urgent commit. A backend supplies how to open its
writer connection, how to run a batch in one transaction, and how to name its errors.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable

from .errors import StorageError

_log = logging.getLogger(__name__)
_STOP = object()
MAX_BATCH = 512


class WriteQueue:
    """Base of a database with one writer thread. Subclasses set ``path`` and ``linger_s``,
    call ``_start_writer`` last in ``__init__``, and define ``_open_writer``,
    ``_run_batch`` and ``_writer_error``."""

    _driver_error: type[BaseException] = Exception   # what closing a broken connection may raise
    path: Any
    linger_s: float

    def _start_writer(self, name: str) -> None:
        self._pending: collections.deque = collections.deque()
        self._queued = threading.Event()      # something is pending
        self._urgent = threading.Event()      # somebody waits for a pending write
        self._busy = False                    # the writer holds a drained, unsettled batch
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name=name, daemon=True)
        self._writer.start()

    # -- what a backend supplies ---------------------------------------------------------
    def _open_writer(self, conn):
        """The writer's connection: ``conn`` when it is still usable, else a new one."""
        raise NotImplementedError

    def _run_batch(self, conn, batch: list) -> None:
        raise NotImplementedError

    def _writer_error(self, exc: BaseException) -> BaseException:
        """What the callers of a failed batch get for ``exc``."""
        return exc

    def _after_batch(self, conn) -> None:
        """Work for the writer between batches (SQLite: a WAL checkpoint)."""

    # -- writing -----------------------------------------------------------------------
    def submit(self, fn: Callable, *, lazy: bool = True) -> Future:
        """Queue a write; the future resolves (to fn's result) once it is committed. A lazy
        write may wait up to ``linger_s`` for others to share its commit."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(StorageError(f"The database {self.path} is closed."))
            return fut
        self._enqueue((fn, fut, lazy))
        return fut

    def post(self, fn: Callable, done: Callable[[BaseException | None], None] | None = None,
             lazy: bool = True) -> None:
        """Queue a write without a future (cheaper than ``submit``). ``done(error)`` runs on
        the writer thread once it is committed (error None) or failed; ``lazy=False`` starts
        the commit at once when the writer is idle (somebody waits for ``done``)."""
        if self._closed:
            if done is not None:
                done(StorageError(f"The database {self.path} is closed."))
            return
        self._enqueue((fn, done, lazy))

    def _enqueue(self, item: tuple) -> None:
        self._pending.append(item)
        if not item[2]:     # before waking the writer: it must not start lingering for this one
            self._urgent.set()
        if not self._queued.is_set():   # set() takes a lock; while the writer lingers it is set
            self._queued.set()

    def write(self, fn: Callable, timeout: float | None = 30) -> Any:
        """Run a write and wait for its commit."""
        return self.submit(fn, lazy=False).result(timeout)

    async def awrite(self, fn: Callable) -> Any:
        """Run a write from async code and await its commit."""
        return await asyncio.wrap_future(self.submit(fn, lazy=False))

    def _stop_writer(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        self._closed = True
        self._pending.append((_STOP, None, False))
        self._queued.set()
        self._urgent.set()
        self._writer.join(timeout=30)
        # A write that slipped in as we closed must not leave its caller waiting forever.
        while True:
            try:
                item = self._pending.popleft()
            except IndexError:
                break
            if item[0] is not _STOP and runnable(item):
                settle(item[1], None, StorageError(f"The database {self.path} is closed."))

    def _gather(self) -> list:
        """The next batch: wait for a write; while all queued writes are lazy, let more
        gather for up to ``linger_s``. Lazy submits wake nobody during the linger, so a
        busy request path costs the writer one wake-up per batch, not one per row."""
        self._queued.wait()
        if not self._urgent.is_set():
            self._urgent.wait(self.linger_s)
        self._queued.clear()        # before draining: a later submit sets it again
        self._urgent.clear()
        self._busy = True
        batch = []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._pending.popleft())
            except IndexError:
                break
        if self._pending:
            self._queued.set()
            self._urgent.set()      # a full batch is waiting already: no lingering
        return batch

    def _write_loop(self) -> None:
        # Normal priority: requests wait for this thread's commits (it ran at nice 10 when
        # they did not, and on a busy machine fell behind by 0.1-0.3 s).
        conn = None
        while True:
            batch = self._gather()
            stop = any(entry[0] is _STOP for entry in batch)
            # A caller that gave up (cancelled its future) does not get its write run.
            batch = [entry for entry in batch if entry[0] is not _STOP and runnable(entry)]
            if batch:
                try:
                    conn = self._open_writer(conn)
                    self._run_batch(conn, batch)
                except BaseException as exc:  # noqa: BLE001 - the writer thread must survive
                    err = self._writer_error(exc)
                    for _, target, _ in batch:
                        settle(target, None, err)
                    if conn is not None:
                        try:
                            conn.close()
                        except self._driver_error:
                            pass
                        conn = None
            self._after_batch(conn)
            self._busy = False
            if stop:
                if conn is not None:
                    conn.close()
                return


def runnable(item: tuple) -> bool:
    """False for a submitted write whose caller gave up (cancelled its future)."""
    target = item[1]
    return not isinstance(target, Future) or target.set_running_or_notify_cancel()


def settle(target, value: Any, exc: BaseException | None) -> None:
    """Tell a write's submitter (a Future) or poster (a ``done`` callback, or nobody) how it went."""
    if isinstance(target, Future):
        if target.done():
            return
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(value)
    elif target is not None:
        try:
            target(exc)
        except Exception:  # noqa: BLE001 - a callback must not take the writer down
            _log.exception("A write's completion callback failed")
