"""Circuit breaker: pybreaker is the state machine and the storage; this adapter decides.

pybreaker's ``call()`` holds a lock for the whole protected call (so it would serialise
requests), has no asyncio support, and counts a cancelled generator as a failure. So the
adapter only *asks permission* before an attempt and *records the outcome* after it,
each under a short lock, while the I/O runs outside. Time comes from an injected clock.

    acquire() -> Permit | raises CircuitOpen(retry_in_s)
    success(permit) / failure(permit, cause, retry_in_s) / release(permit)   # release = neither

The trip rule (``breaker.mode``) decides when a closed breaker opens, from the outcomes of
*attempts* (not of whole requests): ``rate`` (the default) when at least
``breaker.failure_rate_threshold`` % of the last ``breaker.window_size`` attempts sent have
failed and ``breaker.minimum_calls`` of them have finished (a count-based sliding window, as
in resilience4j, kept in this process's memory; see FailureWindow for why attempts still
running count as not failed); ``consecutive`` when ``breaker.fail_max``
attempts failed in a row (pybreaker's counter, in the shared storage). When the failure
that opens it says how long to wait (Retry-After), the breaker stays open that long
(clamped to OPEN_FOR_BOUNDS_S) instead of ``breaker.reset_timeout_s``.

Half-open probes are counted across processes: with ``SQLiteBreakerStorage`` each probe
holds a lease in the ``breaker_probes`` table (taken and given back with a direct write
that waits at most PROBE_LOCK_WAIT_S for the file; it expires after the request deadline,
so a crashed process cannot hold the breaker shut).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Callable

import pybreaker

from .errors import CircuitOpen, StorageError

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
RATE, CONSECUTIVE = "rate", "consecutive"
SUCCEEDED, FAILED, RELEASED = "succeeded", "failed", "released"
# An upstream's Retry-After sets the open period within these bounds: under a second a probe
# would go straight back into the storm; past ten minutes an odd header would pause the
# service longer than anyone expects (a maintainer can still reset or force it by hand).
OPEN_FOR_BOUNDS_S = (1.0, 600.0)
# How long taking or giving back a probe slot may wait for the file. It runs on the event
# loop, so it must stay short: past it, a half-open breaker refuses (it does not probe blind)
# and a slot is given back by the writer thread.
PROBE_LOCK_WAIT_S = 0.05


def open_period(retry_in_s: float | None) -> float | None:
    """The open period an upstream's Retry-After asks for, clamped; None when it said nothing."""
    if retry_in_s is None or retry_in_s != retry_in_s:      # absent or NaN
        return None
    low, high = OPEN_FOR_BOUNDS_S
    return min(high, max(low, float(retry_in_s)))


class FailureWindow:
    """This process's last ``size`` attempts *sent* in the closed state (count-based).

    An attempt takes its place when it is sent and is counted as failed only once it has
    failed: still running, it counts as not failed. Failures (a 503 at once) come back
    sooner than answers, so a window of *finished* attempts would, in a burst, hold mostly
    failures (32 of the first 50 at a 30 % storm of 100 concurrent); one of attempts sent
    does not. Sending and succeeding are a ``deque.append`` and an attribute set (atomic in
    CPython), so the closed state's hot path takes no lock; failures count under the lock.
    """

    __slots__ = ("permits", "epoch")

    def __init__(self, size: int) -> None:
        self.permits: deque[Permit] = deque(maxlen=size)
        self.epoch: float | None = None     # opened_at of the breaker when this window began

    def resize(self, size: int) -> None:
        if self.permits.maxlen != size:     # a live settings change keeps the latest attempts
            self.permits = deque(self.permits, maxlen=size)

    def figures(self) -> tuple[int, int, int]:
        """(finished, failed, still running) attempts in the window; a released attempt
        (a 4xx, a Stop) is in none of them."""
        finished = failed = running = 0
        for permit in tuple(self.permits):  # a C-level copy: appends elsewhere cannot break it
            outcome = permit.outcome
            if outcome is None:
                running += 1
            elif outcome is not RELEASED:
                finished += 1
                failed += outcome is FAILED
        return finished, failed, running

    def clear(self, epoch: float | None) -> None:
        self.permits = deque(maxlen=self.permits.maxlen)
        self.epoch = epoch


class SnapshotFields:
    """The fields pybreaker reads and sets, over a storage's ``snapshot()`` row: shared by
    the SQLite storage here and the Redis one (core/storage/redis_breaker.py). A storage
    supplies ``snapshot()`` and ``_store(field, value)``; counters it changes its own way."""

    @property
    def state(self) -> str:
        return self.snapshot()["state"] or CLOSED

    @state.setter
    def state(self, state: str) -> None:
        self._store("state", state)

    @property
    def counter(self) -> int:
        return int(self.snapshot()["fail_counter"] or 0)

    @property
    def success_counter(self) -> int:
        return int(self.snapshot()["success_counter"] or 0)

    @property
    def opened_at(self) -> datetime | None:
        ts = self.snapshot()["opened_at"]
        return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._store("opened_at", value.timestamp())

    @property
    def open_for_s(self) -> float | None:
        """How long this opening lasts, when the upstream said (None: breaker.reset_timeout_s)."""
        return self.snapshot().get("open_for_s")

    @open_for_s.setter
    def open_for_s(self, value: float | None) -> None:
        self._store("open_for_s", value)


class SQLiteBreakerStorage(SnapshotFields, pybreaker.CircuitBreakerStorage):
    """pybreaker storage in the `breakers` table, so every process on the file shares it.

    Writes never wait: each change is applied to this process's view at once and queued
    to the database writer (counters as relative updates, so processes' changes add up).
    Reads reuse the view while writes are pending, else re-read the row at most every
    READ_TTL_S, which is how another process's change arrives.
    """

    READ_TTL_S = 0.1
    _DEFAULT = {"state": CLOSED, "fail_counter": 0, "success_counter": 0, "opened_at": None,
                "open_for_s": None}

    def __init__(self, db, name: str) -> None:
        super().__init__(name)
        self.db = db
        self._lock = threading.Lock()
        self._row: dict | None = None
        self._read_at = float("-inf")
        self._pending = 0

    def snapshot(self) -> dict:
        """The row (state, counters, opened_at) as this process sees it (read-only: a change
        replaces the dict, so the hot path shares it instead of copying)."""
        now = time.monotonic()
        row = self._row
        if row is not None and (self._pending or now - self._read_at < self.READ_TTL_S):
            return row
        try:    # on the event loop: while another program locks the file, keep this view
            row = self.db.query_one_nowait("SELECT state, fail_counter, success_counter, opened_at, open_for_s "
                                           "FROM breakers WHERE name = ?", (self._name,)) or dict(self._DEFAULT)
        except StorageError:
            row = self._row or dict(self._DEFAULT)
        with self._lock:
            if not self._pending:       # never replace a newer local view with an older file
                self._row, self._read_at = row, now
            return self._row

    def _change(self, local, sql: str, *params) -> None:
        if self._row is None:
            self.snapshot()
        with self._lock:
            row = dict(self._row)
            local(row)
            self._row = row
            self._pending += 1
        name = self._name

        def write(conn) -> None:
            conn.execute("INSERT OR IGNORE INTO breakers (name, state, fail_counter, success_counter, "
                         "updated_at) VALUES (?, 'closed', 0, 0, ?)", (name, time.time()))
            conn.execute(f"UPDATE breakers SET {sql}, updated_at = ? WHERE name = ?",
                         (*params, time.time(), name))
        self.db.post(write, self._written)

    # Half-open probe slots, shared by every process on the file (rare: no hot path).
    def lease_probe(self, limit: int, ttl_s: float, now: float) -> int | None:
        """One of ``limit`` probe slots: its lease id, or None when all are taken."""
        name = self._name

        def take(conn) -> int | None:
            conn.execute("DELETE FROM breaker_probes WHERE name = ? AND expires_at <= ?", (name, now))
            held = conn.execute("SELECT count(*) FROM breaker_probes WHERE name = ?", (name,)).fetchone()[0]
            if held >= limit:
                return None
            return conn.execute("INSERT INTO breaker_probes (name, expires_at) VALUES (?, ?)",
                                (name, now + ttl_s)).lastrowid
        return self.db.write_now(take, busy_timeout_s=PROBE_LOCK_WAIT_S)

    def return_probe(self, lease: int) -> None:
        self._write_soon("DELETE FROM breaker_probes WHERE id = ?", lease)

    def clear_probes(self) -> None:
        self._write_soon("DELETE FROM breaker_probes WHERE name = ?", self._name)

    def _write_soon(self, sql: str, arg) -> None:
        """Give a slot back at once when the file is free within PROBE_LOCK_WAIT_S, else by
        the writer (the lease also expires by itself): the event loop never waits longer."""
        try:
            self.db.write_now(lambda conn: conn.execute(sql, (arg,)), busy_timeout_s=PROBE_LOCK_WAIT_S)
        except StorageError:
            self.db.post(lambda conn: conn.execute(sql, (arg,)))

    def _written(self, exc: BaseException | None) -> None:
        with self._lock:
            self._pending -= 1
            self._read_at = float("-inf") if exc is not None else self._read_at

    def _store(self, field: str, value) -> None:
        self._change(lambda r: r.update({field: value}), f"{field} = ?", value)

    def increment_counter(self) -> None:
        self._change(lambda r: r.update(fail_counter=r["fail_counter"] + 1), "fail_counter = fail_counter + 1")

    def reset_counter(self) -> None:
        self._change(lambda r: r.update(fail_counter=0), "fail_counter = 0")

    def increment_success_counter(self) -> None:
        self._change(lambda r: r.update(success_counter=r["success_counter"] + 1),
                     "success_counter = success_counter + 1")

    def reset_success_counter(self) -> None:
        self._change(lambda r: r.update(success_counter=0), "success_counter = 0")


class Permit:
    """Permission for one attempt; ``probe`` when taken in the half-open state."""

    __slots__ = ("probe", "lease", "done", "outcome")

    def __init__(self, probe: bool, lease: int | None = None) -> None:
        self.probe = probe
        self.lease = lease          # the shared probe slot it holds (storage with leases)
        self.done = False
        self.outcome: str | None = None     # SUCCEEDED, FAILED or RELEASED once settled


class Breaker:
    """One upstream's breaker, configured live from the breaker.* settings."""

    def __init__(self, name: str, storage: pybreaker.CircuitBreakerStorage, settings,
                 *, clock: Callable[[], float] = time.time,
                 on_transition: Callable[[str, str, str, str], None] | None = None) -> None:
        self.name = name
        self.storage = storage
        self.settings = settings
        self.clock = clock
        self.on_transition = on_transition
        self.cb = pybreaker.CircuitBreaker(state_storage=storage, name=name,
                                           throw_new_error_on_trip=False)
        self._lock = threading.Lock()
        self._probes = 0
        self.window = FailureWindow(settings.snapshot()["breaker.window_size"])
        self.window.epoch = storage.snapshot().get("opened_at")

    def _conf(self) -> None:
        s = self.settings.snapshot()
        self.mode = s["breaker.mode"]
        self.threshold_pct = s["breaker.failure_rate_threshold"]
        self.minimum_calls = s["breaker.minimum_calls"]
        self.window.resize(s["breaker.window_size"])
        self.cb.fail_max = s["breaker.fail_max"]
        self.cb.reset_timeout = s["breaker.reset_timeout_s"]
        self.cb.success_threshold = s["breaker.success_threshold"]
        self.half_open_max = s["breaker.half_open_max_calls"]
        self.probe_ttl_s = s["retry.deadline_s"] + 1.0    # no attempt outlives its deadline

    def _open_until(self, snap: dict) -> float:
        """When the open period of the row ``snap`` ends (needs ``_conf``)."""
        opened_at = snap.get("opened_at") or self.clock()
        return opened_at + (snap.get("open_for_s") or self.cb.reset_timeout)

    def retry_in(self) -> float:
        """Seconds until the next probe is allowed (0 when not open)."""
        snap = self.storage.snapshot()
        if snap.get("state") != OPEN:
            return 0.0
        return max(0.0, self._open_until(snap) - self.clock())

    def _move(self, new: str, cause: str, actor: str | None = None,
              open_for_s: float | None = None) -> None:
        old = self.storage.state
        if new == OPEN:
            # The period first, so no process sees the new opening with the old period.
            if hasattr(self.storage, "open_for_s"):
                self.storage.open_for_s = open_for_s
            self.cb.open()
            self.storage.opened_at = datetime.fromtimestamp(self.clock(), timezone.utc)
        elif new == HALF_OPEN:
            self.cb.half_open()
        else:
            self.cb.close()
        self._probes = 0
        # Every transition starts a new window (as resilience4j does): outcomes from before
        # an opening say nothing about the upstream once it has recovered.
        self.window.clear(self.storage.snapshot().get("opened_at"))
        if old == HALF_OPEN and new != HALF_OPEN and hasattr(self.storage, "clear_probes"):
            try:
                self.storage.clear_probes()
            except StorageError:
                pass                            # leases expire by themselves
        if self.on_transition and old != new:
            self.on_transition(self.name, old, new, cause if not actor else f"{cause} by {actor}")

    def acquire(self) -> Permit:
        """Permission for one attempt, or CircuitOpen with the seconds until the next probe."""
        if (self.storage.snapshot().get("state") or CLOSED) == CLOSED:
            permit = Permit(probe=False)        # the hot path: one cached read, no lock
            self.window.permits.append(permit)
            return permit
        with self._lock:
            self._conf()
            snap = self.storage.snapshot()
            state = snap.get("state") or CLOSED
            if state == OPEN:
                wait = max(0.0, self._open_until(snap) - self.clock())
                if wait > 0:
                    raise CircuitOpen(retry_in_s=wait)
                self._move(HALF_OPEN, "open period elapsed; probing")
                state = HALF_OPEN
            if state == HALF_OPEN:
                if self._probes >= self.half_open_max:
                    raise CircuitOpen(retry_in_s=min(1.0, self.cb.reset_timeout))
                lease = self._lease()
                self._probes += 1
                return Permit(probe=True, lease=lease)
            permit = Permit(probe=False)
            self.window.permits.append(permit)
            return permit

    def _lease(self) -> int | None:
        """A probe slot shared with other processes (when the storage has them), or CircuitOpen."""
        take = getattr(self.storage, "lease_probe", None)
        if take is None:
            return None                         # this process's count is all there is
        try:
            lease = take(self.half_open_max, self.probe_ttl_s, self.clock())
        except StorageError:
            lease = None                        # the file is locked: do not probe blind
        if lease is None:
            raise CircuitOpen(retry_in_s=min(1.0, self.cb.reset_timeout))
        return lease

    def _end_probe(self, permit: Permit) -> None:
        """Give a probe's slot back (under the lock)."""
        self._probes = max(0, self._probes - 1)
        if permit.lease is not None:
            try:
                self.storage.return_probe(permit.lease)
            except StorageError:
                pass                            # the lease expires by itself

    def success(self, permit: Permit) -> None:
        """The attempt worked."""
        if permit.done:
            return
        permit.outcome = SUCCEEDED
        snap = self.storage.snapshot()
        if not permit.probe and (snap.get("state") or CLOSED) == CLOSED and not snap.get("fail_counter"):
            permit.done = True                  # the hot path: no lock, no I/O
            return
        with self._lock:
            permit.done = True
            self._conf()
            snap = self.storage.snapshot()
            state = snap.get("state") or CLOSED
            if permit.probe:
                self._end_probe(permit)
            if state == HALF_OPEN:
                self.storage.increment_success_counter()
                if self.storage.success_counter >= self.cb.success_threshold:
                    self._move(CLOSED, f"{self.cb.success_threshold} successful probe(s)")
            elif state == CLOSED and snap.get("fail_counter"):
                self.storage.reset_counter()    # a run of consecutive failures ends

    def failure(self, permit: Permit, cause: str, retry_in_s: float | None = None) -> None:
        """The attempt failed in a way that counts against the upstream; ``retry_in_s`` is how
        long the upstream asked us to wait (Retry-After), if it said."""
        if permit.done:
            return
        with self._lock:
            permit.done = True
            permit.outcome = FAILED
            self._conf()
            snap = self.storage.snapshot()
            state = snap.get("state") or CLOSED
            if permit.probe:
                self._end_probe(permit)
            if state == HALF_OPEN:
                self._move(OPEN, f"probe failed: {cause}", open_for_s=open_period(retry_in_s))
            elif state == CLOSED and not permit.probe:
                trip = self._trips(permit, snap, cause)
                if trip:
                    self._move(OPEN, trip, open_for_s=open_period(retry_in_s))

    def _trips(self, permit: Permit, snap: dict, cause: str) -> str | None:
        """Count one failure in the closed state; the cause to open with, if the rule says so."""
        if self.window.epoch != snap.get("opened_at"):
            # Another process opened and closed the breaker since this window began.
            self.window.clear(snap.get("opened_at"))
            self.window.permits.append(permit)
        if self.mode == CONSECUTIVE:
            self.storage.increment_counter()
            count = self.storage.counter
            if count >= self.cb.fail_max:
                return f"{count} consecutive failures (last: {cause})"
            return None
        finished, failed, running = self.window.figures()
        sent = finished + running
        if finished >= self.minimum_calls and failed * 100 >= self.threshold_pct * sent:
            return (f"{failed} of the last {sent} attempts failed ({100 * failed / sent:.0f}% "
                    f">= {self.threshold_pct:g}%; last: {cause})")
        return None

    def release(self, permit: Permit) -> None:
        """The attempt ended in a way that says nothing about the upstream (4xx, a Stop)."""
        if permit.done:
            return
        permit.done = True
        permit.outcome = RELEASED
        if permit.probe:
            with self._lock:
                self._end_probe(permit)

    def reset(self, actor: str | None = None) -> None:
        """Close the breaker by hand."""
        with self._lock:
            self._move(CLOSED, "reset", actor or "admin")
            self.storage.reset_counter()

    def force_open(self, actor: str | None = None) -> None:
        """Open the breaker by hand (it still recovers by itself after reset_timeout)."""
        with self._lock:
            self._conf()
            self._move(OPEN, "forced open", actor or "admin")

    def idle(self) -> bool:
        """Closed, with no attempt or probe in flight and no state change still being
        written: forgetting it loses nothing its shared row does not keep."""
        snap = getattr(self.storage, "_row", None) or {}
        return (snap.get("state", CLOSED) == CLOSED and not self._probes
                and not getattr(self.storage, "_pending", 0)
                and all(p.outcome is not None for p in tuple(self.window.permits)))

    def info(self) -> dict:
        """State now, for pages and stats (the window's figures are this process's)."""
        self._conf()
        snap = self.storage.snapshot()
        state = snap.get("state", CLOSED)
        retry_in = self.retry_in() if state == OPEN else 0.0
        finished, failed, running = self.window.figures()
        return {"name": self.name, "state": state, "mode": self.mode,
                "fail_counter": snap.get("fail_counter", 0),
                "window_calls": finished, "window_failures": failed, "window_running": running,
                "success_counter": snap.get("success_counter", 0),
                "opened_at": snap.get("opened_at"), "open_for_s": snap.get("open_for_s"),
                "retry_in_s": retry_in,
                "next_probe_at": self.clock() + retry_in if state == OPEN else None}


class Breakers:
    """One breaker per upstream (base URL or provider, plus model), made on first use.

    At most ``max_in_memory`` are kept: every model name a caller sends makes one, so past
    that the oldest idle ones (closed, nothing in flight) are forgotten; their state stays
    in the shared storage and comes back with them on next use.
    """

    MAX_IN_MEMORY = 1000

    def __init__(self, db, settings, history=None, *, clock: Callable[[], float] = time.time,
                 storage_factory: Callable[[str], pybreaker.CircuitBreakerStorage] | None = None) -> None:
        self.db = db
        self.settings = settings
        self.history = history
        self.clock = clock
        self.storage_factory = storage_factory or (lambda name: SQLiteBreakerStorage(db, name))
        self._lock = threading.Lock()
        self._breakers: dict[str, Breaker] = {}
        self.max_in_memory = self.MAX_IN_MEMORY
        # Names of breakers other replicas made (the shared storage's registry), if any.
        self.shared_names: Callable[[], set[str]] | None = None

    @staticmethod
    def key(upstream: str, model: str) -> str:
        return f"{upstream}|{model}"

    def get(self, upstream: str, model: str) -> Breaker:
        """The breaker of one upstream and model."""
        name = self.key(upstream, model)
        breaker = self._breakers.get(name)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.get(name)
                if breaker is None:
                    if len(self._breakers) >= self.max_in_memory:
                        self._forget_idle()
                    breaker = Breaker(name, self.storage_factory(name), self.settings,
                                      clock=self.clock, on_transition=self._record)
                    self._breakers[name] = breaker
        return breaker

    def _forget_idle(self) -> None:
        """Drop the oldest idle breakers down to 90 % of the bound (under the lock), so a
        flood of new names costs one sweep per tenth of the bound, not one per name."""
        keep = int(self.max_in_memory * 0.9)
        for name, breaker in list(self._breakers.items()):
            if len(self._breakers) <= keep:
                break
            if breaker.idle():
                del self._breakers[name]

    def _record(self, name: str, old: str, new: str, cause: str) -> None:
        if self.history is not None:
            self.history.event("breaker", name, old, new, cause, ts=self.clock())

    def all_info(self) -> list[dict]:
        """State of every breaker known to the file (any process's) or the shared storage."""
        names = {r["name"] for r in self.db.query("SELECT name FROM breakers")} | set(self._breakers)
        if self.shared_names is not None:
            names |= self.shared_names()
        return [self._known(name).info() if "|" in name
                else {"name": name, "state": "unknown"} for name in sorted(names)]

    def _known(self, name: str) -> Breaker:
        """The breaker in memory, or (past the bound) one read from its shared row that is
        not kept: listing every name in the file must not push out the ones in use."""
        breaker = self._breakers.get(name)
        if breaker is not None or len(self._breakers) < self.max_in_memory:
            return self.get(*name.split("|", 1))
        return Breaker(name, self.storage_factory(name), self.settings, clock=self.clock,
                       on_transition=self._record)
