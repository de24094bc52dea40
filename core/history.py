"""Request history: exactly one row per request, and the SQL aggregations for charts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import operator
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from .buckets import _AnsweredStats, _Buckets, _floats, _ranges_sql, bucket_label
from .db import storage_error
from .errors import InvalidParameter, StorageError
from .journal import SpillJournal, default_path
from .schema import ROLLUP_ERROR_KIND, ROLLUP_IS_ERROR, ROLLUP_SUMS




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
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    token_source: str | None = None       # 'reported', 'tokenizer' or 'estimated'
    finish_reason: str | None = None
    job_id: str | None = None         # the batch job of a batch row (m007)


_COLUMNS = [f.name for f in dataclasses.fields(RequestRecord)]
_INSERT = (f"INSERT INTO requests ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_INSERT_OR_IGNORE = _INSERT.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
_values = operator.attrgetter(*_COLUMNS)
_EVENT_COLUMNS = ("ts", "kind", "subject", "old", "new", "cause", "actor", "uid")
_INSERT_EVENT = (f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) "
                 f"VALUES ({', '.join('?' for _ in _EVENT_COLUMNS)})")
_INSERT_EVENT_OR_IGNORE = _INSERT_EVENT.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
PROBE_EVERY_S = 1.0     # while rows wait in the journal, how often the database is retried
# A row whose request ran alone (no other request of this process in flight) is committed on
# its caller's thread; rows of concurrent requests share the writer's commits. Measured at 1000
# concurrent: a commit per row on the event loop cost more CPU than handing rows to one shared
# commit; sequentially, the hand-offs cost more than the commit (docs/benchmarks.md). An
# earlier rule ("no other row in the last 5 ms") sent every row of a client whose answers take
# under 5 ms through the hand-offs.
_log = logging.getLogger(__name__)


def insert_fn(record: RequestRecord):
    """A writer function that inserts ``record``."""
    values = _values(record)
    return lambda conn: conn.execute(_INSERT, values).lastrowid


@dataclass(frozen=True)
class Filters:
    """What the Metrics page, the API and the CLI filter history by."""

    start: float | None = None   # unix seconds, inclusive
    end: float | None = None     # unix seconds, exclusive
    models: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    tz: str = "UTC"

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


class _Batch:
    """Rows that share one commit, and who waits for it (one future per event loop each)."""

    __slots__ = ("rows", "loops", "event", "done", "error")

    def __init__(self, done: bool = False, error: BaseException | None = None) -> None:
        self.rows: list[tuple] = []
        self.loops: dict | None = None          # {event loop: [futures]}
        self.event: threading.Event | None = None   # for blocking waiters
        self.done = done
        self.error = error


_SPOOLED = _Batch(done=True)      # the ticket of a row written straight to the journal
_COMMITTED = _Batch(done=True)    # the ticket of a row committed on the caller's thread


def _wake(futures: list) -> None:
    for fut in futures:
        if not fut.done():          # a waiter that was cancelled has gone
            fut.set_result(None)


class History:
    """Reads and writes request history and events in one Database.

    A row from ``add`` is durable when its ticket settles: committed, or (when the database
    refuses it) written to the spill journal, whose rows are replayed later. See
    docs/architecture.md, "Durability"."""

    def __init__(self, db, spill_path: str | Path | None = None) -> None:
        self.db = db
        self.lost_rows = 0                 # rows neither committed nor spooled
        self.last_loss: str | None = None
        self.journal = SpillJournal(spill_path or default_path(db.path))
        self.spilling = False              # rows go to the journal until a replay succeeds
        self.refusing: str | None = None   # why new requests are refused (the journal failed too)
        self._db_error: str = ""
        # Rows from add() gather in one batch; one writer function inserts all of them with
        # one executemany and one commit (measured under 1000 concurrent requests: a writer
        # call per row cost the request path several percent of its throughput).
        self._queued = _Batch()
        self._in_flight: _Batch | None = None
        self._lock = threading.Lock()
        self._replaying = False
        self._probe_at = 0.0
        self._running: list[None] = []     # one entry per request in flight (append/pop: atomic)
        if self.journal.pending:           # rows left by an earlier run (or process)
            self.replay()

    # -- writing ---------------------------------------------------------------------
    def submit(self, record: RequestRecord):
        """Queue the row; the returned future resolves once it is committed."""
        return self.db.submit(insert_fn(record))

    def add(self, record: RequestRecord) -> _Batch:
        """Commit the row on this thread when the writer is idle and the file free (no wait,
        no hand-off); else queue it for the writer's next commit, which starts at once when
        it is idle, and rows that arrive meanwhile share the one after. Returns a ticket for
        ``committed`` / ``wait``: the answer is handed out only once it settles."""
        values = _values(record)
        running = self._running
        alone = len(running) <= 1
        if running:
            running.pop()            # this request's row is in: it no longer counts as running
        if self.spilling:            # the database refused the last rows: do not wait on it
            return self._spool([values])
        if alone and self.db.commit_here(lambda conn: conn.execute(_INSERT, values)):
            return _COMMITTED        # a lone row, the writer idle, the file free: no hand-off
        with self._lock:
            batch = self._queued
            batch.rows.append(values)
            first = len(batch.rows) == 1
        if first:
            self.db.post(self._insert_queued, self._inserted, lazy=False)
        return batch

    async def committed(self, ticket: _Batch) -> None:
        """Wait (async) until the ticket's row is durable; StorageError if it cannot be."""
        if not ticket.done:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            with self._lock:
                if not ticket.done:
                    if ticket.loops is None:
                        ticket.loops = {}
                    ticket.loops.setdefault(loop, []).append(fut)
                else:
                    fut = None
            if fut is not None:
                await fut
        if ticket.error is not None:
            raise ticket.error

    def wait(self, ticket: _Batch, timeout: float = 60.0) -> None:
        """Wait (blocking) until the ticket's row is durable; StorageError if it cannot be."""
        if not ticket.done:
            with self._lock:
                event = None
                if not ticket.done:
                    event = ticket.event = ticket.event or threading.Event()
            if event is not None and not event.wait(timeout):
                raise StorageError(f"The database writer for {self.db.path} did not answer within "
                                   f"{timeout:.0f} s. Check the disk; restart Gyroscope if it persists.")
        if ticket.error is not None:
            raise ticket.error

    def begin_run(self) -> None:
        """A request starts (its one row comes to ``add`` when it ends): count it as in
        flight, so ``add`` knows whether other rows are coming to share a commit; then
        ``check_recording``."""
        self._running.append(None)
        self.check_recording()

    def check_recording(self) -> None:
        """Raise StorageError while rows can be neither committed nor spooled: a request is
        refused rather than answered unrecorded."""
        reason = self.refusing
        if reason is not None:
            self._probe_soon()
            raise StorageError(reason)

    def status(self) -> dict:
        """How recording goes: "ok", "spilling" (rows wait in the journal) or "refusing"."""
        self._probe_soon()
        waiting = self.journal.pending
        state = "refusing" if self.refusing else "spilling" if (self.spilling or waiting) else "ok"
        out = {"history": state, "spilled_rows_waiting": waiting, "history_rows_lost": self.lost_rows}
        if state != "ok":
            out["history_message"] = self.refusing or (
                f"The database is not taking rows ({self._db_error or 'replay pending'}); they "
                "are kept in the spill journal and replayed when it works again.")
        return out

    def _insert_queued(self, conn) -> None:
        """Writer function: insert every queued row; a refused row fails alone."""
        if self._in_flight is None:      # a rerun after another write failed keeps its rows
            with self._lock:
                self._in_flight, self._queued = self._queued, _Batch()
        self._insert_rows(conn, _INSERT, self._in_flight.rows)

    def _insert_rows(self, conn, sql: str, rows: list[tuple]) -> None:
        """All rows with one executemany; if the table refuses one, row by row, so only the
        refused rows are lost (counted and logged)."""
        conn.execute("SAVEPOINT rows")
        try:
            conn.executemany(sql, rows)
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO rows")
            for values in rows:
                try:
                    conn.execute(sql, values)
                except sqlite3.IntegrityError as exc:
                    self._lose(1, storage_error(exc, self.db.path))
        conn.execute("RELEASE rows")

    def _inserted(self, exc: BaseException | None) -> None:
        """Writer thread, after the commit (exc None) or its failure: settle the batch."""
        batch, self._in_flight = self._in_flight, None
        if batch is None:        # the transaction failed before our write ran: take the rows
            with self._lock:
                batch, self._queued = self._queued, _Batch()
        if exc is None:
            self._settle(batch, None)
            if self.journal.pending:
                self._probe_soon()
            return
        self._db_error = getattr(exc, "user_message", None) or str(exc)
        self.spilling = True
        self._probe_at = time.monotonic() + PROBE_EVERY_S
        _log.warning("The database refused %d history row(s); spooling them to %s: %s",
                     len(batch.rows), self.journal.path, self._db_error)
        spooled = self._spool(batch.rows) if batch.rows else _SPOOLED
        self._settle(batch, spooled.error)

    def _spool(self, rows: list[tuple]) -> _Batch:
        """Write rows to the spill journal; a failed write refuses new requests."""
        try:
            self.journal.append([dict(zip(_COLUMNS, values)) for values in rows])
        except StorageError as exc:
            self.refusing = ("Requests are refused because their history cannot be saved. "
                             f"{self._db_error or 'The database refused the rows.'} {exc.user_message} "
                             "Requests are accepted again as soon as either takes rows.")
            self._lose(len(rows), exc)
            return _Batch(done=True, error=StorageError(self.refusing, detail=exc.detail))
        self.refusing = None
        self._probe_soon()
        return _SPOOLED

    def _settle(self, batch: _Batch, error: BaseException | None) -> None:
        with self._lock:
            batch.done, batch.error = True, error
            loops, event = batch.loops, batch.event
        if event is not None:
            event.set()
        if loops:
            for loop, futures in loops.items():   # one wake-up per loop, not per request
                try:
                    loop.call_soon_threadsafe(_wake, futures)
                except RuntimeError:              # that loop has closed; nobody waits there
                    pass

    def _probe_soon(self) -> None:
        """Replay the journal if rows wait there and no attempt was made in the last second."""
        if self.journal.pending and not self._replaying and time.monotonic() >= self._probe_at:
            self.replay()

    def replay(self) -> None:
        """Move the journal's rows into the database (in the writer's next commit); rows
        already there are skipped, so a replay may safely repeat."""
        with self._lock:
            if self._replaying:
                return
            self._replaying = True
        self._probe_at = time.monotonic() + PROBE_EVERY_S
        end = [0]

        def write(conn) -> int:
            lines, end[0] = self.journal.read()
            rows, events, other = [], [], []
            for line in lines:          # request rows (no "_t"), events, batch results
                kind = line.get("_t")
                (rows if kind is None else events if kind == "event" else other).append(line)
            values = [tuple(row.get(c) for c in _COLUMNS) for row in rows]
            self._insert_rows(conn, _INSERT_OR_IGNORE, values)   # a refused line blocks no other
            # Events in the order they happened (ids follow it); their uid makes a repeated
            # replay insert each once.
            events.sort(key=lambda e: e.get("ts") or 0.0)
            self._insert_rows(conn, _INSERT_EVENT_OR_IGNORE,
                              [tuple(e.get(c) for c in _EVENT_COLUMNS) for e in events])
            if other:
                self._replay_other(conn, other)
            return len(lines)

        def done(exc: BaseException | None) -> None:
            if exc is None:
                self.journal.consume(end[0])
                self.spilling = False
                self.refusing = None
                _log.info("Replayed spooled history rows from %s", self.journal.path)
            self._replaying = False
            if exc is None and self.journal.pending:   # rows spooled while it ran
                self.replay()

        self.db.post(write, done, lazy=False)

    def _replay_other(self, conn, lines: list[dict]) -> None:
        """Journal lines other than rows and events (PostgreSQL's batch results): none here."""
        _log.warning("Skipping %d spill-journal line(s) of another backend (%s) in %s",
                     len(lines), ", ".join(sorted({str(l.get("_t")) for l in lines})), self.journal.path)

    def drain(self, timeout: float = 30.0) -> bool:
        """Replay the journal now and wait for it (blocking); True when nothing waits in it.
        False at once when the database refused the replay (it is still unreachable)."""
        deadline = time.monotonic() + timeout
        while self.journal.pending and time.monotonic() < deadline:
            self.replay()
            self.db.flush(timeout=max(0.1, deadline - time.monotonic()))
            if self.journal.pending and not self._replaying:
                return False
        return not self.journal.pending

    def _lose(self, rows: int, exc: BaseException) -> None:
        self.lost_rows += rows
        self.last_loss = getattr(exc, "user_message", None) or str(exc)
        _log.error("%d request history row(s) were not saved: %s", rows, self.last_loss)

    def record(self, record: RequestRecord) -> int:
        """Insert the row and wait for its commit."""
        return self.db.write(insert_fn(record))

    def event(self, kind: str, subject: str, old: Any, new: Any, cause: str = "",
              actor: str | None = None, ts: float | None = None) -> Future:
        """Queue an event (breaker transition, cache clear, fault change...). The future
        resolves once it is committed or, when the database refuses it (PostgreSQL gone), kept
        in the spill journal with the rows: replayed in order, each once (its ``uid``)."""
        line = {"_t": "event", "ts": ts if ts is not None else time.time(), "kind": kind,
                "subject": subject, "old": None if old is None else str(old),
                "new": None if new is None else str(new), "cause": cause, "actor": actor,
                "uid": uuid.uuid4().hex}
        fut: Future = Future()
        if self.spilling:            # rows go to the journal: so do events, in the same order
            self._spool_event(line, fut)
            return fut
        values = tuple(line[c] for c in _EVENT_COLUMNS)

        def done(exc: BaseException | None) -> None:
            if exc is None:
                fut.set_result(None)
            elif isinstance(exc, StorageError):     # the database refused it: keep it
                self._db_error = getattr(exc, "user_message", None) or str(exc)
                self.spilling = True
                self._probe_at = time.monotonic() + PROBE_EVERY_S
                self._spool_event(line, fut)
            else:
                fut.set_exception(exc)
        self.db.post(lambda conn: conn.execute(_INSERT_EVENT, values), done)
        return fut

    def _spool_event(self, line: dict, fut: Future) -> None:
        try:
            self.journal.append([line])
        except StorageError as exc:
            _log.error("An event (%s %s) was not saved: %s", line["kind"], line["subject"],
                       exc.user_message)
            fut.set_exception(exc)
            return
        fut.set_result(None)
        self._probe_soon()

    # -- reading ---------------------------------------------------------------------
    # Sums come from the hourly rollup (migration m002) for every hour that lies wholly in
    # the range and in one bucket, and from the raw rows for the rest (the range's ends,
    # hours cut by a half-hour zone's midnight): the same counts, and the same sums up to
    # float rounding, from one row per hour, model and source instead of one per request.
    # Percentiles stay exact nearest-rank over the raw rows, read through partial indexes.

    def totals(self, filters: Filters = Filters()) -> dict:
        """Headline figures for a range (the numbers `stats --json` prints)."""
        with self._snapshot():
            span = self._span(filters)
            inner, params = self._sum_rows(filters, span, None, [c for c, _ in ROLLUP_SUMS])
            row = self.db.query_one(f"""
                SELECT coalesce(sum(requests), 0) AS total_requests,
                       coalesce(sum(ok), 0) AS ok_requests,
                       coalesce(sum(cached), 0) AS cached_requests,
                       coalesce(sum(failed), 0) AS failed_requests,
                       coalesce(sum(cancelled), 0) AS cancelled_requests,
                       coalesce(sum(rejected), 0) AS rejected_requests,
                       coalesce(sum(circuit_open), 0) AS circuit_open_requests,
                       coalesce(sum(cost), 0.0) AS total_cost,
                       coalesce(sum(cost_unknown), 0) AS unknown_cost_requests,
                       coalesce(sum(cost_saved), 0.0) AS cost_saved,
                       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                       coalesce(sum(completion_tokens), 0) AS completion_tokens,
                       coalesce(sum(optimizer_tokens_saved), 0) AS optimizer_tokens_saved,
                       coalesce(sum(optimizer_cost_saved), 0.0) AS optimizer_cost_saved,
                       coalesce(sum(retries), 0) AS retries,
                       coalesce(sum(retry_wait_s), 0.0) AS retry_wait_s,
                       coalesce(sum(cached_tokens), 0) AS cached_tokens,
                       coalesce(sum(cache_write_tokens), 0) AS cache_write_tokens,
                       coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
                       coalesce(sum(upstream_prompt_tokens), 0) AS upstream_prompt_tokens,
                       coalesce(sum(estimated), 0) AS estimated_token_requests,
                       coalesce(sum(timed), 0) AS timed
                FROM ({inner})""", params)
            timed = row.pop("timed")
            row["latency_p50_ms"] = self._latency_percentile(filters, 50, timed)
            row["latency_p95_ms"] = self._latency_percentile(filters, 95, timed)
        return with_rates(row)

    def series(self, filters: Filters, unit: str = "day", by_model: bool = True) -> list[dict]:
        """Per local day/hour (and model): requests, errors, tokens, cost, latency..."""
        with self._snapshot():
            span = self._span(filters)
            if span is None:
                return []
            buckets = _Buckets(unit, filters.tz, *span)
            rows = self._bucket_sums(filters, span, buckets, by_model, """
                sum(requests) AS requests, sum(ok) AS ok, sum(failed) AS errors,
                sum(cancelled) AS cancelled, sum(cached) AS cached,
                sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
                sum(cost) AS cost, sum(cost_saved) AS cost_saved,
                sum(optimizer_tokens_saved) AS optimizer_tokens_saved,
                sum(retries) AS retries, sum(retry_wait_s) AS retry_wait_s,
                sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens,
                sum(upstream_prompt_tokens) AS upstream_prompt_tokens""",
                ("requests", "ok", "failed", "cancelled", "cached", "prompt_tokens",
                 "completion_tokens", "cost", "cost_saved", "optimizer_tokens_saved", "retries",
                 "retry_wait_s", "cached_tokens", "reasoning_tokens", "upstream_prompt_tokens"))
            found = self._answered_stats(filters, buckets, by_model)
        for row in rows:
            p50, p95, ttft = found.get((row["bucket"], row["model"]), (None, None, None))
            row.update(latency_p50_ms=p50, latency_p95_ms=p95, ttft_p50_ms=ttft)
            row["bucket"] = bucket_label(unit, row["bucket"])
            row["hit_rate"] = row["cached"] / row["ok"] if row["ok"] else 0.0
            upstream = row["upstream_prompt_tokens"]
            row["prompt_cache_hit_rate"] = row["cached_tokens"] / upstream if upstream else None
        return rows

    def daily_cost_by_model(self, filters: Filters) -> list[dict]:
        """Cost per local day and model (the managers' chart), aggregated in SQL."""
        with self._snapshot():
            span = self._span(filters)
            if span is None:
                return []
            rows = self._bucket_sums(
                filters, span, _Buckets("day", filters.tz, *span), True,
                "sum(requests) AS requests, sum(cost) AS cost, sum(cost_saved) AS cost_saved",
                ("requests", "cost", "cost_saved"))
        for row in rows:
            row["bucket"] = bucket_label("day", row["bucket"])
        return rows

    def errors_by_kind(self, filters: Filters, unit: str = "day") -> list[dict]:
        """Failed requests per local bucket and error kind."""
        with self._snapshot():
            span = self._span(filters)
            if span is None:
                return []
            buckets = _Buckets(unit, filters.tz, *span)
            rollup, raw, params = self._parts(filters, span, buckets)
            parts = []
            if rollup:
                parts.append(f"SELECT hour * 3600 AS ts, kind, n FROM request_hour_errors WHERE {rollup}")
            if raw:
                parts.append(f"SELECT ts, {ROLLUP_ERROR_KIND.format(r='')} AS kind, 1 AS n FROM requests "
                             f"WHERE {raw} AND {ROLLUP_IS_ERROR.format(r='')}")
            expr, bparams = buckets.sql()
            rows = self.db.query(f"""
                SELECT {expr} AS bucket, kind, sum(n) AS n FROM ({' UNION ALL '.join(parts)})
                GROUP BY bucket, kind HAVING sum(n) > 0 ORDER BY bucket, kind""", bparams + params)
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
        self.db.flush()
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
        self.db.flush()
        return self.db.query(
            f"SELECT * FROM (SELECT * FROM events WHERE {' AND '.join(parts)} "
            "ORDER BY id DESC LIMIT ?) ORDER BY id", params + [limit])

    def distinct(self, column: str) -> list[str]:
        """Distinct models or sources seen (for filter pickers)."""
        if column not in ("model", "source"):
            raise InvalidParameter("column must be model or source")
        self.db.flush()
        # Skip from one value to the next along the rollup's index: a few lookups, not a scan.
        return [r["v"] for r in self.db.query(f"""
            WITH RECURSIVE seen(v) AS (
                SELECT min({column}) FROM request_hours WHERE requests > 0
                UNION ALL
                SELECT (SELECT min({column}) FROM request_hours WHERE {column} > seen.v AND requests > 0)
                FROM seen WHERE seen.v IS NOT NULL)
            SELECT v FROM seen WHERE v IS NOT NULL""")]

    def _edge(self, fn: str) -> float | None:
        row = self.db.query_one(f"SELECT {fn}(ts) AS t FROM requests")
        return row["t"] if row else None

    def _span(self, filters: Filters) -> tuple[float, float] | None:
        """The range to read: the filter's, or from the first row to just past the last."""
        start = filters.start if filters.start is not None else self._edge("min")
        if start is None:
            return None
        if filters.end is not None:
            return start, filters.end
        last = self._edge("max")
        return (start, last + 1) if last is not None else None

    @contextlib.contextmanager
    def _snapshot(self):
        """One read transaction, so the rollup, the raw ends and the percentiles agree."""
        conn = self.db.reader()
        if conn.in_transaction:
            yield conn
            return
        self.db.flush()      # this process's queued rows count: a caller reads its own writes
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _parts(self, filters: Filters, span: tuple[float, float] | None,
               buckets: _Buckets | None) -> tuple[str, str, list[Any]]:
        """WHERE clauses for the rollup tables and for the raw rows (either may be ''),
        and their params: whole hours inside one bucket from the rollup, the rest raw."""
        other, oparams = dataclasses.replace(filters, start=None, end=None).where()
        if span is None:
            return "", "", []
        start, end = span
        first, last = math.ceil(start / 3600), math.floor(end / 3600)   # whole hours: [first, last)
        if first >= last:
            where, params = _ranges_sql("ts", [(start, end)])
            return "", f"{where} AND {other}", params + oparams
        dirty = sorted({int(c // 3600) for c in (buckets.cuts() if buckets else [])
                        if c % 3600 and first <= c // 3600 < last})
        raw = [(start, first * 3600)] if start < first * 3600 else []
        for hour in dirty:
            raw.append((hour * 3600, hour * 3600 + 3600))
        if last * 3600 < end:
            raw.append((last * 3600, end))
        merged: list[tuple[float, float]] = []
        for lo, hi in raw:
            if merged and merged[-1][1] >= lo:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        rollup, rparams = "", []
        if len(dirty) < last - first:
            rollup = f"hour >= ? AND hour < ? AND {other}"
            rparams = [first, last, *oparams]
            if dirty:
                rollup += f" AND hour NOT IN ({','.join('?' * len(dirty))})"
                rparams += dirty
        where, params = _ranges_sql("ts", merged) if merged else ("", [])
        raw_where = f"{where} AND {other}" if merged else ""
        return rollup, raw_where, rparams + (params + oparams if merged else [])

    def _sum_rows(self, filters: Filters, span, buckets: _Buckets | None,
                  columns) -> tuple[str, list[Any]]:
        """A subquery of (ts, model, source, *columns) rows whose sums are the range's sums."""
        rollup, raw, params = self._parts(filters, span, buckets)
        exprs = dict(ROLLUP_SUMS)
        parts = []
        if rollup:
            parts.append(f"SELECT hour * 3600 AS ts, model, source, {', '.join(columns)} "
                         f"FROM request_hours WHERE {rollup}")
        if raw:
            cols = ", ".join(f"{exprs[c].format(r='')} AS {c}" for c in columns)
            parts.append(f"SELECT ts, model, source, {cols} FROM requests WHERE {raw}")
        if not parts:
            parts.append(f"SELECT 0 AS ts, NULL AS model, NULL AS source, "
                         f"{', '.join(f'0 AS {c}' for c in columns)} WHERE 0")
        return " UNION ALL ".join(parts), params

    def _bucket_sums(self, filters: Filters, span, buckets: _Buckets, by_model: bool,
                     select: str, columns) -> list[dict]:
        inner, params = self._sum_rows(filters, span, buckets, columns)
        expr, bparams = buckets.sql()
        model_col = "model" if by_model else "'all'"
        return self.db.query(f"""
            SELECT {expr} AS bucket, {model_col} AS model, {select} FROM ({inner})
            GROUP BY bucket, 2 HAVING sum(requests) > 0 ORDER BY bucket, 2""", bparams + params)

    def _latency_percentile(self, filters: Filters, p: float, n: int) -> float | None:
        """Exact nearest-rank latency percentile of the n answered requests in ``filters``,
        by walking the latency index from the nearer end (no sort, no rows in Python)."""
        if n <= 0:
            return None
        k = max(1, math.ceil(p / 100.0 * n))
        order, offset = ("ASC", k - 1) if k - 1 <= n - k else ("DESC", n - k)
        where, params = filters.where()
        row = self.db.query_one(f"""
            SELECT latency_ms FROM requests INDEXED BY idx_requests_ok_latency
            WHERE outcome = 'ok' AND from_cache = 0 AND latency_ms IS NOT NULL AND {where}
            ORDER BY latency_ms {order} LIMIT 1 OFFSET ?""", params + [offset])
        return row["latency_ms"] if row else None

    def _answered_stats(self, filters: Filters, buckets: _Buckets,
                        by_model: bool) -> dict[tuple[int, str], tuple]:
        """{(bucket, model): (latency p50, p95, ttft p50)}, one bucket at a time in time order."""
        conn = self.db.reader()
        conn.create_aggregate("answered_stats", 2, _AnsweredStats)
        other, oparams = dataclasses.replace(filters, start=None, end=None).where()
        group = "model AS model" if by_model else "'all' AS model"
        found = {}
        for number, ranges in buckets.extents():
            where, params = _ranges_sql("ts", ranges)
            for row in self.db.query(f"""
                    SELECT {group}, answered_stats(latency_ms, ttft_ms) AS s
                    FROM requests INDEXED BY idx_requests_ok_ts
                    WHERE outcome = 'ok' AND from_cache = 0 AND {where} AND {other}
                    {'GROUP BY model' if by_model else ''}""", params + oparams):
                if row["s"] is not None:
                    found[(number, row["model"])] = tuple(_floats(row["s"]))
        return found


def with_rates(row: dict) -> dict:
    """``totals``' derived figures (tokens, hit, failure and success rates, averages) added
    to its summed row; shared by the SQLite and PostgreSQL histories."""
    total = row["total_requests"]
    ok = row["ok_requests"]
    row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
    row["cache_hit_rate"] = row["cached_requests"] / ok if ok else 0.0
    upstream = row["upstream_prompt_tokens"]
    row["prompt_cache_hit_rate"] = row["cached_tokens"] / upstream if upstream else 0.0
    row["failure_rate"] = row["failed_requests"] / total if total else 0.0
    row["success_rate"] = ok / total if total else 0.0
    row["average_cost"] = row["total_cost"] / ok if ok else 0.0
    row["retries_per_request"] = row["retries"] / total if total else 0.0
    return row
