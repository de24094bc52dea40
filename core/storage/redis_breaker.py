"""Breaker state in Redis, shared by every replica, with the SQLite storage as fallback.

``RedisBreakerStorage`` is pybreaker's ``CircuitRedisStorage`` (its key layout, one
namespace per upstream and model: ``<prefix>breaker:<name>:pybreaker:state`` …) with what
core/breaker.py's adapter needs on top: one read of the whole row (``snapshot``, cached
READ_TTL_S like the SQLite storage's, so the closed state's hot path costs no round trip
per request), the open period an upstream asked for (``open_for_s``), ``opened_at`` as a
float (pybreaker keeps whole seconds, which would cut up to a second off a short open
period), and half-open probe slots shared by all replicas: slot *i* is a key taken with
``SET NX PX`` (it expires by itself, so a crashed replica cannot hold the breaker shut)
and given back only by its holder (compare-and-delete in Lua).

pybreaker's own methods log and swallow a Redis error; these raise ``RedisDown`` instead,
so ``FailoverBreakerStorage`` can serve the call from this machine's SQLite storage. While
Redis is down each replica's breaker is its own; when Redis returns, the shared row (as it
was) is used again.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone

import pybreaker

from ..breaker import CLOSED, SnapshotFields, SQLiteBreakerStorage
from .redis_link import RedisDown, RedisLink

_FIELDS = ("state", "fail_counter", "success_counter", "opened_at", "open_for_s")
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBreakerStorage(SnapshotFields, pybreaker.CircuitRedisStorage):
    """One breaker's row in Redis (raises RedisDown when Redis fails)."""

    READ_TTL_S = 0.1

    def __init__(self, link: RedisLink, name: str) -> None:
        self.link = link
        self.breaker_name = name      # pybreaker's base class names every Redis storage "redis"
        self._row: dict | None = None
        self._read_at = float("-inf")
        self._pending = 0           # writes go straight to Redis: nothing is ever pending
        self._lock = threading.Lock()
        # pybreaker sets up the namespace and (SETNX) the initial keys.
        super().__init__(CLOSED, link.client, namespace=link.key("breaker", name))
        self._name = name

    def _initialize_redis_state(self, state: str) -> None:
        def init(r):
            pipe = r.pipeline(transaction=False)
            pipe.setnx(self._namespace("fail_counter"), 0)
            pipe.setnx(self._namespace("success_counter"), 0)
            pipe.setnx(self._namespace("state"), state)
            pipe.sadd(self.link.key("breakers"), self.breaker_name)     # every replica lists it
            pipe.execute()
        try:
            self.link.run(init)
        except RedisDown:
            pass                    # a missing row reads as closed; keys appear on first write

    def snapshot(self) -> dict:
        now = time.monotonic()
        row = self._row
        if row is not None and now - self._read_at < self.READ_TTL_S:
            return row
        values = self.link.run(lambda r: r.mget([self._namespace(f) for f in _FIELDS]))
        state, fails, successes, opened_at, open_for = (
            v.decode() if isinstance(v, bytes) else v for v in values)
        row = {"state": state or CLOSED, "fail_counter": int(fails or 0),
               "success_counter": int(successes or 0),
               "opened_at": float(opened_at) if opened_at else None,
               "open_for_s": float(open_for) if open_for not in (None, "") else None}
        with self._lock:
            self._row, self._read_at = row, now
        return row

    def _set(self, field: str, value, command=None) -> None:
        key = self._namespace(field)
        result = self.link.run(command or (lambda r: r.set(key, "" if value is None else value)))
        base = self._row or self.snapshot()
        with self._lock:
            row = dict(self._row or base)
            row[field] = int(result) if command else value
            self._row = row

    def _store(self, field: str, value) -> None:
        self._set(field, str(value) if field == "state" else value)

    def increment_counter(self) -> None:
        self._set("fail_counter", None, lambda r: r.incr(self._namespace("fail_counter")))

    def reset_counter(self) -> None:
        self._set("fail_counter", 0)

    def increment_success_counter(self) -> None:
        self._set("success_counter", None, lambda r: r.incr(self._namespace("success_counter")))

    def reset_success_counter(self) -> None:
        self._set("success_counter", 0)

    # Half-open probe slots shared by every replica.
    def lease_probe(self, limit: int, ttl_s: float, now: float) -> str | None:
        token = uuid.uuid4().hex
        ttl_ms = max(1, int(ttl_s * 1000))

        def take(r):
            for slot in range(limit):
                if r.set(self._namespace(f"probe:{slot}"), token, nx=True, px=ttl_ms):
                    return f"{slot}:{token}"
            return None
        return self.link.run(take)

    def return_probe(self, lease: str) -> None:
        slot, token = lease.split(":", 1)
        self.link.run(lambda r: r.eval(_RELEASE, 1, self._namespace(f"probe:{slot}"), token))

    def clear_probes(self) -> None:
        pattern = self._namespace("probe:*")
        self.link.run(lambda r: [r.delete(k) for k in r.scan_iter(match=pattern, count=100)])


def shared_names(link: RedisLink) -> set[str]:
    """Every breaker any replica has made (none while Redis is down)."""
    try:
        return {n.decode() for n in link.run(lambda r: r.smembers(link.key("breakers")))}
    except RedisDown:
        return set()


class FailoverBreakerStorage(pybreaker.CircuitBreakerStorage):
    """The Redis row while Redis answers, else this machine's SQLite row."""

    def __init__(self, link: RedisLink, local: SQLiteBreakerStorage, name: str) -> None:
        super().__init__(name)
        self.link = link
        self.local = local
        self.shared = RedisBreakerStorage(link, name)

    def _do(self, shared_fn, local_fn):
        if self.link.up:
            try:
                return shared_fn(self.shared)
            except RedisDown:
                pass
        return local_fn(self.local)

    def _both(self, fn):
        return self._do(fn, fn)

    # What core/breaker.py reads of the storage it uses now.
    @property
    def _row(self):
        return (self.shared if self.link.up else self.local)._row

    @property
    def _pending(self):
        return 0 if self.link.up else self.local._pending

    def snapshot(self) -> dict:
        return self._both(lambda s: s.snapshot())

    @property
    def state(self) -> str:
        return self._both(lambda s: s.state)

    @state.setter
    def state(self, state: str) -> None:
        self._both(lambda s: setattr(s, "state", state))

    def increment_counter(self) -> None:
        self._both(lambda s: s.increment_counter())

    def reset_counter(self) -> None:
        self._both(lambda s: s.reset_counter())

    def increment_success_counter(self) -> None:
        self._both(lambda s: s.increment_success_counter())

    def reset_success_counter(self) -> None:
        self._both(lambda s: s.reset_success_counter())

    @property
    def counter(self) -> int:
        return self._both(lambda s: s.counter)

    @property
    def success_counter(self) -> int:
        return self._both(lambda s: s.success_counter)

    @property
    def opened_at(self) -> datetime | None:
        return self._both(lambda s: s.opened_at)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._both(lambda s: setattr(s, "opened_at", value))

    @property
    def open_for_s(self) -> float | None:
        return self._both(lambda s: s.open_for_s)

    @open_for_s.setter
    def open_for_s(self, value: float | None) -> None:
        self._both(lambda s: setattr(s, "open_for_s", value))

    def lease_probe(self, limit: int, ttl_s: float, now: float):
        return self._both(lambda s: s.lease_probe(limit, ttl_s, now))

    def return_probe(self, lease) -> None:
        if isinstance(lease, str):      # a Redis slot (an int is a row in the SQLite file)
            try:
                self.shared.return_probe(lease)
            except RedisDown:
                pass                    # the slot expires by itself
        else:
            self.local.return_probe(lease)

    def clear_probes(self) -> None:
        self._both(lambda s: s.clear_probes())
