"""Where the pacer's buckets live: one small interface (``transact``, ``has``) with an
in-memory store (one process) and the SQLite one (every process on the file). A Redis store
comes with the scale-out issue."""

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


class MemoryPacingStore(PacingStore):
    """Buckets of this process only (tests, and when the file cannot be written)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Bucket]] = {}

    def transact(self, key, fn):
        with self._lock:
            return fn(self._data.setdefault(key, {}))

    def has(self, key):
        return bool(self._data.get(key))


class SQLitePacingStore(PacingStore):
    """Buckets in the ``pacing`` table, read and written in one short transaction, so every
    process on the file shares them. A locked file falls back to this process's copy."""

    BUSY_S = 0.05        # on the event loop: never wait long for the file

    def __init__(self, db) -> None:
        self.db = db
        self._memory = MemoryPacingStore()

    def transact(self, key, fn):
        def run(conn):
            rows = conn.execute("SELECT dim, lim, remaining, reset_at, window_s, learned FROM pacing "
                                "WHERE key = ?", (key,)).fetchall()
            buckets = {r[0]: Bucket(r[1], r[2], r[3], r[4], bool(r[5])) for r in rows}
            before = {d: replace(b) for d, b in buckets.items()}
            out = fn(buckets)
            for dim in before.keys() - buckets.keys():     # a setting turned off
                conn.execute("DELETE FROM pacing WHERE key = ? AND dim = ?", (key, dim))
            for dim, b in buckets.items():
                if before.get(dim) != b:
                    conn.execute("INSERT OR REPLACE INTO pacing (key, dim, lim, remaining, reset_at, "
                                 "window_s, learned, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (key, dim, b.limit, b.remaining, b.reset_at, b.window_s,
                                  int(b.learned), time.time()))
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
