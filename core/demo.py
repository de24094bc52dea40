"""Synthetic request history for demos and benchmarks (plausible, seeded, fast to write).

It tells one consistent story: a few outages of one model each, where the breaker opened
(its events are written too) and every request to that model got 'circuit_open' until it
closed again; the failures that opened it come just before."""

from __future__ import annotations

import random
import time

from . import prices
from .history import RequestRecord, _COLUMNS, _INSERT
from .models import new_request_id

# The very same rows again (same seed, same end) are skipped, not an error.
_INSERT_NEW = _INSERT.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)

MODELS = (("gpt-4o-mini", 0.6), ("gpt-4o", 0.15), ("gpt-4.1-mini", 0.2), ("gpt-4.1-nano", 0.05))
SOURCES = (("page", 0.5), ("api", 0.3), ("cli", 0.1), ("batch", 0.1))
ERROR_KINDS = ("server_error", "rate_limited", "timeout", "connection")
OUTAGES_PER_WEEK = 2
OUTAGE_S = (20 * 60, 50 * 60)        # how long the breaker stays open in one outage
FAILING_BEFORE_S = 5 * 60            # the failures that open it come in the minutes before
UPSTREAM = "simulator"


def _pick(rng: random.Random, table) -> str:
    return rng.choices([k for k, _ in table], [w for _, w in table])[0]


def outages(days: int, seed: int = 1, end: float | None = None) -> list[tuple[float, float, str]]:
    """(opened at, closed at, model) of each synthetic outage, oldest first."""
    rng = random.Random(f"outages:{seed}")
    end = time.time() if end is None else end
    start = end - days * 86400
    n = max(1, round(days / 7 * OUTAGES_PER_WEEK))
    out = []
    for k in range(n):
        opened = start + days * 86400 * (k + 0.15 + 0.7 * rng.random()) / n
        out.append((opened, min(end, opened + rng.uniform(*OUTAGE_S)), _pick(rng, MODELS)))
    return out


def breaker_events(windows: list[tuple[float, float, str]]) -> list[tuple]:
    """The breaker transitions of ``outages``: (ts, kind, subject, old, new, cause, actor)."""
    events = []
    for opened, closed, model in windows:
        name = f"{UPSTREAM}|{model}"
        events.append((opened, "breaker", name, "closed", "open",
                       "failure rate 60% over the last 50 attempts (last: server_error)", None))
        events.append((closed, "breaker", name, "open", "half-open", "reset timeout elapsed; probing", None))
        events.append((closed + 0.5, "breaker", name, "half-open", "closed", "probe succeeded", None))
    return events


def _state(windows, ts: float, model: str) -> str | None:
    for opened, closed, m in windows:
        if m == model:
            if opened <= ts < closed:
                return "open"
            if opened - FAILING_BEFORE_S <= ts < opened:
                return "failing"
    return None


def synthetic_records(rows: int, days: int, seed: int = 1, end: float | None = None):
    """Yield ``rows`` plausible RequestRecords spread over the last ``days`` days."""
    rng = random.Random(seed)
    end = time.time() if end is None else end
    start = end - days * 86400
    windows = outages(days, seed, end)
    for i in range(rows):
        ts = start + (end - start) * i / max(1, rows) + rng.random()
        model = _pick(rng, MODELS)
        source = _pick(rng, SOURCES)
        roll = rng.random()
        # The id carries the row's time: a second run with the same seed (its rows end at
        # another time) adds rows instead of colliding with the first run's ids.
        rec = RequestRecord(ts=ts, request_id=new_request_id(ts, rng), source=source,
                            provider="simulator", base_url="", upstream=UPSTREAM, model=model)
        state = _state(windows, ts, model)
        p, c = rng.randint(20, 900), rng.randint(30, 700)
        attempts = 1 + (rng.random() < 0.08) + (rng.random() < 0.02)
        rec.attempts = attempts
        rec.retry_wait_s = (attempts - 1) * rng.uniform(0.3, 3.0)
        if state == "open":     # the breaker refuses at once: nothing is sent
            rec.outcome, rec.error_kind, rec.attempts, rec.retry_wait_s = "circuit_open", "circuit_open", 0, 0.0
            rec.latency_ms = rng.uniform(0.1, 2)
        elif state == "failing" or roll < 0.05:
            rec.outcome = "error"
            rec.error_kind = "server_error" if state == "failing" else rng.choice(ERROR_KINDS)
            rec.http_status = {"server_error": 503, "rate_limited": 429}.get(rec.error_kind)
            rec.latency_ms = rng.uniform(200, 30000)
        elif roll < 0.07:
            rec.outcome = "cancelled"
            rec.prompt_tokens, rec.completion_tokens = p, c // 3
            rec.tokens_estimated = True
            rec.latency_ms = rng.uniform(300, 4000)
        else:
            rec.prompt_tokens, rec.completion_tokens = p, c
            rec.latency_ms = rng.lognormvariate(7.0, 0.5)
            rec.ttft_ms = rec.latency_ms * rng.uniform(0.05, 0.3)
            if roll > 0.75:
                rec.from_cache = True
                rec.latency_ms = rng.uniform(0.3, 3)
                rec.ttft_ms = rec.latency_ms
                rec.cost = 0.0
                rec.cost_saved = prices.cost(model, p, c) or 0.0
            else:
                rec.cost = prices.cost(model, p, c)
        if rec.prompt_tokens is not None:
            rec.total_tokens = rec.prompt_tokens + (rec.completion_tokens or 0)
            if rec.cost is None and rec.outcome == "cancelled":
                rec.cost = prices.cost(model, rec.prompt_tokens, rec.completion_tokens)
        if rng.random() < 0.1:
            rec.optimizer_tokens_saved = rng.randint(1, 40)
            rec.optimizer_cost_saved = prices.cost(model, rec.optimizer_tokens_saved, 0) or 0.0
        yield rec


# Plain ``?`` placeholders (the event's ts, kind, subject and new given twice), so the same
# statement runs on SQLite and PostgreSQL (core/storage/postgres.py).
_INSERT_EVENT = ("INSERT INTO events (ts, kind, subject, old, new, cause, actor) SELECT ?, ?, ?, ?, ?, ?, ? "
                 "WHERE NOT EXISTS (SELECT 1 FROM events WHERE ts = ? AND kind = ? AND subject = ? "
                 "AND new = ?)")


def fill_history(db, rows: int, days: int = 30, seed: int = 1, end: float | None = None,
                 chunk: int = 20_000) -> int:
    """Write synthetic history (and its breaker events) in large transactions; returns the
    number of request rows added."""
    end = time.time() if end is None else end
    events = breaker_events(outages(days, seed, end))
    events = [(*e, e[0], e[1], e[2], e[4]) for e in events]
    db.write(lambda conn: conn.executemany(_INSERT_EVENT, events).rowcount, timeout=None)
    written = 0
    batch: list[tuple] = []
    for rec in synthetic_records(rows, days, seed, end):
        batch.append(tuple(getattr(rec, c) for c in _COLUMNS))
        if len(batch) >= chunk:
            written += db.write(lambda conn, b=batch: conn.executemany(_INSERT_NEW, b).rowcount,
                                timeout=None)
            batch = []
    if batch:
        written += db.write(lambda conn, b=batch: conn.executemany(_INSERT_NEW, b).rowcount,
                            timeout=None)
    return written
