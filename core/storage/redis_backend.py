"""Redis for a replica: one link, and the shared twin of each local part.

Built by core/service.py when ``GYROSCOPE_REDIS_URL`` is set; the local (SQLite) parts are
built as before and handed in, so each shared part has its fallback at hand.
"""

from __future__ import annotations

import time
from typing import Callable

from ..breaker import SQLiteBreakerStorage
from .redis_breaker import FailoverBreakerStorage, shared_names
from .redis_cache import RedisCache
from .redis_link import RedisDown, RedisLink
from .redis_pacing import RedisPacingStore
from .redis_settings import SettingsAnnouncer


class RedisBackend:
    """The parts a replica shares through Redis (see core/storage/__init__.py)."""

    def __init__(self, url: str, db, settings, *, clock: Callable[[], float] = time.monotonic,
                 prefix: str = "gyroscope:") -> None:
        self.db = db
        self.link = RedisLink(url, prefix=prefix, clock=clock)
        try:        # answer at start-up, or start degraded (and rejoin later)
            self.link.run(lambda r: r.ping())
        except RedisDown:
            pass
        self.announcer = SettingsAnnouncer(self.link, settings)

    def breaker_storage(self, name: str) -> FailoverBreakerStorage:
        return FailoverBreakerStorage(self.link, SQLiteBreakerStorage(self.db, name), name)

    def breaker_names(self) -> set[str]:
        return shared_names(self.link)

    def cache(self, local, settings, clock: Callable[[], float]) -> RedisCache:
        return RedisCache(self.link, local, settings, clock=clock)

    def pacing_store(self, local) -> RedisPacingStore:
        return RedisPacingStore(self.link, local)

    def status(self) -> dict:
        return self.link.status()

    def close(self) -> None:
        self.announcer.close()
        self.link.close()


def describe(status: dict) -> tuple[bool, str]:
    """(ok, one line for the Settings page) from ``RedisLink.status()``."""
    if status["state"] == "ok":
        return True, (f"Shared with the other replicas through Redis at {status['url']}: breaker "
                      "state, cached answers and pacing; saved settings are announced to them at once.")
    return False, (f"Redis at {status['url']} is not answering, so this replica uses its own "
                   f"{', '.join(status.get('local_fallback', []))} until it returns (next try in "
                   f"{status.get('next_retry_in_s', 0):g} s). Nothing answered is lost.")
