"""One Redis connection pool, and whether Redis is answering.

Every shared part calls Redis through ``RedisLink.run``. A connection error or timeout
marks the link *down*: from then on the parts use their local (SQLite) twins without
trying Redis on each request (a dead host would cost a connect timeout per request).
``maybe_rejoin`` pings again with a growing backoff (REJOIN_BACKOFF_S, doubling, capped),
timed by the injected clock, and marks the link up when Redis answers; the settings
listener thread calls it, and so can tests.

Commands use short socket timeouts: they run on the event loop, like the SQLite reads
that wait at most 50 ms for the file, so a hung Redis costs one timeout, then none.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable, TypeVar

import redis
from redis.exceptions import BusyLoadingError, ConnectionError, RedisError, TimeoutError

from ..config import redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 0.25
COMMAND_TIMEOUT_S = 0.5
REJOIN_BACKOFF_S = (0.5, 30.0)      # first retry after 0.5 s, doubling up to 30 s
# What the parts fall back to, named in health and on the Settings page.
PARTS = ("breaker", "cache", "pacing", "settings announcements")


class RedisDown(Exception):
    """Redis did not answer; the caller uses its local twin."""


class RedisLink:
    """The client, a key prefix shared by all replicas, and up/down with a rejoin backoff."""

    def __init__(self, url: str, *, prefix: str = "gyroscope:",
                 clock: Callable[[], float] = time.monotonic,
                 client: redis.Redis | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.client = client or redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S,
            health_check_interval=0, retry_on_timeout=False)
        # Which process announced a change (its own announcements are not news to it).
        self.origin = uuid.uuid4().hex
        self._lock = threading.Lock()
        self.up = True
        self.down_since: float | None = None
        self.last_error: str | None = None
        self._backoff = REJOIN_BACKOFF_S[0]
        self._next_try = 0.0
        self.on_rejoin: list[Callable[[], None]] = []
        self.transitions = 0        # downs and rejoins, for tests and logs

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def run(self, fn: Callable[[redis.Redis], T]) -> T:
        """``fn(client)``; RedisDown (after marking the link down) when Redis fails."""
        if not self.up:
            raise RedisDown(self.last_error or "Redis is down")
        try:
            return fn(self.client)
        except (ConnectionError, TimeoutError, BusyLoadingError, OSError) as exc:
            self.mark_down(exc)
            raise RedisDown(str(exc)) from None
        except RedisError as exc:
            # Redis answered but refused this command (out of memory under noeviction, a
            # read-only replica...): this call is served locally; the link stays up.
            log.warning("Redis refused a command (%s: %s); served locally", exc.__class__.__name__, exc)
            raise RedisDown(str(exc)) from None

    def mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self.last_error = f"{exc.__class__.__name__}: {exc}"[:200]
            if self.up:
                self.up = False
                self.down_since = self.clock()
                self._backoff = REJOIN_BACKOFF_S[0]
                self._next_try = self.clock() + self._backoff
                self.transitions += 1
                log.warning("Redis at %s is not answering (%s): using local breaker, cache and "
                            "pacing until it returns", self.safe_url, self.last_error)

    def maybe_rejoin(self) -> bool:
        """When down and the backoff has passed, ping; True when the link is up (again)."""
        if self.up:
            return True
        now = self.clock()
        if now < self._next_try:
            return False
        try:
            self.client.ping()
        except (RedisError, OSError) as exc:
            with self._lock:
                self.last_error = f"{exc.__class__.__name__}: {exc}"[:200]
                self._backoff = min(self._backoff * 2, REJOIN_BACKOFF_S[1])
                self._next_try = now + self._backoff
            return False
        with self._lock:
            self.up, self.down_since, self.last_error = True, None, None
            self.transitions += 1
        log.warning("Redis at %s answers again: shared breaker, cache and pacing resume",
                    self.safe_url)
        for fn in self.on_rejoin:
            fn()
        return True

    def status(self) -> dict:
        """For /api/health and the Settings page (the URL without its password)."""
        out = {"state": "ok" if self.up else "down", "url": self.safe_url}
        if not self.up:
            out["local_fallback"] = list(PARTS)
            out["error"] = self.last_error
            out["next_retry_in_s"] = round(max(0.0, self._next_try - self.clock()), 2)
        return out

    def close(self) -> None:
        self.client.close()
