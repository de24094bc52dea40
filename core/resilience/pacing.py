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

When the window turns: the time an answer says (read on arrival + its reset) is never
earlier than the server's turn, so the pacer refills no earlier than that. But the bucket it
refills then only *guesses* its new window's end (a ``window_s`` later), and the server's
window starts when the first request of it arrives, a trip later, different every window.
So a refilled bucket is not ``pinned`` until an answer of the new window says when it ends,
and that answer is news however close to the guess (unpinned, a guess that was early by
less than the tolerance for "no news" refilled the bucket while the server still counted
the old window: 11-21 of 120 rows refused in bench/batch.py). An answer to a request sent
before the window began, about a window that ended by then, is the last window's, read
late (under load, by more than half a window): it is ignored, not taken as this window's.
The other way round, a request let go just before the turn (the client's window ends a trip
after the server's) may reach the server after it, and count in the window the pacer
refilled whole: at its first take in a window, each process charges to it its own requests
still in flight that it let go in the last ``STRAGGLER_SHARE`` of a window before it began
(once per process and window; another process's such requests are not known here).

Buckets are shared by every request of the process and, through a small table in the
SQLite file updated in one transaction, by every process on that file, or through Redis by
every replica (``PacingStore`` is the interface; core/storage/redis_pacing.py).

Priority: interactive requests (page, api, v1, cli) go first. A batch row may not take the
last ``pacing.interactive_reserve`` share of a bucket, and while an interactive request
waits for pacing, batch rows for the same limit wait too: in this process at once, and in
every other process sharing the buckets (the app beside a ``python -m core batch`` on one
file, or replicas on Redis) through a mark in the store: (key, this pacer, until when). The
mark says until when the request sleeps plus ``WAITING_GRACE_S``, so a process that dies
waiting holds the others' batch rows at most that grace past the window's turn; a batch row
looks for other processes' marks at most every ``OTHERS_CHECK_S`` (one cheap read), and a
request that stops waiting (it went, or gave up) removes its mark. So a writer is never
queued behind a 10,000-row job, whichever process runs it: at worst it waits for the window
to turn, never for the job.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

from .. import errors
from .ratelimits import (BATCH_SOURCES, Bucket, PacingConf, learn, parse_reset,  # noqa: F401
                         read_limits, take)
from .stores import MemoryPacingStore, PacingStore, SQLitePacingStore  # noqa: F401


@dataclass
class _Lease:
    """Requests (and tokens) this process took from the shared buckets ahead of need, usable
    until ``until`` (when the earliest bucket turns; what is left then is simply dropped)."""

    requests: int
    tokens: float
    until: float


# Requests let go this share of a window before it began, and still in flight, are charged
# to it: a trip that long is likely; older requests arrived long ago and are answering.
STRAGGLER_SHARE = 0.2


class _Stragglers:
    """This process's requests in flight that were let go just before a window began: the
    server may count them in that window (they arrive after its turn), which the pacer
    refilled whole. ``take`` charges them to the window, once per process and window:
    ``start`` is the window they were charged to, when they were."""

    def __init__(self, flying: list[float], charged: float | None) -> None:
        self.flying, self.charged, self.start = flying, charged, None

    def __call__(self, start: float, window_s: float) -> int:
        if self.charged is not None and abs(start - self.charged) < 0.5 * window_s:
            return 0            # this window's are charged already (its start was pinned since)
        self.start = start
        since = start - STRAGGLER_SHARE * window_s    # older ones arrived (a long answer)
        return sum(1 for at in self.flying if since <= at < start)


@dataclass
class Ticket:
    """A request that took from the buckets; ``settle`` it with the answer's headers."""

    key: str
    at: float


class Pacer:
    """Holds requests back before a limit is reached; learns limits from answers."""

    RECHECK_S = 1.0         # how often a key nobody here knows is looked up in the store
    LEASE = 8               # requests taken from the shared buckets in one transaction (at most)
    HOLD_S = 0.05           # a batch row held for an interactive request looks again this soon
    OTHERS_CHECK_S = 0.05   # other processes' waiting marks are read at most this often a key
    WAITING_GRACE_S = 1.0   # a waiting mark lasts this long past the request's wake-up

    def __init__(self, store: PacingStore, clock=None) -> None:
        from ..pipeline import Clock
        self.store = store
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._checked: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        # When each request in flight was let go, and the window whose stragglers this
        # process has charged already {key: the window's start}.
        self._flying: dict[str, list[float]] = {}
        self._charged: dict[str, float] = {}
        self._leases: dict[str, _Lease] = {}
        # What the last transaction said of each bucket {dim: (remaining, reset_at)}: headers
        # that say no less are not news, and cost no transaction.
        self._belief: dict[str, dict[str, tuple[float, float, bool]]] = {}
        self.interactive_waiting = 0
        # Interactive requests of this process waiting, per key, and until when the store's
        # mark says so; other processes' marks as last read {key: (read at, any)}.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._marks: dict[str, list] = {}
        self._others: dict[str, tuple[float, bool]] = {}
        self.held_for_others = 0    # batch rows held for another process's interactive request
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
                self._flying.setdefault(key, []).append(now)
            return Ticket(key, now)
        batch = source in BATCH_SOURCES
        need_tokens: int | None = None
        waited, counted, held = 0.0, False, False
        try:
            while True:
                if batch and (self.interactive_waiting or self._others_waiting(key)):
                    wait = self.HOLD_S      # interactive requests first: look again shortly
                    if not held and not self.interactive_waiting:
                        held = True
                        self.held_for_others += 1
                else:
                    if need_tokens is None:
                        need_tokens = max(1, int(tokens()))
                    now = self.clock.time()
                    wait = self._from_lease(key, need_tokens, batch, now)
                    if wait:
                        charge = self._stragglers(key)
                        wait, n, until, belief = self.store.transact(
                            key, lambda b: take(b, now, conf, need_tokens,
                                                 conf.reserve if batch else 0.0, self.LEASE, charge))
                        self._belief[key] = belief
                        if charge.start is not None:
                            self._charged[key] = charge.start
                        if n > 1:
                            self._leases[key] = _Lease(n - 1, need_tokens * (n - 1), until)
                    if wait == 0:
                        with self._lock:
                            self._in_flight[key] = self._in_flight.get(key, 0) + 1
                            self._flying.setdefault(key, []).append(now)
                        if waited:
                            self.waits += 1
                            self.waited_s += waited
                        return Ticket(key, now)
                if waited + wait > deadline_left:
                    raise errors.RetryLater(retry_in_s=wait, detail="held back by pacing")
                if not batch:
                    if not counted:
                        counted = True
                        with self._lock:
                            self.interactive_waiting += 1
                            self._marks.setdefault(key, [0, 0.0])[0] += 1
                    self._mark(key, self.clock.time() + wait + self.WAITING_GRACE_S)
                waited += wait
                if blocking:
                    self.clock.sleep_blocking(wait)
                else:
                    await self.clock.sleep(wait)
        finally:
            if counted:
                with self._lock:
                    self.interactive_waiting -= 1
                    mark = self._marks[key]
                    mark[0] -= 1
                    last = mark[0] == 0
                    if last:
                        del self._marks[key]
                if last:
                    self.store.mark_waiting(key, self.owner, None, self.clock.time())

    def _stragglers(self, key: str) -> "_Stragglers":
        with self._lock:
            flying = list(self._flying.get(key, ()))
        return _Stragglers(flying, self._charged.get(key))

    def _mark(self, key: str, until: float) -> None:
        """Tell the other processes that an interactive request here waits for ``key`` until
        ``until`` (a store write only when that is later than the mark already says)."""
        with self._lock:
            mark = self._marks[key]
            if until <= mark[1]:
                return
            mark[1] = until
        self.store.mark_waiting(key, self.owner, until, self.clock.time())

    def _others_waiting(self, key: str) -> bool:
        """Whether an interactive request of another process waits for ``key`` (read from
        the store at most every OTHERS_CHECK_S)."""
        now = self.clock.monotonic()
        seen = self._others.get(key)
        if seen is not None and now - seen[0] < self.OTHERS_CHECK_S:
            return seen[1]
        waiting = self.store.others_waiting(key, self.owner, self.clock.time())
        self._others[key] = (now, waiting)
        return waiting

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
                flying = self._flying.get(key)
                if flying and ticket.at in flying:
                    flying.remove(ticket.at)
        limits = read_limits(headers)
        if not limits:
            return
        self._known.add(key)
        at = self.clock.time()
        belief = self._belief.get(key)
        if belief is not None and all(
                dim in belief and belief[dim][2] and remaining >= belief[dim][0]
                and abs(at + reset_s - belief[dim][1]) <= max(0.05, 0.1 * reset_s)
                for dim, (_, remaining, reset_s) in limits.items()):
            return      # nothing new: not less left, and the window turns when the server said
        if any(remaining <= max(1.0, 0.1 * limit) for limit, remaining, _ in limits.values()):
            self._leases.pop(key, None)     # the server is near its limit: no requests ahead
        others = self._in_flight.get(key, 0)
        sent = ticket.at if ticket is not None else None
        self._belief[key] = self.store.transact(key, lambda b: learn(b, limits, at, others, sent))
