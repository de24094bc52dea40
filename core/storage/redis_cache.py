"""The response cache in Redis, shared by every replica, with the SQLite cache as fallback.

Same keys as core/cache.py (``cache_key``: SHA-256 over everything that can change the
answer) and the same rules: only complete answers go in (the pipeline decides), an entry
older than ``cache.ttl_s`` is a miss, hits and misses are counted, and at most
``cache.max_entries`` answers are kept, least recently used going first.

Layout under the link's prefix:
- ``cache:e:<key>``   a hash (the answer), with a native TTL of ``cache.ttl_s``;
- ``cache:used``      a sorted set key -> last used (the LRU order; a hit moves it);
- ``cache:created``   a sorted set key -> created at (``clear(before)``, pruning);
- ``cache:bytes``     a hash key -> size of the answer (the Settings page's "Size");
- ``cache:counts``    a hash with ``hits`` and ``misses``.

A lookup is one round trip (a Lua script reads the entry, checks its age, moves it in the
LRU order and counts the hit or miss). Redis's own ``maxmemory`` with an ``allkeys-lru``
policy is the operator's extra guard for memory; ``cache.max_entries`` is kept by us.
While Redis is down, lookups and stores go to the SQLite cache of this machine.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..cache import CachedAnswer, ResponseCache
from .redis_link import RedisDown, RedisLink

_GET = """
local v = redis.call('HGETALL', KEYS[1])
local created = nil
for i = 1, #v, 2 do if v[i] == 'created_at' then created = tonumber(v[i + 1]) end end
if created == nil or created < tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[3], 'misses', 1)
  return {}
end
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'hits', 1)
return v
"""
_INT_FIELDS = ("prompt_tokens", "completion_tokens")


class RedisCache:
    """ResponseCache's interface over Redis; ``local`` serves while Redis is down."""

    def __init__(self, link: RedisLink, local: ResponseCache, settings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.link = link
        self.local = local
        self.settings = settings
        self.clock = clock
        self._get = link.client.register_script(_GET)
        self.used, self.created = link.key("cache", "used"), link.key("cache", "created")
        self.sizes, self.counts = link.key("cache", "bytes"), link.key("cache", "counts")

    def _entry(self, key: str) -> str:
        return self.link.key("cache", "e", key)

    def get(self, key: str) -> CachedAnswer | None:
        """The live entry for ``key`` or None (counted as a hit or a miss)."""
        if not self.link.up:
            return self.local.get(key)
        now = self.clock()
        oldest = now - self.settings.get("cache.ttl_s")
        try:
            flat = self.link.run(lambda r: self._get(keys=[self._entry(key), self.used, self.counts],
                                                     args=[now, oldest, key]))
        except RedisDown:
            return self.local.get(key)
        if not flat:
            return None
        row = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return CachedAnswer(
            key=key, content=row["content"], model=row["model"], finish_reason=row["finish_reason"],
            prompt_tokens=int(row["prompt_tokens"]) if row.get("prompt_tokens") else None,
            completion_tokens=int(row["completion_tokens"]) if row.get("completion_tokens") else None,
            cost=float(row["cost"]) if row.get("cost") else None, created_at=float(row["created_at"]))

    def put(self, key: str, *, provider: str, model: str, content: str, finish_reason: str,
            prompt_tokens: int | None, completion_tokens: int | None, cost: float | None) -> None:
        """Store a complete answer (one round trip) and evict past cache.max_entries."""
        if not self.link.up:
            return self.local.put_soon(key, provider=provider, model=model, content=content,
                                       finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                       completion_tokens=completion_tokens, cost=cost)
        now = self.clock()
        ttl_s = max(1, int(self.settings.get("cache.ttl_s")))
        max_entries = int(self.settings.get("cache.max_entries"))
        entry = self._entry(key)
        fields = {"provider": provider, "model": model, "content": content,
                  "finish_reason": finish_reason, "created_at": repr(now),
                  "prompt_tokens": "" if prompt_tokens is None else str(prompt_tokens),
                  "completion_tokens": "" if completion_tokens is None else str(completion_tokens),
                  "cost": "" if cost is None else repr(cost)}

        def store(r) -> list:
            pipe = r.pipeline(transaction=True)
            pipe.delete(entry)
            pipe.hset(entry, mapping=fields)
            pipe.expire(entry, ttl_s)
            pipe.zadd(self.used, {key: now})
            pipe.zadd(self.created, {key: now})
            pipe.hset(self.sizes, key, len(content.encode("utf-8")))
            pipe.zcard(self.used)
            return pipe.execute()
        try:
            count = self.link.run(store)[-1]
            if count > max_entries:
                self.link.run(lambda r: self._evict(r, count - max_entries))
        except RedisDown:
            self.local.put_soon(key, provider=provider, model=model, content=content,
                                finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens, cost=cost)

    # The pipeline stores with put_soon; a store here is one round trip, so it is the same.
    put_soon = put

    def _evict(self, r, n: int) -> None:
        """Drop the ``n`` least recently used answers."""
        gone = [k.decode() for k, _ in r.zpopmin(self.used, n)]
        self._drop(r, gone)

    def _drop(self, r, keys: list[str]) -> int:
        if not keys:
            return 0
        pipe = r.pipeline(transaction=True)
        pipe.delete(*[self._entry(k) for k in keys])
        pipe.zrem(self.used, *keys)
        pipe.zrem(self.created, *keys)
        pipe.hdel(self.sizes, *keys)
        return pipe.execute()[0]

    def clear(self, before: float | None = None) -> int:
        """Remove all answers, or those created before ``before`` (unix s), here and in the
        local fallback; returns how many were removed."""
        removed = self.local.clear(before)
        hi = "+inf" if before is None else f"({before}"
        try:
            keys = self.link.run(lambda r: [k.decode() for k in r.zrangebyscore(self.created, "-inf", hi)])
            removed += self.link.run(lambda r: self._drop(r, keys))
        except RedisDown:
            pass
        return removed

    def stats(self) -> dict:
        """Entries, bytes, hits, misses and hit rate of the shared cache (the local one's
        while Redis is down). Answers past their TTL are pruned from the indexes first."""
        if not self.link.up:
            return self.local.stats()
        oldest = self.clock() - self.settings.get("cache.ttl_s")

        def read(r) -> dict:
            expired = [k.decode() for k in r.zrangebyscore(self.created, "-inf", f"({oldest}")]
            self._drop(r, expired)
            pipe = r.pipeline(transaction=False)
            pipe.zcard(self.used)
            pipe.hvals(self.sizes)
            pipe.hgetall(self.counts)
            entries, sizes, counts = pipe.execute()
            hits, misses = int(counts.get(b"hits", 0)), int(counts.get(b"misses", 0))
            return {"entries": entries, "bytes": sum(int(s) for s in sizes), "hits": hits,
                    "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0}
        try:
            return self.link.run(read)
        except RedisDown:
            return self.local.stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)    # anything else the SQLite cache offers
