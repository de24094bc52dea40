"""Rate limits as the pacer models them: what the headers say (``parse_reset``,
``read_limits``), a ``Bucket`` per limit, and the two changes made to a key's buckets in one
store transaction: ``take`` (before a request) and ``learn`` (from an answer's headers).
Pure functions over plain values, so every store (SQLite now, Redis later) runs the same
rules; see core/resilience/pacing.py for the model in words."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

DIMENSIONS = ("requests", "tokens")
FALLBACK_WINDOW_S = 60.0            # pacing.rpm / pacing.tpm are per minute
LEASE_SHARE = 0.05                  # a process takes ahead at most this share of a limit
UNPINNED_MARGIN = 0.1               # a guessed window end is trusted this share of a window later
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
    """What is known of one limit: ``remaining`` may be used until ``reset_at`` (wall time).

    ``pinned``: whether ``reset_at`` comes from the server's word. A learnt bucket that
    refills by itself guesses its new window ends ``window_s`` after the refill, but the
    server's window starts when the first request of it *arrives* (or later, at its own
    turn), so the guess is early by at least the request's trip: the next answer's headers
    pin the real end (see ``learn``), whatever the tolerance for headers that are no news."""

    limit: float
    remaining: float
    reset_at: float
    window_s: float
    learned: bool = False           # from headers (True) or from the settings (False)
    pinned: bool = True             # reset_at from the server's headers (or the settings')

    @property
    def turns_at(self) -> float:
        """When the bucket refills: at ``reset_at`` when the server said so; a guessed end
        (no answer of the window back yet: under load, or the request failed) is given
        ``UNPINNED_MARGIN`` of the window more, for the trip that started the server's window."""
        return self.reset_at if self.pinned else self.reset_at + UNPINNED_MARGIN * self.window_s

    def refill(self, now: float) -> None:
        if now >= self.turns_at:
            self.remaining = self.limit
            self.reset_at = now + self.window_s
            self.pinned = not self.learned      # a guess, until an answer of the window says

    def wait_for(self, n: float, reserve: float, now: float) -> float:
        """0 when ``n`` can be taken now keeping ``reserve`` back, else seconds until reset.
        A request larger than the whole limit goes when the bucket is full (never stuck)."""
        self.refill(now)
        need = min(n, self.limit)
        if self.remaining - need >= min(reserve, self.limit - need):
            return 0.0
        return max(self.turns_at - now, 0.001)


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


def take(buckets: dict[str, Bucket], now: float, conf: PacingConf, tokens: int,
          reserve_share: float, lease: int = 1, stragglers=None) -> tuple[float, int, float, dict]:
    """Take one request and ``tokens`` from every bucket of a key (and up to ``lease`` - 1
    more of each, for this process's next requests), or none: (seconds to wait, requests
    taken, when the earliest bucket turns, ``beliefs``). Settings fill in a dimension the
    headers never spoke of. ``stragglers(window start, window_s)``: how many requests of
    this process, let go before the window began, are still on their way (charged to it
    once per process: see core/resilience/pacing.py)."""
    for dim, per_minute in (("requests", conf.rpm), ("tokens", conf.tpm)):
        b = buckets.get(dim)
        if per_minute and (b is None or not b.learned):
            if b is None or b.limit != per_minute:
                buckets[dim] = Bucket(per_minute, per_minute, now + FALLBACK_WINDOW_S, FALLBACK_WINDOW_S)
        elif b is not None and not b.learned and not per_minute:
            del buckets[dim]            # the setting was turned off
    b = buckets.get("requests")
    if stragglers is not None and b is not None and b.learned:
        # Requests of this process let go before this window began and still on their way:
        # the server counts those that arrive after its turn in this window.
        b.refill(now)
        late = stragglers(b.reset_at - b.window_s, b.window_s)
        if late:
            b.remaining = max(0.0, b.remaining - late)
    need = {"requests": 1, "tokens": tokens}
    reserve = {d: math.ceil(b.limit * reserve_share) if reserve_share else 0 for d, b in buckets.items()}
    wait = max((b.wait_for(need[d], reserve[d], now) for d, b in buckets.items()), default=0.0)
    if wait:
        return wait, 0, 0.0, beliefs(buckets)
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
    return 0.0, 1 + extra, min((b.reset_at for b in buckets.values()), default=math.inf), beliefs(buckets)


def beliefs(buckets: dict[str, Bucket]) -> dict[str, tuple[float, float, bool]]:
    """{dimension: (remaining, reset_at, pinned)}: what the pacer compares headers with."""
    return {d: (b.remaining, b.reset_at, b.pinned) for d, b in buckets.items()}


def learn(buckets: dict[str, Bucket], limits: dict, now: float, in_flight: int,
           sent_at: float | None = None) -> dict[str, tuple[float, float, bool]]:
    """Change a key's buckets by an answer's headers ({dim: (limit, remaining, reset_s)})
    read at ``now``, for a request sent at ``sent_at`` while ``in_flight`` others were out.

    ``now + reset_s`` is never earlier than the server's turn (the answer's trip back only
    makes it later), so any header of the window pins a refilled bucket's guessed end."""
    for dim, (limit, remaining, reset_s) in limits.items():
        reset_at = now + reset_s
        b = buckets.get(dim)
        if b is not None and b.learned and sent_at is not None:
            start = b.reset_at - b.window_s
            if sent_at < start and sent_at + reset_s <= start:
                # Sent before the window we are in began, about a window that ended by its
                # start (the server counted the request at sent_at + trip, so its window
                # ended by sent_at + reset_s at the latest... or later, by the trip): the
                # last window, answered late (under load; however late). Taken as news, its
                # remaining would starve this window and its end refill the bucket early.
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
            b.pinned = True
    return beliefs(buckets)
