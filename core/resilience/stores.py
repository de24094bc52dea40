"""Where the pacer's buckets live: one small interface (``transact``, ``has``, and the marks
of interactive requests waiting: ``mark_waiting``, ``others_waiting``) with an in-memory
store (one process) and the SQLite one (every process on the file); the Redis one (every
replica) is core/storage/redis_pacing.py."""

from __future__ import annotations

import time
import threading
from dataclasses import replace
from typing import Callable

from .. import errors
from .ratelimits import Bucket


class PacingStore:
    """Where buckets live. ``transact(key, fn)`` runs ``fn(buckets)`` (a dict dimension ->
    Bucket, changed in place) atomically for ``key`` and returns its result."""

    def transact(self, key: str, fn: Callable[[dict[str, Bucket]], object]) -> object:
        raise NotImplementedError

    def has(self, key: str) -> bool:
        """Whether anything is known for ``key`` (cheap; may be a little stale)."""
        raise NotImplementedError

    def mark_waiting(self, key: str, owner: str, until: float | None, now: float) -> None:
        """Say that an interactive request of ``owner`` (a pacer) waits for ``key`` until
        ``until`` (wall time; the mark means nothing after it, so a dead process holds
        nobody for long); None: it no longer waits."""
        raise NotImplementedError

    def others_waiting(self, key: str, owner: str, now: float) -> bool:
        """Whether an interactive request of another owner waits for ``key`` at ``now``."""
        raise NotImplementedError


class MemoryPacingStore(PacingStore):
    """Buckets of this process only (tests, and when the file cannot be written)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Bucket]] = {}
        self._waiting: dict[str, dict[str, float]] = {}

    def transact(self, key, fn):
        with self._lock:
            return fn(self._data.setdefault(key, {}))

    def has(self, key):
        return bool(self._data.get(key))

    def mark_waiting(self, key, owner, until, now):
        with self._lock:
            marks = self._waiting.setdefault(key, {})
            if until is None:
                marks.pop(owner, None)
            else:
                marks[owner] = until

    def others_waiting(self, key, owner, now):
        with self._lock:
            return any(o != owner and until > now for o, until in self._waiting.get(key, {}).items())


class SQLitePacingStore(PacingStore):
    """Buckets in the ``pacing`` table, read and written in one short transaction, so every
    process on the file shares them. A locked file falls back to this process's copy."""

    BUSY_S = 0.05        # on the event loop: never wait long for the file

    def __init__(self, db) -> None:
        self.db = db
        self._memory = MemoryPacingStore()
        self._lock = threading.Lock()
        self._queued: dict[tuple[str, str], int] = {}   # marks queued to the writer, per (key, owner)

    def transact(self, key, fn):
        def run(conn):
            rows = conn.execute("SELECT dim, lim, remaining, reset_at, window_s, learned, pinned "
                                "FROM pacing WHERE key = ?", (key,)).fetchall()
            buckets = {r[0]: Bucket(r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6])) for r in rows}
            before = {d: replace(b) for d, b in buckets.items()}
            out = fn(buckets)
            for dim in before.keys() - buckets.keys():     # a setting turned off
                conn.execute("DELETE FROM pacing WHERE key = ? AND dim = ?", (key, dim))
            for dim, b in buckets.items():
                if before.get(dim) != b:
                    conn.execute("INSERT OR REPLACE INTO pacing (key, dim, lim, remaining, reset_at, "
                                 "window_s, learned, pinned, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (key, dim, b.limit, b.remaining, b.reset_at, b.window_s,
                                  int(b.learned), int(b.pinned), time.time()))
            return out
        try:
            return self.db.write_now(run, busy_timeout_s=self.BUSY_S)
        except errors.StorageError:
            return self._memory.transact(key, fn)

    def has(self, key):
        try:
            return self.db.query_one_nowait("SELECT 1 AS x FROM pacing WHERE key = ? LIMIT 1",
                                            (key,)) is not None
        except errors.StorageError:
            return self._memory.has(key)

    def mark_waiting(self, key, owner, until, now):
        def run(conn):
            if until is None:
                conn.execute("DELETE FROM pacing_waiting WHERE key = ? AND owner = ?", (key, owner))
            else:
                conn.execute("INSERT OR REPLACE INTO pacing_waiting (key, owner, until) VALUES (?, ?, ?)",
                             (key, owner, until))
            # Marks of processes that died waiting: past their time they hold nobody;
            # gone for good a minute later (the table holds only requests waiting).
            conn.execute("DELETE FROM pacing_waiting WHERE until < ?", (now - 60.0,))
        mark = (key, owner)
        with self._lock:
            behind = mark in self._queued
        if not behind:
            try:
                self.db.write_now(run, busy_timeout_s=self.BUSY_S)
                return
            except errors.StorageError:
                pass
        # The file is busy (another process writing) or an earlier change of this mark is
        # still queued: this process goes by its own copy, and the writer thread writes the
        # change as soon as the file is free, after the earlier ones. Other processes see the
        # mark late, rather than not until the request's next wait (a window later).
        self._memory.mark_waiting(key, owner, until, now)
        with self._lock:
            self._queued[mark] = self._queued.get(mark, 0) + 1

        def written(_error) -> None:
            with self._lock:
                self._queued[mark] -= 1
                if not self._queued[mark]:
                    del self._queued[mark]
        self.db.post(run, done=written, lazy=False)

    def others_waiting(self, key, owner, now):
        try:
            return self.db.query_one_nowait(
                "SELECT 1 AS x FROM pacing_waiting WHERE key = ? AND owner <> ? AND until > ? LIMIT 1",
                (key, owner, now)) is not None
        except errors.StorageError:
            return self._memory.others_waiting(key, owner, now)
