"""Pacing: hold a request back before the upstream would refuse it, instead of retrying a 429.

What is known about an upstream's limits is a *bucket* per (upstream, model) and dimension
(``requests``, ``tokens``): the limit, what is left, and when it is full again. It is learnt
from every answer's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers
(OpenAI's; resets are durations such as ``1s``, ``6m0s``, ``120ms``) and, for servers that
send none, from the ``pacing.rpm`` / ``pacing.tpm`` settings (a 60 s window).

The model is deliberately conservative, so it suits both a fixed-window server and OpenAI's
gradual refill: ``remaining`` requests may go out until ``reset_at``; after that the bucket
is full again for another ``window_s``. Every request takes from it before it is sent; an
answer's headers lower ``remaining`` to what the server says (never raise it within the
window: our own requests in flight are not counted by the server yet).

Buckets are shared by every request of the process and, through a small table in the
SQLite file updated in one transaction, by every process on that file (``PacingStore`` is
the interface; a Redis store comes with the scale-out issue).

Priority: interactive requests (page, api, v1, cli) go first. A batch row may not take the
last ``pacing.interactive_reserve`` share of a bucket, and while an interactive request of
this process waits for pacing, batch rows wait too. So a writer is never queued behind a
10,000-row job: at worst it waits for the window to turn, never for the job.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from .. import errors

DIMENSIONS = ("requests", "tokens")
FALLBACK_WINDOW_S = 60.0            # pacing.rpm / pacing.tpm are per minute
LEASE_SHARE = 0.05                  # a process takes ahead at most this share of a limit
BATCH_SOURCES = frozenset({"batch"})
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)")
# The longest reset believed: a server (or a proxy) can send anything; a day-long hold
# from one odd header would stall every request.
MAX_RESET_S = 3600.0


def parse_reset(value: str | None) -> float | None:
    """Seconds in a reset header: a Go-style duration ("1s", "6m0s", "120ms", "1m30.5s") or
    a plain number of seconds; None for anything else (empty, negative, "abc", "1x")."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pos, total = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                return None
            total += float(match.group(1)) * _UNIT_S[match.group(2)]
            pos = match.end()
        if pos != len(text) or pos == 0:
            return None
        return min(total, MAX_RESET_S)
    if not math.isfinite(number) or number < 0:
        return None
    return min(number, MAX_RESET_S)


def read_limits(headers: Mapping[str, str] | None) -> dict[str, tuple[float, float, float]]:
    """{dimension: (limit, remaining, reset_s)} from x-ratelimit-* headers; a dimension with
    a missing or unreadable value is left out (the settings or what was learnt decide)."""
    out: dict[str, tuple[float, float, float]] = {}
    if not headers:
        return out
    for dim in DIMENSIONS:
        try:
            limit = float(headers.get(f"x-ratelimit-limit-{dim}", ""))
            remaining = float(headers.get(f"x-ratelimit-remaining-{dim}", ""))
        except ValueError:
            continue
        reset = parse_reset(headers.get(f"x-ratelimit-reset-{dim}"))
        if (reset is None or not math.isfinite(limit) or not math.isfinite(remaining)
                or limit <= 0 or remaining < 0):
            continue
        out[dim] = (limit, min(remaining, limit), reset)
    return out


@dataclass
class Bucket:
    """What is known of one limit: ``remaining`` may be used until ``reset_at`` (wall time)."""

    limit: float
    remaining: float
    reset_at: float
    window_s: float
    learned: bool = False           # from headers (True) or from the settings (False)

    def refill(self, now: float) -> None:
        if now >= self.reset_at:
            self.remaining = self.limit
            self.reset_at = now + self.window_s

    def wait_for(self, n: float, reserve: float, now: float) -> float:
        """0 when ``n`` can be taken now keeping ``reserve`` back, else seconds until reset.
        A request larger than the whole limit goes when the bucket is full (never stuck)."""
        self.refill(now)
        need = min(n, self.limit)
        if self.remaining - need >= min(reserve, self.limit - need):
            return 0.0
        return max(self.reset_at - now, 0.001)


@dataclass(frozen=True)
class PacingConf:
    """The pacing.* settings, frozen for one request."""

    enabled: bool = True
    rpm: float = 0.0
    tpm: float = 0.0
    reserve: float = 0.1

    @classmethod
    def from_settings(cls, s: Mapping) -> "PacingConf":
        return cls(enabled=s["pacing.enabled"], rpm=s["pacing.rpm"], tpm=s["pacing.tpm"],
                   reserve=s["pacing.interactive_reserve"])


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


@dataclass
class _Lease:
    """Requests (and tokens) this process took from the shared buckets ahead of need, usable
    until ``until`` (when the earliest bucket turns; what is left then is simply dropped)."""

    requests: int
    tokens: float
    until: float


@dataclass
class Ticket:
    """A request that took from the buckets; ``settle`` it with the answer's headers."""

    key: str
    at: float


class Pacer:
    """Holds requests back before a limit is reached; learns limits from answers."""

    RECHECK_S = 1.0         # how often a key nobody here knows is looked up in the store
    LEASE = 8               # requests taken from the shared buckets in one transaction (at most)

    def __init__(self, store: PacingStore, clock=None) -> None:
        from ..pipeline import Clock
        self.store = store
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._checked: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._leases: dict[str, _Lease] = {}
        # What the last transaction said of each bucket {dim: (remaining, reset_at)}: headers
        # that say no less are not news, and cost no transaction.
        self._belief: dict[str, dict[str, tuple[float, float]]] = {}
        self.interactive_waiting = 0
        self.waits = 0              # requests held back (a count for metrics and benchmarks)
        self.waited_s = 0.0

    def _relevant(self, key: str, conf: PacingConf) -> bool:
        if not conf.enabled:
            return False
        if conf.rpm or conf.tpm or key in self._known:
            return True
        now = self.clock.monotonic()
        if now - self._checked.get(key, -math.inf) < self.RECHECK_S:
            return False
        self._checked[key] = now
        if self.store.has(key):          # learnt by another process
            self._known.add(key)
            return True
        return False

    async def acquire(self, key: str, source: str, conf: PacingConf,
                      tokens: Callable[[], int], deadline_left: float,
                      blocking: bool = False) -> Ticket | None:
        """Wait until the request may go (``blocking``: on this thread, never suspending);
        RetryLater when the wait passes the deadline. The ticket (None with pacing off)
        counts the request in flight even when nothing limits ``key`` yet: the first answer's
        headers do not count the requests sent alongside it."""
        if not conf.enabled:
            return None
        if not self._relevant(key, conf):
            now = self.clock.time()
            with self._lock:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            return Ticket(key, now)
        batch = source in BATCH_SOURCES
        need_tokens: int | None = None
        waited, counted = 0.0, False
        try:
            while True:
                if batch and self.interactive_waiting:
                    wait = 0.05        # interactive requests first: look again shortly
                else:
                    if need_tokens is None:
                        need_tokens = max(1, int(tokens()))
                    now = self.clock.time()
                    wait = self._from_lease(key, need_tokens, batch, now)
                    if wait:
                        wait, n, until, belief = self.store.transact(
                            key, lambda b: _take(b, now, conf, need_tokens,
                                                 conf.reserve if batch else 0.0, self.LEASE))
                        self._belief[key] = belief
                        if n > 1:
                            self._leases[key] = _Lease(n - 1, need_tokens * (n - 1), until)
                    if wait == 0:
                        with self._lock:
                            self._in_flight[key] = self._in_flight.get(key, 0) + 1
                        if waited:
                            self.waits += 1
                            self.waited_s += waited
                        return Ticket(key, now)
                if waited + wait > deadline_left:
                    raise errors.RetryLater(retry_in_s=wait, detail="held back by pacing")
                if not batch and not counted:
                    counted = True
                    with self._lock:
                        self.interactive_waiting += 1
                waited += wait
                if blocking:
                    self.clock.sleep_blocking(wait)
                else:
                    await self.clock.sleep(wait)
        finally:
            if counted:
                with self._lock:
                    self.interactive_waiting -= 1

    def _from_lease(self, key: str, tokens: int, batch: bool, now: float) -> float:
        """0 when this process's lease on ``key`` covers the request (taken from it), else 1."""
        with self._lock:
            lease = self._leases.get(key)
            if lease is None or now >= lease.until or lease.tokens < tokens:
                return 1.0
            lease.requests -= 1
            lease.tokens -= tokens
            if lease.requests <= 0:
                del self._leases[key]
            return 0.0

    def observe(self, key: str, headers: Mapping[str, str] | None, ticket: Ticket | None) -> None:
        """Learn from an answer's (or an error's) headers; ends ``ticket``'s flight. Headers
        go to the store only when they are news: less left than believed, or the window
        turning at another time (a new window, or an earlier end than we guessed)."""
        if ticket is not None:
            with self._lock:
                self._in_flight[key] = max(0, self._in_flight.get(key, 0) - 1)
        limits = read_limits(headers)
        if not limits:
            return
        self._known.add(key)
        at = self.clock.time()
        belief = self._belief.get(key)
        if belief is not None and all(
                dim in belief and remaining >= belief[dim][0]
                and abs(at + reset_s - belief[dim][1]) <= max(0.05, 0.1 * reset_s)
                for dim, (_, remaining, reset_s) in limits.items()):
            return      # nothing new: not less left, and the window turns when we thought
        if any(remaining <= max(1.0, 0.1 * limit) for limit, remaining, _ in limits.values()):
            self._leases.pop(key, None)     # the server is near its limit: no requests ahead
        others = self._in_flight.get(key, 0)
        sent = ticket.at if ticket is not None else None
        self._belief[key] = self.store.transact(key, lambda b: _learn(b, limits, at, others, sent))


def _take(buckets: dict[str, Bucket], now: float, conf: PacingConf, tokens: int,
          reserve_share: float, lease: int = 1) -> tuple[float, int, float]:
    """Take one request and ``tokens`` from every bucket of a key (and up to ``lease`` - 1
    more of each, for this process's next requests), or none: (seconds to wait, requests
    taken, when the earliest bucket turns). Settings fill in a dimension the headers never
    spoke of."""
    for dim, per_minute in (("requests", conf.rpm), ("tokens", conf.tpm)):
        b = buckets.get(dim)
        if per_minute and (b is None or not b.learned):
            if b is None or b.limit != per_minute:
                buckets[dim] = Bucket(per_minute, per_minute, now + FALLBACK_WINDOW_S, FALLBACK_WINDOW_S)
        elif b is not None and not b.learned and not per_minute:
            del buckets[dim]            # the setting was turned off
    need = {"requests": 1, "tokens": tokens}
    reserve = {d: math.ceil(b.limit * reserve_share) if reserve_share else 0 for d, b in buckets.items()}
    wait = max((b.wait_for(need[d], reserve[d], now) for d, b in buckets.items()), default=0.0)
    if wait:
        return wait, 0, 0.0, _beliefs(buckets)
    for d, b in buckets.items():
        b.remaining -= min(need[d], b.limit)
    extra = lease - 1                 # taken ahead: never from the reserve, at most 5 % of a limit
    for d, b in buckets.items():
        each = min(need[d], b.limit)
        kept = math.ceil(b.limit * conf.reserve)
        extra = min(extra, int(b.limit * LEASE_SHARE / each) - 1, int((b.remaining - kept) // each))
    extra = max(0, extra)
    for d, b in buckets.items():
        b.remaining -= min(need[d], b.limit) * extra
    return 0.0, 1 + extra, min((b.reset_at for b in buckets.values()), default=math.inf), _beliefs(buckets)


def _beliefs(buckets: dict[str, Bucket]) -> dict[str, tuple[float, float]]:
    return {d: (b.remaining, b.reset_at) for d, b in buckets.items()}


def _learn(buckets: dict[str, Bucket], limits: dict, now: float, in_flight: int,
           sent_at: float | None = None) -> dict[str, tuple[float, float]]:
    for dim, (limit, remaining, reset_s) in limits.items():
        reset_at = now + reset_s
        b = buckets.get(dim)
        if b is not None and b.learned and sent_at is not None:
            start = b.reset_at - b.window_s
            if sent_at < start and reset_at < start + 0.5 * b.window_s:
                # Sent before the window we are in began, and about a window that ends near
                # its start: the last one, answered late (under load). Taken as news, its
                # early reset would refill the bucket a second time in one window.
                continue
        if b is None or not b.learned or reset_at > b.reset_at + max(0.05, 0.1 * reset_s):
            # A window we had not seen: what the server says, less what we have sent since.
            left = remaining - (in_flight if dim == "requests" else 0)
            buckets[dim] = Bucket(limit, max(0.0, left), reset_at, max(reset_s, 0.001), True)
            if b is not None and b.learned:
                buckets[dim].window_s = max(b.window_s, reset_s)
        else:
            b.limit = limit
            b.remaining = min(b.remaining, remaining)
            b.reset_at = reset_at       # the server knows when its window turns
            b.window_s = max(b.window_s, reset_s)
    return _beliefs(buckets)
