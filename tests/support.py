"""Test support: an injected clock that tests advance instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time

from core.pipeline import Clock


class FakeClock:
    """Wall and monotonic time that only move when told (or when the code 'sleeps')."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleep_blocking(seconds)
        await asyncio.sleep(0)

    def sleep_blocking(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def as_clock(self) -> Clock:
        return Clock(time=self.time, monotonic=self.monotonic, sleep=self.sleep,
                     sleep_blocking=self.sleep_blocking)


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    """Poll real state that changes after I/O we cannot await directly (another thread or
    process): True as soon as ``predicate()`` is; False after ``timeout_s`` (generous: a
    loaded machine is slow, and a pass costs only the time it takes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def time_of_day_gap_s(shown: str, when: dt.datetime) -> float:
    """Seconds between a time of day as a page shows it ("HH:MM" or "HH:MM:SS") and
    ``when``'s own, the short way round midnight (a check at 23:59 of a time shown as 00:00)."""
    t = dt.time.fromisoformat(shown)
    gap = (t.hour * 3600 + t.minute * 60 + t.second) - (when.hour * 3600 + when.minute * 60 + when.second)
    return abs((gap + 43200) % 86400 - 43200)


class StepClock(FakeClock):
    """A FakeClock for coroutines that run together (each inside ``running()``): time moves
    on only when every one of them sleeps on it, to the earliest wake-up, and every sleeper
    due by then wakes together. So requests in flight are answered and read before time
    moves: on a FakeClock one coroutine's wait moved it on at once, and how late the others'
    answers were read, and every figure after, depended on how threads interleaved."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        super().__init__(start)
        self._lock = threading.Lock()       # the simulator's thread reads (and may move) it too
        self._sleepers: list[tuple[float, asyncio.Future]] = []
        self._running = 0

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        wake = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, wake))
        self._maybe_advance()
        await wake

    @contextlib.contextmanager
    def running(self):
        """One coroutine's work: while it runs and does not sleep on the clock, time stands."""
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._maybe_advance()

    def advanced(self) -> None:
        """Called (under the lock) after time moved on to wake sleepers."""

    def _maybe_advance(self) -> None:
        if not self._sleepers or len(self._sleepers) < self._running:
            return
        due = min(at for at, _ in self._sleepers)
        with self._lock:
            self.now = max(self.now, due)
            self.advanced()
        for item in [s for s in self._sleepers if s[0] <= due]:
            self._sleepers.remove(item)
            item[1].set_result(None)


def hold_lock(path, kind: str) -> subprocess.Popen:
    """A second process that locks a Gyroscope SQLite file and holds it until ``release``;
    returns once the lock is taken. ``write``: ``BEGIN EXCLUSIVE``, the write lock (in WAL
    mode readers go on, every writer waits); ``file``: ``locking_mode=EXCLUSIVE`` plus a
    write, the whole file (readers wait too; granted only while nobody else has it open)."""
    take = {"write": "c.execute('BEGIN EXCLUSIVE')",
            "file": "c.execute('PRAGMA locking_mode=EXCLUSIVE'); c.execute('BEGIN')"}[kind]
    code = (f"import sqlite3, sys\nc = sqlite3.connect({str(path)!r}, isolation_level=None, timeout=10)\n"
            f"{take}\nc.execute(\"INSERT INTO meta (key, value) VALUES ('lock', 'x') "
            "ON CONFLICT(key) DO UPDATE SET value = 'y'\")\n"
            + ("c.execute('COMMIT')\n" if kind == "file" else "")
            + "print('locked', flush=True)\nsys.stdin.readline()\nc.close()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked", "the second process could not lock the file"
    return proc


def release(holder: subprocess.Popen) -> None:
    """Let the second process go (its lock with it); again, nothing happens."""
    if holder.poll() is None:
        holder.stdin.write("go\n")
        holder.stdin.close()
    holder.wait(30)
