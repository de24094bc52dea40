"""The SQLite file: one writer thread with group commits, per-thread readers.

Every write is a function handed to the writer thread, which runs a batch of them in one
transaction and commits once (one bad write cannot take the others down: see
``_run_batch``). Callers get a ``Future`` (or a ``done`` callback) that resolves after the
commit.

Group commit: an *urgent* write (somebody waits for it: a request's history row, ``write``,
``flush``) starts a commit at once when the writer is idle; writes that arrive while it
commits share the next one, so batches grow with the load by themselves. *Lazy* writes
(cache entries, counters, breaker changes: nobody waits) gather for up to ``linger_s`` or
ride along with the next urgent commit. The writer waits at most ``write_timeout_s`` for a
lock another connection holds, so a locked file fails a batch quickly (history then spools
its rows, see core/journal.py) instead of holding requests for seconds.
"""

from __future__ import annotations

import atexit
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

from .errors import StorageError
from .schema import migrations
from .write_queue import WriteQueue, settle

WriteFn = Callable[[sqlite3.Connection], Any]
_log = logging.getLogger(__name__)
CHECKPOINT_EVERY = 500      # commits on callers' threads between two checkpoints by the writer
LINGER_S = 0.05
WRITE_TIMEOUT_S = 0.5    # longest wait for another connection's write lock before a batch fails


def storage_error(exc: BaseException, path: Path | str) -> StorageError:
    """Translate a sqlite3 error into a message that names the file and what to do."""
    text = str(exc).lower()
    if "full" in text:
        msg = (f"The disk holding the database file {path} is full. Free space on it; "
               "Gyroscope writes to it again by itself.")
    elif "locked" in text or "busy" in text:
        msg = (f"The database file {path} is locked by another program. Close that program "
               "(or the other Gyroscope process holding it) and try again.")
    elif "readonly" in text or "read-only" in text or "unable to open" in text:
        msg = (f"The database file {path} cannot be written. Give this user write access to "
               "it and its folder, or set GYROSCOPE_DB to a writable path.")
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        msg = (f"The database file {path} is not a valid SQLite database (corrupt?). Move it "
               "aside; Gyroscope creates a new one on the next start.")
    else:
        msg = f"The database file {path} failed: {exc}. Check the disk and the file's permissions."
    return StorageError(msg, detail=str(exc))


class _Percentile:
    """SQL aggregate ``percentile(value, p)`` with p in 0..100 (nearest-rank)."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.p = 50.0

    def step(self, value: float | None, p: float) -> None:
        if value is not None:
            self.values.append(value)
            self.p = p

    def finalize(self) -> float | None:
        if not self.values:
            return None
        self.values.sort()
        rank = max(1, math.ceil(self.p / 100.0 * len(self.values)))
        return self.values[rank - 1]


def _connect(path: Path, *, readonly: bool = False, busy_timeout_s: float = 10.0) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.create_aggregate("percentile", 2, _Percentile)
    if readonly:
        conn.execute("PRAGMA query_only = 1")
    return conn


class Database(WriteQueue):
    """One SQLite file (WAL) with migrations applied, a writer thread and readers."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0,
                 linger_s: float = LINGER_S, write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.linger_s = linger_s
        self.write_timeout_s = write_timeout_s
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            setup = _connect(self.path, busy_timeout_s=busy_timeout_s)
            setup.execute("PRAGMA journal_mode = WAL")
            migrations.apply(sqlite_utils.Database(setup))
            setup.close()
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(exc, self.path) from exc
        self._local = threading.local()
        self._inline_commits = 0
        self._checkpoint_due = False
        self._start_writer("gyroscope-db-writer")
        atexit.register(self.close)

    # -- reading -----------------------------------------------------------------------
    def reader(self) -> sqlite3.Connection:
        """This thread's read connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = _connect(self.path, readonly=True, busy_timeout_s=self.busy_timeout_s)
            except sqlite3.Error as exc:
                raise storage_error(exc, self.path) from exc
            self._local.conn = conn
        return conn

    def query(self, sql: str, params: Any = ()) -> list[dict]:
        """Rows of a read query as dicts."""
        try:
            return [dict(r) for r in self.reader().execute(sql, params)]
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) from exc

    def query_one(self, sql: str, params: Any = ()) -> dict | None:
        """The first row of a read query, or None."""
        try:
            row = self.reader().execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) from exc
        return dict(row) if row is not None else None

    def query_one_nowait(self, sql: str, params: Any = ()) -> dict | None:
        """Like ``query_one``, but a file that another program has locked raises
        StorageError at once instead of after the busy timeout: for reads on the event
        loop (settings, cache, breaker), whose callers have an answer without the file."""
        conn = getattr(self._local, "nowait", None)
        try:
            if conn is None:
                conn = self._local.nowait = _connect(self.path, readonly=True, busy_timeout_s=0)
            row = conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) from exc
        return dict(row) if row is not None else None

    # -- writing -----------------------------------------------------------------------
    def write_now(self, fn: WriteFn, busy_timeout_s: float = 1.0) -> Any:
        """Run a short write on this thread, in its own transaction, at once: for the rare
        write whose answer decides what happens next (a half-open probe slot). A file
        locked for longer than ``busy_timeout_s`` raises StorageError."""
        conn = getattr(self._local, "wconn", None)
        try:
            if conn is None:
                conn = self._local.wconn = _connect(self.path, busy_timeout_s=busy_timeout_s)
                self._local.wconn_wait = busy_timeout_s
            elif self._local.wconn_wait != busy_timeout_s:
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                self._local.wconn_wait = busy_timeout_s
            return _transaction(conn, fn)
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) from exc

    def commit_here(self, fn: WriteFn) -> bool:
        """Commit ``fn`` on this thread at once when the writer is idle and the file is free;
        False (nothing written) otherwise, and the caller queues it for the writer instead.

        This is the idle half of group commit: one request alone needs no batch, and two
        thread hand-offs (to the writer and back) cost this VM more than the commit itself
        (measured: ~0.3 ms against ~0.09 ms). It never waits: a lock held by anybody makes it
        give up at once, so it is safe on the event loop. Its connection never checkpoints
        (a checkpoint costs milliseconds): every ``CHECKPOINT_EVERY`` commits the writer runs one.
        """
        if self._pending or self._busy or self._closed:
            return False
        conn = getattr(self._local, "inline", None)
        try:
            if conn is None:
                conn = _connect(self.path, busy_timeout_s=0)
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                self._local.inline = conn
            _transaction(conn, fn)
        except sqlite3.Error as exc:
            if _reopen_after(exc) and conn is not None:
                self._local.inline = None
                conn.close()
            return False            # locked, full, refused: the writer's path decides what to do
        self._inline_commits += 1
        if self._inline_commits % CHECKPOINT_EVERY == 0:
            self._checkpoint_due = True
            self.post(_nothing)     # wakes the writer, which checkpoints after that batch
        return True

    def flush(self, timeout: float = 30) -> None:
        """Wait until everything queued so far is committed (at once when nothing is)."""
        if self._pending or self._busy:     # the writer sets _busy before it drains
            self.write(lambda conn: None, timeout)

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        if self._closed:
            return
        self._stop_writer()

    _driver_error = sqlite3.Error

    def _open_writer(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        return conn if conn is not None else _connect(self.path, busy_timeout_s=self.write_timeout_s)

    def _writer_error(self, exc: BaseException) -> BaseException:
        return storage_error(exc, self.path) if isinstance(exc, sqlite3.Error) else exc

    def _after_batch(self, conn: sqlite3.Connection | None) -> None:
        if self._checkpoint_due and conn is not None:
            self._checkpoint_due = False
            try:        # outside any transaction; PASSIVE never waits for readers
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                _log.warning("WAL checkpoint of %s failed: %s", self.path, exc)

    def _run_batch(self, conn: sqlite3.Connection, batch: list) -> None:
        """One transaction for the whole batch. The writes run back to back; if one raises,
        the transaction is rolled back and run again with a savepoint around each write, so
        only that write fails (write functions are plain database work: safe to rerun)."""
        self._begin(conn, self.write_timeout_s)
        try:
            try:
                results = [(target, fn(conn), None) for fn, target, _ in batch]
            except Exception:  # noqa: BLE001 - redone one by one below
                conn.execute("ROLLBACK")
                self._begin(conn, self.write_timeout_s)
                results = self._run_isolated(conn, batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for target, value, exc in results:
            settle(target, value, exc)

    def _run_isolated(self, conn: sqlite3.Connection, batch: list) -> list:
        results: list[tuple[Any, Any, BaseException | None]] = []
        for fn, target, _ in batch:
            conn.execute("SAVEPOINT w")
            try:
                value = fn(conn)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                if _reopen_after(exc):
                    raise           # every write would fail: the batch fails, the writer reopens
                conn.execute("ROLLBACK TO w")
                conn.execute("RELEASE w")
                if isinstance(exc, sqlite3.Error):
                    exc = storage_error(exc, self.path)
                results.append((target, None, exc))
            else:
                conn.execute("RELEASE w")
                results.append((target, value, None))
        return results

    @staticmethod
    def _begin(conn: sqlite3.Connection, timeout_s: float) -> None:
        # The busy handler waits up to the connection's timeout; a "locked" that comes back
        # sooner (it can, under contention) is retried until that timeout has passed.
        until = time.monotonic() + timeout_s
        for attempt in range(5):
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == 4 or time.monotonic() >= until:
                    raise
                time.sleep(min(0.05 * (attempt + 1), max(0.0, until - time.monotonic())))


def _transaction(conn: sqlite3.Connection, fn: WriteFn) -> Any:
    """fn in a transaction of its own on this thread, rolled back if anything raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        value = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return value


def _reopen_after(exc: BaseException) -> bool:
    """A connection that SQLite opened read-only (the file could not be written when it was
    opened) stays so: after such an error it must be reopened, not reused."""
    return isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc).lower()


def _nothing(conn: sqlite3.Connection) -> None:
    """A write that only wakes the writer."""
