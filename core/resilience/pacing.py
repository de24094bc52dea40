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
        self._belief: dict[str, dict[str, tuple[float, float, bool]]] = {}
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
                            key, lambda b: take(b, now, conf, need_tokens,
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
                dim in belief and belief[dim][2] and remaining >= belief[dim][0]
                and abs(at + reset_s - belief[dim][1]) <= max(0.05, 0.1 * reset_s)
                for dim, (_, remaining, reset_s) in limits.items()):
            return      # nothing new: not less left, and the window turns when the server said
        if any(remaining <= max(1.0, 0.1 * limit) for limit, remaining, _ in limits.values()):
            self._leases.pop(key, None)     # the server is near its limit: no requests ahead
        others = self._in_flight.get(key, 0)
        sent = ticket.at if ticket is not None else None
        self._belief[key] = self.store.transact(key, lambda b: learn(b, limits, at, others, sent))
