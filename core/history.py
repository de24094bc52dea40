"""Request history: exactly one row per request, and the SQL aggregations for charts."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from .errors import InvalidParameter

OUTCOMES = ("ok", "error", "cancelled", "circuit_open", "rejected")
FAILED = ("error", "circuit_open")


@dataclass
class RequestRecord:
    """One row of history."""

    ts: float
    request_id: str
    source: str = "api"
    provider: str = ""
    base_url: str = ""
    upstream: str = ""
    model: str = ""
    outcome: str = "ok"
    error_kind: str | None = None
    http_status: int | None = None
    error_message: str | None = None
    attempts: int = 0
    retry_wait_s: float = 0.0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    tokens_estimated: bool = False
    cost: float | None = None
    cost_unknown: bool = False
    from_cache: bool = False
    cost_saved: float = 0.0
    optimizer_tokens_saved: int = 0
    optimizer_cost_saved: float = 0.0


_COLUMNS = [f.name for f in dataclasses.fields(RequestRecord)]
_INSERT = (f"INSERT INTO requests ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


def insert_fn(record: RequestRecord):
    """A writer function that inserts ``record``."""
    values = tuple(getattr(record, c) for c in _COLUMNS)
    return lambda conn: conn.execute(_INSERT, values).lastrowid


@dataclass(frozen=True)
class Filters:
    """What the Metrics page, the API and the CLI filter history by."""

    start: float | None = None   # unix seconds, inclusive
    end: float | None = None     # unix seconds, exclusive
    models: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    tz: str = "UTC"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise InvalidParameter("The end of the range must be after its start.")
        try:
            ZoneInfo(self.tz)
        except Exception:
            raise InvalidParameter(f"Unknown time zone {self.tz!r}; use a name like Europe/Berlin.") from None

    def where(self) -> tuple[str, list[Any]]:
        """A WHERE clause and its parameters (values only ever as parameters)."""
        parts, params = ["1=1"], []
        if self.start is not None:
            parts.append("ts >= ?")
            params.append(self.start)
        if self.end is not None:
            parts.append("ts < ?")
            params.append(self.end)
        if self.models:
            parts.append(f"model IN ({','.join('?' * len(self.models))})")
            params.extend(self.models)
        if self.sources:
            parts.append(f"source IN ({','.join('?' * len(self.sources))})")
            params.extend(self.sources)
        return " AND ".join(parts), params


def parse_when(value: str | None) -> float | None:
    """Unix seconds from an ISO date/time (UTC unless it carries an offset), or None."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidParameter(f"{value!r} is not an ISO date such as 2026-11-01 or "
                               "2026-11-01T08:00:00+01:00.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _offset_segments(tz: str, start: float, end: float) -> list[tuple[float, int]]:
    """[(from_ts, utc_offset_s)] covering start..end, one entry per offset change."""
    zone = ZoneInfo(tz)

    def offset(ts: float) -> int:
        return int(dt.datetime.fromtimestamp(ts, zone).utcoffset().total_seconds())

    segments = [(start, offset(start))]
    step = 6 * 3600
    t = start
    while t < end:
        nxt = min(t + step, end)
        if offset(nxt) != segments[-1][1]:
            lo, hi = t, nxt  # bisect to the second the offset changed
            while hi - lo > 1:
                mid = (lo + hi) / 2
                if offset(mid) == segments[-1][1]:
                    lo = mid
                else:
                    hi = mid
            segments.append((hi, offset(nxt)))
        t = nxt
    return segments


def bucket_expr(unit: str, tz: str, start: float, end: float) -> tuple[str, list[Any]]:
    """SQL for the local day/hour number of ``ts`` in ``tz`` (DST-correct), and its params."""
    size = {"day": 86400, "hour": 3600}.get(unit)
    if size is None:
        raise InvalidParameter("unit must be 'day' or 'hour'.")
    segments = _offset_segments(tz, start, end)
    if len(segments) == 1:
        return f"CAST((ts + ?) / {size} AS INTEGER)", [segments[0][1]]
    case, params = "CASE", []
    for (_, off), (nxt, _) in zip(segments, segments[1:]):
        case += " WHEN ts < ? THEN ?"
        params += [nxt, off]
    case += " ELSE ? END"
    params.append(segments[-1][1])
    return f"CAST((ts + ({case})) / {size} AS INTEGER)", params


def bucket_label(unit: str, number: int) -> str:
    """The local date ('2026-11-25') or hour ('2026-11-25 14:00') of a bucket number."""
    epoch = dt.datetime(1970, 1, 1)
    if unit == "day":
        return (epoch + dt.timedelta(days=number)).date().isoformat()
    return (epoch + dt.timedelta(hours=number)).strftime("%Y-%m-%d %H:00")


class History:
    """Reads and writes request history and events in one Database."""

    def __init__(self, db) -> None:
        self.db = db

    # -- writing ---------------------------------------------------------------------
    def submit(self, record: RequestRecord):
        """Queue the row; the returned future resolves once it is committed."""
        return self.db.submit(insert_fn(record))

    async def asubmit(self, record: RequestRecord) -> int:
        """Insert the row from async code; returns once it is committed."""
        return await self.db.awrite_soon(insert_fn(record))

    def record(self, record: RequestRecord) -> int:
        """Insert the row and wait for its commit."""
        return self.db.write(insert_fn(record))

    def event(self, kind: str, subject: str, old: Any, new: Any, cause: str = "",
              actor: str | None = None, ts: float | None = None):
        """Queue an event (breaker transition, cache clear, fault change...)."""
        import time
        values = (ts if ts is not None else time.time(), kind, subject,
                  None if old is None else str(old), None if new is None else str(new), cause, actor)
        return self.db.submit(lambda conn: conn.execute(
            "INSERT INTO events (ts, kind, subject, old, new, cause, actor) VALUES (?,?,?,?,?,?,?)",
            values))

    # -- reading ---------------------------------------------------------------------
    def totals(self, filters: Filters = Filters()) -> dict:
        """Headline figures for a range (the numbers `stats --json` prints)."""
        where, params = filters.where()
        row = self.db.query_one(f"""
            SELECT count(*) AS total_requests,
                   coalesce(sum(outcome = 'ok'), 0) AS ok_requests,
                   coalesce(sum(from_cache), 0) AS cached_requests,
                   coalesce(sum(outcome IN ('error', 'circuit_open')), 0) AS failed_requests,
                   coalesce(sum(outcome = 'cancelled'), 0) AS cancelled_requests,
                   coalesce(sum(outcome = 'rejected'), 0) AS rejected_requests,
                   coalesce(sum(outcome = 'circuit_open'), 0) AS circuit_open_requests,
                   coalesce(sum(cost), 0.0) AS total_cost,
                   coalesce(sum(cost_unknown), 0) AS unknown_cost_requests,
                   coalesce(sum(cost_saved), 0.0) AS cost_saved,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   coalesce(sum(optimizer_tokens_saved), 0) AS optimizer_tokens_saved,
                   coalesce(sum(optimizer_cost_saved), 0.0) AS optimizer_cost_saved,
                   coalesce(sum(max(attempts - 1, 0)), 0) AS retries,
                   coalesce(sum(retry_wait_s), 0.0) AS retry_wait_s,
                   percentile(CASE WHEN outcome = 'ok' AND from_cache = 0 THEN latency_ms END, 50) AS latency_p50_ms,
                   percentile(CASE WHEN outcome = 'ok' AND from_cache = 0 THEN latency_ms END, 95) AS latency_p95_ms
            FROM requests WHERE {where}""", params) or {}
        total = row["total_requests"]
        ok = row["ok_requests"]
        row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        row["cache_hit_rate"] = row["cached_requests"] / ok if ok else 0.0
        row["failure_rate"] = row["failed_requests"] / total if total else 0.0
        row["success_rate"] = ok / total if total else 0.0
        row["average_cost"] = row["total_cost"] / ok if ok else 0.0
        row["retries_per_request"] = row["retries"] / total if total else 0.0
        return row

    def series(self, filters: Filters, unit: str = "day", by_model: bool = True) -> list[dict]:
        """Per local day/hour (and model): requests, errors, tokens, cost, latency..."""
        where, params = filters.where()
        start = filters.start if filters.start is not None else self._edge("min")
        end = filters.end if filters.end is not None else self._edge("max") + 1
        if start is None:
            return []
        expr, bparams = bucket_expr(unit, filters.tz, start, end)
        model_col = "model" if by_model else "'all'"
        rows = self.db.query(f"""
            SELECT {expr} AS bucket, {model_col} AS model,
                   count(*) AS requests,
                   sum(outcome = 'ok') AS ok,
                   sum(outcome IN ('error', 'circuit_open')) AS errors,
                   sum(outcome = 'cancelled') AS cancelled,
                   sum(from_cache) AS cached,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens,
                   coalesce(sum(cost), 0.0) AS cost,
                   coalesce(sum(cost_saved), 0.0) AS cost_saved,
                   coalesce(sum(optimizer_tokens_saved), 0) AS optimizer_tokens_saved,
                   sum(max(attempts - 1, 0)) AS retries,
                   coalesce(sum(retry_wait_s), 0.0) AS retry_wait_s,
                   percentile(CASE WHEN outcome = 'ok' AND from_cache = 0 THEN latency_ms END, 50) AS latency_p50_ms,
                   percentile(CASE WHEN outcome = 'ok' AND from_cache = 0 THEN latency_ms END, 95) AS latency_p95_ms,
                   percentile(CASE WHEN outcome = 'ok' AND from_cache = 0 THEN ttft_ms END, 50) AS ttft_p50_ms
            FROM requests WHERE {where}
            GROUP BY bucket, 2 ORDER BY bucket, 2""", bparams + params)
        for row in rows:
            row["bucket"] = bucket_label(unit, row["bucket"])
            row["hit_rate"] = row["cached"] / row["ok"] if row["ok"] else 0.0
        return rows

    def daily_cost_by_model(self, filters: Filters) -> list[dict]:
        """Cost per local day and model (the managers' chart), aggregated in SQL."""
        where, params = filters.where()
        start = filters.start if filters.start is not None else self._edge("min")
        end = filters.end if filters.end is not None else self._edge("max") + 1
        if start is None:
            return []
        expr, bparams = bucket_expr("day", filters.tz, start, end)
        rows = self.db.query(f"""
            SELECT {expr} AS bucket, model, count(*) AS requests,
                   coalesce(sum(cost), 0.0) AS cost, coalesce(sum(cost_saved), 0.0) AS cost_saved
            FROM requests WHERE {where} GROUP BY bucket, model ORDER BY bucket, model""",
                             bparams + params)
        for row in rows:
            row["bucket"] = bucket_label("day", row["bucket"])
        return rows

    def errors_by_kind(self, filters: Filters, unit: str = "day") -> list[dict]:
        """Failed requests per local bucket and error kind."""
        where, params = filters.where()
        start = filters.start if filters.start is not None else self._edge("min")
        end = filters.end if filters.end is not None else self._edge("max") + 1
        if start is None:
            return []
        expr, bparams = bucket_expr(unit, filters.tz, start, end)
        rows = self.db.query(f"""
            SELECT {expr} AS bucket, coalesce(error_kind, outcome) AS kind, count(*) AS n
            FROM requests WHERE {where} AND outcome IN ('error', 'circuit_open')
            GROUP BY bucket, kind ORDER BY bucket, kind""", bparams + params)
        for row in rows:
            row["bucket"] = bucket_label(unit, row["bucket"])
        return rows

    def rows(self, filters: Filters, limit: int | None = None) -> Iterator[dict]:
        """The raw rows of a range, newest first, streamed (for CSV export)."""
        where, params = filters.where()
        sql = f"SELECT * FROM requests WHERE {where} ORDER BY ts DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params = params + [int(limit)]
        cursor = self.db.reader().execute(sql, params)
        for row in cursor:
            yield dict(row)

    def events(self, kind: str | None = None, start: float | None = None,
               end: float | None = None, limit: int = 1000) -> list[dict]:
        """Events (breaker transitions, setting changes...), oldest first."""
        parts, params = ["1=1"], []
        if kind:
            parts.append("kind = ?")
            params.append(kind)
        if start is not None:
            parts.append("ts >= ?")
            params.append(start)
        if end is not None:
            parts.append("ts < ?")
            params.append(end)
        return self.db.query(
            f"SELECT * FROM (SELECT * FROM events WHERE {' AND '.join(parts)} "
            "ORDER BY id DESC LIMIT ?) ORDER BY id", params + [limit])

    def distinct(self, column: str) -> list[str]:
        """Distinct models or sources seen (for filter pickers)."""
        if column not in ("model", "source"):
            raise InvalidParameter("column must be model or source")
        return [r["v"] for r in self.db.query(
            f"SELECT DISTINCT {column} AS v FROM requests WHERE {column} IS NOT NULL ORDER BY 1")]

    def _edge(self, fn: str) -> float | None:
        row = self.db.query_one(f"SELECT {fn}(ts) AS t FROM requests")
        return row["t"] if row else None
