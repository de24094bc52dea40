"""The spill journal: history rows the database could not take, kept until it can.

An append-only file of JSON lines, one row each: request rows, and lines marked ``"_t"``:
events (``"event"``, with a unique ``uid``) and, with PostgreSQL, the batch ledger's done
rows (``"batch_done"``, with the claim they were answered under; core/storage/pg_ledger.py).
History writes here when a commit fails
(disk full, read-only, locked past the writer's timeout) and replays the lines into the
database once it takes writes again; ``request_id`` is unique there, so replaying a line
twice (a crash between the replay's commit and the journal's truncation) inserts it once.

A line reaches the kernel with one ``write`` before the request that made it is answered:
like a WAL commit at ``synchronous=NORMAL``, it survives the process being killed (not a
power cut). A write the disk cuts short is cut back off, so a torn line never glues itself
to the next one; a torn last line left by a crash is skipped when replaying (its request was
never answered: the answer waits for the write). Processes sharing a database share its
journal: appends and the emptying after a replay take an advisory lock (``flock``), so a
row appended by one process is never cut off by another's truncation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from pathlib import Path

from .errors import StorageError

_log = logging.getLogger(__name__)


def default_path(db_path: str | Path) -> Path:
    """Where the journal lives unless configured: beside the database file."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + "-spill.jsonl")


class SpillJournal:
    """One append-only JSON-lines file of rows waiting for the database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.pending = self._count()          # rows waiting (lines written, not yet replayed)

    def _count(self) -> int:
        try:
            with self.path.open("rb") as fh:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        except OSError:
            return 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def append(self, rows: list[dict]) -> None:
        """Write the rows with one write call; StorageError (the file unchanged) if it fails."""
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()
        with self._lock:
            fd = size = None
            try:
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data     # a crash cut the last line: start a fresh one
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "short write (disk full?)")
            except OSError as exc:
                if size is not None:
                    try:
                        os.ftruncate(fd, size)     # no torn line for the next append to extend
                    except OSError:
                        pass
                raise StorageError(
                    f"The spill journal {self.path} cannot be written either ({exc.strerror or exc}). "
                    "Free space on its disk or give this user write access to it (GYROSCOPE_SPILL "
                    "puts it on another disk).", detail=str(exc)) from exc
            finally:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
            self.pending += len(rows)

    def read(self) -> tuple[list[dict], int]:
        """Every complete row in the file and the byte offset they end at."""
        with self._lock:
            try:
                data = self.path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):     # nothing was ever spooled
                return [], 0
        end = data.rfind(b"\n") + 1          # a torn last line (a crash mid-write) is no row
        rows = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                _log.warning("Skipping an unreadable line in the spill journal %s", self.path)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows, end

    def consume(self, upto: int) -> None:
        """The first ``upto`` bytes are in the database: empty the file if nothing came after."""
        with self._lock:
            try:
                if not self.path.exists():
                    self.pending = 0
                    return
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    size = os.fstat(fd).st_size
                    if size > upto:      # rows spilled meanwhile: the next replay takes all again
                        with self.path.open("rb") as fh:
                            fh.seek(upto)
                            self.pending = fh.read().count(b"\n")
                        return
                    os.ftruncate(fd, 0)
                    self.pending = 0
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except (FileNotFoundError, NotADirectoryError):
                self.pending = 0
            except OSError as exc:
                _log.warning("Could not empty the spill journal %s: %s (its rows are in the "
                             "database; replaying them again inserts nothing)", self.path, exc)

    def close(self) -> None:
        """Release the file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
