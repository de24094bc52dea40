"""Synthetic request history for demos and benchmarks (plausible, seeded, fast to write)."""

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


def _pick(rng: random.Random, table) -> str:
    return rng.choices([k for k, _ in table], [w for _, w in table])[0]


def synthetic_records(rows: int, days: int, seed: int = 1, end: float | None = None):
    """Yield ``rows`` plausible RequestRecords spread over the last ``days`` days."""
    rng = random.Random(seed)
    end = time.time() if end is None else end
    start = end - days * 86400
    for i in range(rows):
        ts = start + (end - start) * i / max(1, rows) + rng.random()
        model = _pick(rng, MODELS)
        source = _pick(rng, SOURCES)
        roll = rng.random()
        # The id carries the row's time: a second run with the same seed (its rows end at
        # another time) adds rows instead of colliding with the first run's ids.
        rec = RequestRecord(ts=ts, request_id=new_request_id(ts, rng), source=source,
                            provider="simulator", base_url="", upstream="simulator", model=model)
        p, c = rng.randint(20, 900), rng.randint(30, 700)
        attempts = 1 + (rng.random() < 0.08) + (rng.random() < 0.02)
        rec.attempts = attempts
        rec.retry_wait_s = (attempts - 1) * rng.uniform(0.3, 3.0)
        if roll < 0.05:
            rec.outcome, rec.error_kind = "error", rng.choice(ERROR_KINDS)
            rec.http_status = {"server_error": 503, "rate_limited": 429}.get(rec.error_kind)
            rec.latency_ms = rng.uniform(200, 30000)
        elif roll < 0.06:
            rec.outcome, rec.error_kind, rec.attempts = "circuit_open", "circuit_open", 0
            rec.latency_ms = rng.uniform(0.1, 2)
        elif roll < 0.08:
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


def fill_history(db, rows: int, days: int = 30, seed: int = 1, end: float | None = None,
                 chunk: int = 20_000) -> int:
    """Write synthetic history in large transactions; returns the number of rows added."""
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
