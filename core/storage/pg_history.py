"""Request history and events in PostgreSQL, shared by every replica.

The write path is History's (core/history.py): a row is handed out only once it is durable,
committed by PgDatabase's writer (group commit) or, while the server is gone, appended to
the spill journal and replayed when it is back (``ON CONFLICT DO NOTHING`` on the unique
``request_id``, so a replay repeated after a crash inserts nothing twice). Events take the
same way (unique ``uid``), and so do the batch ledger's done rows (core/storage/pg_ledger.py),
replayed under the ledger's fencing: a row is recorded done once, by the claim that holds it.

The read path aggregates in SQL over the raw rows (a range scan on ``ts``): sums of
expressions that mirror core/schema.py's ROLLUP_SUMS, local days and
hours as a floor over the zone's UTC offsets (core/buckets.py), and exact nearest-rank
percentiles with ``percentile_disc`` (the first value whose rank reaches p·n, as SQLite's
path computes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import psycopg

from ..buckets import _Buckets, bucket_label
from ..errors import InvalidParameter
from ..history import _INSERT, Filters, History, RequestRecord, _values, with_rates
from .pg_ledger import apply_done
from .postgres import PgConn, pg_error

# The rollup's sums (core/schema.py ROLLUP_SUMS) in PostgreSQL, with each sum's type.
# tests/test_postgres_backend.py checks the names match, so a new sum there fails here.
PG_SUMS: dict[str, tuple[str, str]] = {
    "requests": ("1", "bigint"),
    "ok": ("(outcome = 'ok')::int", "bigint"),
    "failed": ("(outcome IN ('error', 'circuit_open'))::int", "bigint"),
    "cancelled": ("(outcome = 'cancelled')::int", "bigint"),
    "rejected": ("(outcome = 'rejected')::int", "bigint"),
    "circuit_open": ("(outcome = 'circuit_open')::int", "bigint"),
    "cached": ("coalesce(from_cache, 0)", "bigint"),
    "cost": ("coalesce(cost, 0.0)", "float8"),
    "cost_unknown": ("coalesce(cost_unknown, 0)", "bigint"),
    "cost_saved": ("coalesce(cost_saved, 0.0)", "float8"),
    "prompt_tokens": ("coalesce(prompt_tokens, 0)", "bigint"),
    "completion_tokens": ("coalesce(completion_tokens, 0)", "bigint"),
    "optimizer_tokens_saved": ("coalesce(optimizer_tokens_saved, 0)", "bigint"),
    "optimizer_cost_saved": ("coalesce(optimizer_cost_saved, 0.0)", "float8"),
    "retries": ("coalesce(greatest(attempts - 1, 0), 0)", "bigint"),
    "retry_wait_s": ("coalesce(retry_wait_s, 0.0)", "float8"),
    "timed": ("coalesce((outcome = 'ok' AND from_cache = 0 AND latency_ms IS NOT NULL)::int, 0)", "bigint"),
    "cached_tokens": ("coalesce(cached_tokens, 0)", "bigint"),
    "cache_write_tokens": ("coalesce(cache_write_tokens, 0)", "bigint"),
    "reasoning_tokens": ("coalesce(reasoning_tokens, 0)", "bigint"),
    "upstream_prompt_tokens": ("CASE WHEN coalesce(from_cache, 0) = 0 THEN coalesce(prompt_tokens, 0) "
                               "ELSE 0 END", "bigint"),
    "estimated": ("coalesce(tokens_estimated, 0)", "bigint"),
}
_ERROR_KIND = "coalesce(error_kind, outcome)"
_IS_ERROR = "outcome IN ('error', 'circuit_open')"
_ANSWERED = "outcome = 'ok' AND from_cache = 0"


def _sum(name: str, alias: str | None = None) -> str:
    expr, kind = PG_SUMS[name]
    return f"coalesce(sum({expr}), 0)::{kind} AS {alias or name}"


def _pct(p: float, col: str = "latency_ms", alias: str = "") -> str:
    return (f"percentile_disc({p / 100.0}) WITHIN GROUP (ORDER BY {col}) "
            f"FILTER (WHERE {_ANSWERED} AND {col} IS NOT NULL) AS {alias}")


def bucket_sql(buckets: _Buckets, col: str = "ts") -> tuple[str, list[Any]]:
    """The bucket number of ``col`` (what _Buckets.sql computes), floored as PostgreSQL needs:
    its float-to-integer cast rounds where SQLite's truncates."""
    offset, params = buckets.offset_sql(col)
    return f"floor(({col} + {offset}) / {buckets.size})::bigint", params


def _where(filters: Filters) -> tuple[str, list[Any]]:
    return filters.where()      # ``?`` placeholders: PgDatabase's queries take them


class PgHistory(History):
    """History whose rows and events live in PostgreSQL (see the module's docstring)."""

    # -- writing ---------------------------------------------------------------------------
    def _insert_rows(self, conn: PgConn, sql: str, rows: list[tuple]) -> None:
        """All rows with one executemany; if the table refuses one, row by row in savepoints
        (the journal's replay comes as INSERT OR IGNORE: ON CONFLICT DO NOTHING here)."""
        if not rows:
            return
        try:
            with conn.raw.transaction():
                conn.executemany(sql, rows)
        except (psycopg.IntegrityError, psycopg.DataError):
            for values in rows:
                try:
                    with conn.raw.transaction():
                        conn.execute(sql, values)
                except (psycopg.IntegrityError, psycopg.DataError) as exc:
                    self._lose(1, pg_error(exc, self.db.path))

    def _replay_other(self, conn: PgConn, lines: list[dict]) -> None:
        """The batch ledger's done rows, in the order they were spooled, each in a savepoint
        (one the table refuses blocks no other; the server gone fails the whole replay)."""
        for line in lines:
            if line.get("_t") != "batch_done":
                super()._replay_other(conn, [line])
                continue
            try:
                with conn.raw.transaction():
                    apply_done(conn, line)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except (psycopg.Error, KeyError) as exc:
                self._lose(1, exc if isinstance(exc, KeyError) else pg_error(exc, self.db.path))

    def record(self, record: RequestRecord) -> int:
        """Insert the row and wait for its commit; its id."""
        values = _values(record)
        return self.db.write(lambda conn: conn.execute(_INSERT + " RETURNING id", values).fetchone()[0])

    # -- reading ---------------------------------------------------------------------------
    def totals(self, filters: Filters = Filters()) -> dict:
        """Headline figures for a range (the numbers `stats --json` prints)."""
        self.db.flush()
        where, params = _where(filters)
        row = self.db.query_one(f"""
            SELECT {_sum('requests', 'total_requests')}, {_sum('ok', 'ok_requests')},
                   {_sum('cached', 'cached_requests')}, {_sum('failed', 'failed_requests')},
                   {_sum('cancelled', 'cancelled_requests')}, {_sum('rejected', 'rejected_requests')},
                   {_sum('circuit_open', 'circuit_open_requests')}, {_sum('cost', 'total_cost')},
                   {_sum('cost_unknown', 'unknown_cost_requests')}, {_sum('cost_saved')},
                   {_sum('prompt_tokens')}, {_sum('completion_tokens')},
                   {_sum('optimizer_tokens_saved')}, {_sum('optimizer_cost_saved')},
                   {_sum('retries')}, {_sum('retry_wait_s')}, {_sum('cached_tokens')},
                   {_sum('cache_write_tokens')}, {_sum('reasoning_tokens')},
                   {_sum('upstream_prompt_tokens')}, {_sum('estimated', 'estimated_token_requests')},
                   {_pct(50, alias='latency_p50_ms')}, {_pct(95, alias='latency_p95_ms')}
            FROM requests WHERE {where}""", params)
        return with_rates(row)

    def _grouped(self, filters: Filters, unit: str, by_model: bool, select: str) -> list[dict]:
        """``select`` per local bucket (and model) over the filtered rows, in bucket order."""
        self.db.flush()
        span = self._span(filters)
        if span is None:
            return []
        buckets = _Buckets(unit, filters.tz, *span)
        expr, bparams = bucket_sql(buckets)
        where, params = _where(dataclasses.replace(filters, start=span[0], end=span[1]))
        model = "model" if by_model else "'all'"
        rows = self.db.query(f"""
            SELECT {expr} AS bucket, {model} AS model, {select} FROM requests WHERE {where}
            GROUP BY 1, 2 ORDER BY 1, 2""", bparams + params)
        for row in rows:
            row["bucket"] = bucket_label(unit, row["bucket"])
        return rows

    def series(self, filters: Filters, unit: str = "day", by_model: bool = True) -> list[dict]:
        """Per local day/hour (and model): requests, errors, tokens, cost, latency..."""
        names = ("requests", "ok", "cancelled", "cached", "prompt_tokens", "completion_tokens",
                 "cost", "cost_saved", "optimizer_tokens_saved", "retries", "retry_wait_s",
                 "cached_tokens", "reasoning_tokens", "upstream_prompt_tokens")
        rows = self._grouped(filters, unit, by_model, ", ".join(
            [_sum(n) for n in names] + [_sum("failed", "errors"), _pct(50, alias="latency_p50_ms"),
                                        _pct(95, alias="latency_p95_ms"),
                                        _pct(50, "ttft_ms", "ttft_p50_ms")]))
        for row in rows:
            row["hit_rate"] = row["cached"] / row["ok"] if row["ok"] else 0.0
            upstream = row["upstream_prompt_tokens"]
            row["prompt_cache_hit_rate"] = row["cached_tokens"] / upstream if upstream else None
        return rows

    def daily_cost_by_model(self, filters: Filters) -> list[dict]:
        """Cost per local day and model (the managers' chart), aggregated in SQL."""
        return self._grouped(filters, "day", True,
                             f"{_sum('requests')}, {_sum('cost')}, {_sum('cost_saved')}")

    def errors_by_kind(self, filters: Filters, unit: str = "day") -> list[dict]:
        """Failed requests per local bucket and error kind."""
        self.db.flush()
        span = self._span(filters)
        if span is None:
            return []
        expr, bparams = bucket_sql(_Buckets(unit, filters.tz, *span))
        where, params = _where(dataclasses.replace(filters, start=span[0], end=span[1]))
        rows = self.db.query(f"""
            SELECT {expr} AS bucket, {_ERROR_KIND} AS kind, count(*)::bigint AS n FROM requests
            WHERE {where} AND {_IS_ERROR} GROUP BY 1, 2 ORDER BY 1, 2""", bparams + params)
        for row in rows:
            row["bucket"] = bucket_label(unit, row["bucket"])
        return rows

    def rows(self, filters: Filters, limit: int | None = None) -> Iterator[dict]:
        """The raw rows of a range, newest first (for CSV export), read in pages."""
        self.db.flush()
        where, params = _where(filters)
        left = limit
        before: tuple[float, int] | None = None
        while left is None or left > 0:
            page = 1000 if left is None else min(1000, left)
            cond, cparams = (" AND (ts, id) < (?, ?)", list(before)) if before else ("", [])
            batch = self.db.query(f"SELECT * FROM requests WHERE {where}{cond} "
                                  f"ORDER BY ts DESC, id DESC LIMIT {page}", params + cparams)
            yield from batch
            if len(batch) < page:
                return
            before = (batch[-1]["ts"], batch[-1]["id"])
            if left is not None:
                left -= len(batch)

    def events(self, kind: str | None = None, start: float | None = None,
               end: float | None = None, limit: int = 1000) -> list[dict]:
        """Events (breaker transitions, setting changes...), oldest first."""
        parts, params = ["true"], []
        for cond, value in (("kind = ?", kind or None), ("ts >= ?", start), ("ts < ?", end)):
            if value is not None:
                parts.append(cond)
                params.append(value)
        self.db.flush()
        return self.db.query(f"SELECT * FROM (SELECT * FROM events WHERE {' AND '.join(parts)} "
                             "ORDER BY id DESC LIMIT ?) AS e ORDER BY id", params + [limit])

    def distinct(self, column: str) -> list[str]:
        """Distinct models or sources seen (for filter pickers)."""
        if column not in ("model", "source"):
            raise InvalidParameter("column must be model or source")
        self.db.flush()
        return [r["v"] for r in self.db.query(
            f"SELECT DISTINCT {column} AS v FROM requests WHERE {column} IS NOT NULL ORDER BY 1")]

    def _edge(self, fn: str) -> float | None:
        row = self.db.query_one(f"SELECT {fn}(ts) AS t FROM requests")
        return row["t"] if row else None

