"""Pacing buckets in Redis, so N replicas together stay under one upstream limit.

Implements core/resilience/pacing.py's ``PacingStore``: ``transact(key, fn)`` reads the
key's buckets, runs ``fn`` on them and writes back what changed, atomically across
replicas through redis-py's optimistic transaction (WATCH the hash, read, MULTI/EXEC the
writes; a concurrent change by another replica aborts the EXEC and the whole step runs
again on the new values, so ``fn`` must be re-runnable: ``_take`` and ``_learn`` are,
they only change the buckets handed to them).

One hash per key (``pacing:<key>``), a field per dimension holding the bucket as JSON,
expiring a day after its last change (a model nobody calls leaves nothing behind). The
marks of interactive requests waiting for a key are a sorted set (``pacing-waiting:<key>``,
member: the pacer, score: until when), expiring a minute after the latest mark.
While Redis is down, buckets come from this machine's SQLite store: each replica paces
alone until Redis returns (the rate limit is then per replica, and the upstream's 429s,
retried, are the backstop).
"""

from __future__ import annotations

import json
import math
from dataclasses import astuple, replace

from redis.exceptions import WatchError

from ..resilience.pacing import Bucket, PacingStore
from .redis_link import RedisDown, RedisLink

KEEP_S = 86400
WAITING_KEEP_S = 60     # a waiting mark is removed this long after its time, if nobody did
MAX_TRIES = 50          # optimistic retries under contention before falling back locally


class RedisPacingStore(PacingStore):
    """Buckets shared by every replica; ``local`` (SQLite) while Redis is down."""

    def __init__(self, link: RedisLink, local: PacingStore) -> None:
        self.link = link
        self.local = local

    def _key(self, key: str) -> str:
        return self.link.key("pacing", key)

    def transact(self, key, fn):
        if not self.link.up:
            return self.local.transact(key, fn)
        name = self._key(key)

        def step(r):
            with r.pipeline(transaction=True) as pipe:
                for _ in range(MAX_TRIES):
                    try:
                        pipe.watch(name)
                        raw = pipe.hgetall(name)
                        buckets = {k.decode(): Bucket(*json.loads(v)) for k, v in raw.items()}
                        before = {d: replace(b) for d, b in buckets.items()}
                        out = fn(buckets)
                        pipe.multi()
                        changed = {d: json.dumps(astuple(b)) for d, b in buckets.items()
                                   if before.get(d) != b}
                        gone = [d for d in before if d not in buckets]
                        if changed:
                            pipe.hset(name, mapping=changed)
                        if gone:
                            pipe.hdel(name, *gone)
                        pipe.expire(name, KEEP_S)
                        pipe.execute()
                        return True, out
                    except WatchError:
                        continue        # another replica changed the buckets: run again
            return False, None
        try:
            done, out = self.link.run(step)
        except RedisDown:
            return self.local.transact(key, fn)
        return out if done else self.local.transact(key, fn)

    def has(self, key):
        if not self.link.up:
            return self.local.has(key)
        try:
            return bool(self.link.run(lambda r: r.exists(self._key(key))))
        except RedisDown:
            return self.local.has(key)

    def mark_waiting(self, key, owner, until, now):
        if not self.link.up:
            return self.local.mark_waiting(key, owner, until, now)
        name = self.link.key("pacing-waiting", key)

        def step(r):
            with r.pipeline(transaction=True) as pipe:
                if until is None:
                    pipe.zrem(name, owner)
                else:
                    pipe.zadd(name, {owner: until})
                    pipe.expire(name, max(1, math.ceil(until - now + WAITING_KEEP_S)))
                pipe.zremrangebyscore(name, "-inf", now - WAITING_KEEP_S)   # marks of the dead
                pipe.execute()
        try:
            self.link.run(step)
        except RedisDown:
            self.local.mark_waiting(key, owner, until, now)

    def others_waiting(self, key, owner, now):
        if not self.link.up:
            return self.local.others_waiting(key, owner, now)
        name = self.link.key("pacing-waiting", key)
        try:
            marks = self.link.run(lambda r: r.zrangebyscore(name, f"({now}", "+inf"))
        except RedisDown:
            return self.local.others_waiting(key, owner, now)
        return any(m.decode() != owner for m in marks)
