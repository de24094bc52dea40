"""Settings changes announced through Redis pub/sub, so every replica applies them at once.

Settings stay where they are stored (the SQLite file, or PostgreSQL): Redis only carries
the news. A replica that saves a change publishes ``{"origin", "version"}`` on
``<prefix>settings``; every other replica's listener thread hears it and invalidates its
settings cache, so its next request re-reads the store (well within a second, where the
cache alone would take up to its TTL, and forever for a replica on its own file that
shares PostgreSQL).

The listener thread also watches the link: when its subscription breaks it marks Redis
down, and while down it calls ``RedisLink.maybe_rejoin`` (backoff by the injected clock);
after a rejoin it subscribes again and invalidates once, for changes missed meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading

from redis.exceptions import RedisError

from .redis_link import RedisDown, RedisLink

log = logging.getLogger(__name__)
ANNOUNCED_SETTINGS_TTL_S = 5.0
POLL_S = 0.1            # how often a down link is looked at (the backoff decides when to ping)


class SettingsAnnouncer:
    """Publishes this replica's changes; a daemon thread applies the others'."""

    def __init__(self, link: RedisLink, settings) -> None:
        self.link = link
        self.settings = settings
        self.channel = link.key("settings")
        self.heard = 0                          # announcements from other replicas applied
        # While announcements arrive, the settings cache may live longer (less reading of the
        # store); while Redis is down it goes back to its own TTL, the only way news arrives.
        self.local_ttl = settings.ttl
        settings.ttl = max(settings.ttl, ANNOUNCED_SETTINGS_TTL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="gyroscope-redis-settings",
                                        daemon=True)
        settings.on_change.append(self.announce)
        self._thread.start()

    def announce(self, version: int) -> None:
        """Tell the other replicas (a lost announcement only delays them by the cache TTL)."""
        message = json.dumps({"origin": self.link.origin, "version": version})
        try:
            self.link.run(lambda r: r.publish(self.channel, message))
        except RedisDown:
            pass

    def _invalidate(self) -> None:
        invalidate = getattr(self.settings, "invalidate", None)
        if invalidate is not None:
            invalidate()

    def _listen(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            if not self.link.up:
                self.settings.ttl = self.local_ttl
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (RedisError, OSError):
                        pass
                    pubsub = None
                if not self.link.maybe_rejoin():
                    self._stop.wait(POLL_S)
                    continue
                self._invalidate()              # changes made while we could not hear them
                self.settings.ttl = max(self.local_ttl, ANNOUNCED_SETTINGS_TTL_S)
            try:
                if pubsub is None:
                    pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                message = pubsub.get_message(timeout=0.2)
            except (RedisError, OSError) as exc:
                if self._stop.is_set():
                    break
                self.link.mark_down(exc)
                continue
            if message and message.get("type") == "message":
                try:
                    origin = json.loads(message["data"]).get("origin")
                except (ValueError, AttributeError):
                    origin = None
                if origin != self.link.origin:
                    self._invalidate()
                    self.heard += 1
        if pubsub is not None:
            try:
                pubsub.close()
            except (RedisError, OSError):
                pass

    def close(self) -> None:
        self._stop.set()
        if self.settings.on_change.count(self.announce):
            self.settings.on_change.remove(self.announce)
        self._thread.join(timeout=2)
