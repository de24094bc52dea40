"""`python -m core doctor`: which storage backends are configured, and how each answers.

Checks the SQLite file (always in use: cache, breakers and pacing live there, or it is
their fallback; budgets too without PostgreSQL), Redis when ``GYROSCOPE_REDIS_URL`` is set and PostgreSQL when
``GYROSCOPE_DATABASE_URL`` is set: each is asked once (a round trip timed, the server's
version read) without building the service, so a backend that fails is reported rather
than stopping the check. URLs are printed through ``redact_url`` (never a password). The
exit code is 1 when a configured backend fails, else 0.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Config, redact_url

PINGS = 5           # round trips timed per server (the median is printed)


@dataclass
class Check:
    """One backend: in use or not, how it answered."""

    backend: str
    holds: str
    in_use: bool
    where: str = ""
    ok: bool = True
    latency_ms: float | None = None
    version: str | None = None
    detail: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.in_use:
            return f"  {self.backend:<11} not configured ({self.detail})"
        answer = "ok" if self.ok else "FAILED"
        timing = f"  {self.latency_ms:.2f} ms" if self.latency_ms is not None else ""
        version = f"  {self.version}" if self.version else ""
        out = f"  {self.backend:<11} {answer:<6} {self.where}{timing}{version}"
        if self.detail:
            out += f"\n              {self.detail}"
        out += f"\n              holds: {self.holds}"
        return out + "".join(f"\n              note: {n}" for n in self.notes)


def _scrub(text: str, url: str) -> str:
    """An error message without the URL's password, should a driver ever quote it."""
    from urllib.parse import urlsplit
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def _timed(fn) -> tuple[float, object]:
    """Median milliseconds over PINGS calls of ``fn`` and its last result."""
    times, result = [], None
    for _ in range(PINGS):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), result


def check_sqlite(path: Path, database_url: str | None) -> Check:
    holds = ("cache, breakers, pacing (and their fallback while Redis is down)"
             if database_url else "history, events, settings, audit, batch jobs, cache, breakers, "
             "pacing, budgets")
    c = Check("sqlite", holds, True, str(path))
    if not path.exists():
        # The file and its folders are made on first start, where this user may write.
        base = path.absolute().parent
        while not base.exists():
            base = base.parent
        c.ok = os.access(base, os.W_OK)
        c.detail = ("not created yet: it is made on first start" if c.ok else
                    f"{base} cannot be written, so the file cannot be made there; give this user "
                    "write access or point GYROSCOPE_DB elsewhere")
        return c
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            c.latency_ms, _ = _timed(lambda: conn.execute("SELECT count(*) FROM sqlite_master").fetchone())
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            c.version = f"SQLite {sqlite3.sqlite_version} ({mode})"
        finally:
            conn.close()
    except sqlite3.Error as exc:
        c.ok, c.detail = False, f"{exc.__class__.__name__}: {exc}"
    return c


def check_redis(url: str | None, prefix: str) -> Check:
    holds = "shared breaker state and probe slots, response cache, pacing buckets, settings news"
    if not url:
        return Check("redis", holds, False, detail="GYROSCOPE_REDIS_URL")
    import redis
    from .redis_link import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S
    c = Check("redis", holds, True, f"{redact_url(url)} (keys under {prefix!r})")
    client = redis.Redis.from_url(url, socket_connect_timeout=max(1.0, CONNECT_TIMEOUT_S),
                                  socket_timeout=max(1.0, COMMAND_TIMEOUT_S))
    try:
        client.ping()       # the first connects; the timed ones are round trips
        c.latency_ms, _ = _timed(client.ping)
        info = client.info()
        c.version = f"Redis {info.get('redis_version', '?')}"
        policy, maxmemory = info.get("maxmemory_policy"), int(info.get("maxmemory", 0) or 0)
        c.notes.append(f"maxmemory {maxmemory or 'unlimited'}, policy {policy}"
                       + ("" if maxmemory else " (cache.max_entries bounds the cache)"))
    except (redis.RedisError, OSError) as exc:
        c.ok, c.detail = False, _scrub(f"{exc.__class__.__name__}: {exc}", url)
    finally:
        client.close()
    return c


def check_postgres(url: str | None) -> Check:
    holds = "history, events, settings and their audit, the batch ledger, budgets"
    if not url:
        return Check("postgresql", holds, False, detail="GYROSCOPE_DATABASE_URL")
    c = Check("postgresql", holds, True, redact_url(url))
    try:
        import psycopg
    except ImportError:
        c.ok, c.detail = False, 'psycopg is not installed: pip install -e ".[postgres]"'
        return c
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True,
                             application_name="gyroscope-doctor") as conn:
            c.latency_ms, _ = _timed(lambda: conn.execute("SELECT 1").fetchone())
            c.version = "PostgreSQL " + conn.execute("SHOW server_version").fetchone()[0]
            from .postgres import MIGRATIONS
            try:
                applied = {r[0] for r in conn.execute("SELECT name FROM gyroscope_migrations")}
            except psycopg.errors.UndefinedTable:
                applied = set()
            pending = [p.stem for p in sorted(MIGRATIONS.glob("[0-9]*_*.sql")) if p.stem not in applied]
            c.notes.append(f"{len(applied)} migration(s) applied"
                           + (f"; pending (applied on first start): {', '.join(pending)}" if pending else ""))
    except psycopg.Error as exc:
        # psycopg's message names host and user, never the password; still, first line only.
        lines = str(exc).strip().splitlines()
        c.ok, c.detail = False, _scrub(f"{exc.__class__.__name__}: {lines[0] if lines else ''}", url)
    return c


def run(config: Config) -> list[Check]:
    return [check_sqlite(config.db_path, config.database_url),
            check_redis(config.redis_url, config.redis_prefix),
            check_postgres(config.database_url)]


def main(config: Config, as_json: bool = False) -> int:
    checks = run(config)
    failed = [c for c in checks if c.in_use and not c.ok]
    if as_json:
        print(json.dumps({"ok": not failed, "backends": [asdict(c) for c in checks]}))
    else:
        print("Gyroscope storage backends")
        for c in checks:
            print(c.line())
        print("All configured backends answered." if not failed else
              f"{len(failed)} configured backend(s) failed: " + ", ".join(c.backend for c in failed) + ".")
    return 1 if failed else 0
