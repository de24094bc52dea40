"""Response cache in SQLite: SHA-256 keys over every output-changing parameter, TTL,
least-recently-used eviction, hit/miss counters."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import StorageError

_FENCE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]*`)", re.S)
_SPACES = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace outside code (fenced blocks and inline code kept byte for byte)."""
    parts = _FENCE.split(text)
    out = [p if i % 2 else _SPACES.sub(" ", p) for i, p in enumerate(parts)]
    return "".join(out).strip()


def cache_key(*, provider: str, base_url: str, model: str, messages: list[dict],
              temperature: float | None = None, top_p: float | None = None,
              max_tokens: int | None = None, seed: int | None = None, stop: Any = None,
              response_format: Any = None, tools: Any = None, extra: dict | None = None,
              normalize: bool = False) -> str:
    """SHA-256 over a canonical form of everything that can change the answer (``extra``:
    the conversation's other chat parameters, e.g. tools, tool_choice, n, logprobs)."""
    if normalize:
        messages = [{**m, "content": normalize_whitespace(m["content"])}
                    if isinstance(m.get("content"), str) else m for m in messages]
    extras = {"extra": extra} if extra else {}    # absent when empty: older keys stay valid
    canonical = json.dumps({
        **extras, "v": 1, "provider": provider, "base_url": base_url.rstrip("/"), "model": model,
        "messages": messages, "temperature": temperature, "top_p": top_p,
        "max_tokens": max_tokens, "seed": seed, "stop": stop,
        "response_format": response_format, "tools": tools,
        "normalize": normalize,
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """A complete answer as stored."""

    key: str
    content: str
    model: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None
    created_at: float


class ResponseCache:
    """Only complete answers go in; a hit refreshes its place in the LRU order."""

    def __init__(self, db, settings, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        # Answers stored with put_soon() whose commit is still queued: this process must
        # not pay for the same answer twice while the writer gathers its batch.
        self._pending: dict[str, CachedAnswer] = {}

    def get(self, key: str) -> CachedAnswer | None:
        """The live entry for ``key`` or None (counted as a hit or a miss)."""
        answer = self._pending.get(key)
        if answer is None:
            try:        # on the event loop: a file locked by another program is a miss
                row = self.db.query_one_nowait("SELECT * FROM cache WHERE key = ?", (key,))
            except StorageError:
                row = None
            if row is not None:
                answer = CachedAnswer(key=key, content=row["content"], model=row["model"],
                                      finish_reason=row["finish_reason"],
                                      prompt_tokens=row["prompt_tokens"],
                                      completion_tokens=row["completion_tokens"], cost=row["cost"],
                                      created_at=row["created_at"])
        now = self.clock()
        if answer is not None and now - answer.created_at > self.settings.get("cache.ttl_s"):
            answer = None
        hit = answer is not None
        self.db.post(lambda conn: _count(conn, hit=hit, key=key, now=now))
        return answer

    def put_fn(self, key: str, *, provider: str, model: str, content: str, finish_reason: str,
               prompt_tokens: int | None, completion_tokens: int | None, cost: float | None):
        """A writer function that stores a complete answer and evicts past max_entries."""
        now = self.clock()
        max_entries = int(self.settings.get("cache.max_entries"))
        values = (key, now, now, provider, model, content, finish_reason, prompt_tokens,
                  completion_tokens, cost, len(content.encode("utf-8")))

        def put(conn) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO cache (key, created_at, last_used_at, hits, provider, model, "
                "content, finish_reason, prompt_tokens, completion_tokens, cost, bytes) "
                "VALUES (?,?,?,0,?,?,?,?,?,?,?,?)", values)
            _evict(conn, max_entries)
        return put

    def put(self, key: str, **answer: Any) -> None:
        """Store a complete answer and wait for the commit."""
        self.db.write(self.put_fn(key, **answer))

    def put_soon(self, key: str, **answer: Any) -> None:
        """Store a complete answer without waiting for the commit (this process sees it at once)."""
        fn = self.put_fn(key, **answer)
        entry = self._pending[key] = CachedAnswer(
            key=key, content=answer["content"], model=answer["model"],
            finish_reason=answer["finish_reason"], prompt_tokens=answer["prompt_tokens"],
            completion_tokens=answer["completion_tokens"], cost=answer["cost"],
            created_at=self.clock())

        def committed(_exc) -> None:
            if self._pending.get(key) is entry:
                del self._pending[key]
        self.db.post(fn, committed)

    def clear(self, before: float | None = None) -> int:
        """Remove all entries, or those created before ``before`` (unix s); returns how many."""
        self.db.flush()          # answers still queued are cleared too
        if before is None:
            return self.db.write(lambda conn: conn.execute("DELETE FROM cache").rowcount)
        return self.db.write(
            lambda conn: conn.execute("DELETE FROM cache WHERE created_at < ?", (before,)).rowcount)

    def stats(self) -> dict:
        """Entries, bytes, hits, misses and hit rate."""
        self.db.flush()      # counters and entries are written lazily
        row = self.db.query_one(
            "SELECT count(*) AS entries, coalesce(sum(bytes), 0) AS bytes FROM cache") or {}
        counters = {r["key"]: int(r["value"]) for r in self.db.query(
            "SELECT key, value FROM meta WHERE key IN ('cache_hits', 'cache_misses')")}
        hits, misses = counters.get("cache_hits", 0), counters.get("cache_misses", 0)
        return {"entries": row.get("entries", 0), "bytes": row.get("bytes", 0), "hits": hits,
                "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else 0.0}


def _count(conn, *, hit: bool, key: str, now: float) -> None:
    name = "cache_hits" if hit else "cache_misses"
    conn.execute("INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE "
                 "SET value = CAST(value AS INTEGER) + 1", (name,))
    if hit:
        conn.execute("UPDATE cache SET hits = hits + 1, last_used_at = ? WHERE key = ?", (now, key))


def _evict(conn, max_entries: int) -> None:
    count = conn.execute("SELECT count(*) FROM cache").fetchone()[0]
    if count > max_entries:
        conn.execute("DELETE FROM cache WHERE key IN (SELECT key FROM cache "
                     "ORDER BY last_used_at ASC LIMIT ?)", (count - max_entries,))
