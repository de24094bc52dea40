"""Schema of the SQLite file, as sqlite-utils migrations (append new ones, never edit)."""

from __future__ import annotations

from sqlite_utils.migrations import Migrations

migrations = Migrations("gyroscope")


@migrations()
def m001_initial(db) -> None:
    db["requests"].create({
        "id": int, "ts": float, "request_id": str, "source": str, "provider": str,
        "base_url": str, "upstream": str, "model": str, "outcome": str, "error_kind": str,
        "http_status": int, "error_message": str, "attempts": int, "retry_wait_s": float,
        "latency_ms": float, "ttft_ms": float, "prompt_tokens": int,
        "completion_tokens": int, "total_tokens": int, "tokens_estimated": int,
        "cost": float, "cost_unknown": int, "from_cache": int, "cost_saved": float,
        "optimizer_tokens_saved": int, "optimizer_cost_saved": float,
    }, pk="id", not_null={"ts", "request_id", "outcome"},
        defaults={"attempts": 0, "retry_wait_s": 0.0, "from_cache": 0, "cost_saved": 0.0,
                  "tokens_estimated": 0, "cost_unknown": 0, "optimizer_tokens_saved": 0,
                  "optimizer_cost_saved": 0.0})
    db["requests"].create_index(["request_id"], unique=True)
    # Covering index for the charts: range scans by time never touch the table.
    db.execute(
        "CREATE INDEX idx_requests_ts_cover ON requests (ts, model, source, outcome, "
        "from_cache, cost, cost_saved, prompt_tokens, completion_tokens, latency_ms)")

    db["events"].create({
        "id": int, "ts": float, "kind": str, "subject": str, "old": str, "new": str,
        "cause": str, "actor": str,
    }, pk="id", not_null={"ts", "kind"})
    db["events"].create_index(["kind", "ts"])

    db["settings"].create({
        "name": str, "value": str, "version": int, "updated_at": float, "updated_by": str,
    }, pk="name")
    db["meta"].create({"key": str, "value": str}, pk="key")

    db["cache"].create({
        "key": str, "created_at": float, "last_used_at": float, "hits": int,
        "provider": str, "model": str, "content": str, "finish_reason": str,
        "prompt_tokens": int, "completion_tokens": int, "cost": float, "bytes": int,
    }, pk="key", defaults={"hits": 0})
    db["cache"].create_index(["last_used_at"])
    db["cache"].create_index(["created_at"])

    db["breakers"].create({
        "name": str, "state": str, "fail_counter": int, "success_counter": int,
        "opened_at": float, "updated_at": float,
    }, pk="name", defaults={"state": "closed", "fail_counter": 0, "success_counter": 0})


# Per-row contributions to the hourly rollup, as SQL over one `requests` row (``{r}`` is
# ``new.``/``old.`` in the triggers, empty in queries over raw rows). Frozen with m002:
# changing a column means a new migration that rebuilds the rollup (m006 did, see
# ROLLUP_SUMS below).
ROLLUP_SUMS_M002 = (
    ("requests", "1"),
    ("ok", "{r}outcome = 'ok'"),
    ("failed", "{r}outcome IN ('error', 'circuit_open')"),
    ("cancelled", "{r}outcome = 'cancelled'"),
    ("rejected", "{r}outcome = 'rejected'"),
    ("circuit_open", "{r}outcome = 'circuit_open'"),
    ("cached", "coalesce({r}from_cache, 0)"),
    ("cost", "coalesce({r}cost, 0.0)"),
    ("cost_unknown", "coalesce({r}cost_unknown, 0)"),
    ("cost_saved", "coalesce({r}cost_saved, 0.0)"),
    ("prompt_tokens", "coalesce({r}prompt_tokens, 0)"),
    ("completion_tokens", "coalesce({r}completion_tokens, 0)"),
    ("optimizer_tokens_saved", "coalesce({r}optimizer_tokens_saved, 0)"),
    ("optimizer_cost_saved", "coalesce({r}optimizer_cost_saved, 0.0)"),
    ("retries", "coalesce(max({r}attempts - 1, 0), 0)"),
    ("retry_wait_s", "coalesce({r}retry_wait_s, 0.0)"),
    # answered upstream (not from the cache) with a latency: what the percentiles rank
    ("timed", "coalesce({r}outcome = 'ok' AND {r}from_cache = 0 AND {r}latency_ms IS NOT NULL, 0)"),
)
ROLLUP_ERROR_KIND = "coalesce({r}error_kind, {r}outcome)"
ROLLUP_IS_ERROR = "{r}outcome IN ('error', 'circuit_open')"


def _rollup_add(r: str, sums=ROLLUP_SUMS_M002) -> str:
    cols = ", ".join(c for c, _ in sums)
    values = ", ".join(e.format(r=r) for _, e in sums)
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c, _ in sums)
    return (f"INSERT INTO request_hours (hour, model, source, {cols}) "
            f"VALUES (CAST({r}ts / 3600 AS INTEGER), {r}model, {r}source, {values}) "
            f"ON CONFLICT (hour, model, source) DO UPDATE SET {updates};\n"
            f"INSERT INTO request_hour_errors (hour, model, source, kind, n) "
            f"SELECT CAST({r}ts / 3600 AS INTEGER), {r}model, {r}source, "
            f"{ROLLUP_ERROR_KIND.format(r=r)}, 1 WHERE {ROLLUP_IS_ERROR.format(r=r)} "
            f"ON CONFLICT (hour, model, source, kind) DO UPDATE SET n = n + 1;\n")


def _rollup_remove(r: str, sums=ROLLUP_SUMS_M002) -> str:
    # `IS` and one rowid, because a NULL model or source never conflicts, so such rows
    # may be spread over several rollup rows.
    updates = ", ".join(f"{c} = {c} - ({e.format(r=r)})" for c, e in sums)
    hour = f"CAST({r}ts / 3600 AS INTEGER)"
    return (f"UPDATE request_hours SET {updates} WHERE rowid = (SELECT rowid FROM request_hours "
            f"WHERE hour = {hour} AND model IS {r}model AND source IS {r}source LIMIT 1);\n"
            f"UPDATE request_hour_errors SET n = n - 1 WHERE rowid = (SELECT rowid FROM "
            f"request_hour_errors WHERE {ROLLUP_IS_ERROR.format(r=r)} AND hour = {hour} AND "
            f"model IS {r}model AND source IS {r}source AND kind = {ROLLUP_ERROR_KIND.format(r=r)} "
            f"LIMIT 1);\n")


@migrations()
def m002_hourly_rollup(db) -> None:
    """Hourly sums per model and source, kept by triggers, so charts over a year stay fast.

    Every zone in use today is offset from UTC by whole quarter hours, and nearly all by
    whole hours; History reads the hours that fall inside one local day/hour from here and
    only the hours cut by a boundary (range ends, half-hour zones) from the raw rows.
    """
    real = {"cost", "cost_saved", "optimizer_cost_saved", "retry_wait_s"}
    sums = ", ".join(f"{c} {'REAL' if c in real else 'INTEGER'} NOT NULL DEFAULT 0" for c, _ in ROLLUP_SUMS_M002)
    db.execute(f"CREATE TABLE request_hours (hour INTEGER NOT NULL, model TEXT, source TEXT, {sums}, "
               "PRIMARY KEY (hour, model, source))")
    db.execute("CREATE TABLE request_hour_errors (hour INTEGER NOT NULL, model TEXT, source TEXT, "
               "kind TEXT, n INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (hour, model, source, kind))")
    cols = ", ".join(c for c, _ in ROLLUP_SUMS_M002)
    exprs = ", ".join(f"sum({e.format(r='')})" for _, e in ROLLUP_SUMS_M002)
    db.execute(f"INSERT INTO request_hours (hour, model, source, {cols}) "
               f"SELECT CAST(ts / 3600 AS INTEGER), model, source, {exprs} FROM requests GROUP BY 1, 2, 3")
    db.execute("INSERT INTO request_hour_errors (hour, model, source, kind, n) "
               f"SELECT CAST(ts / 3600 AS INTEGER), model, source, {ROLLUP_ERROR_KIND.format(r='')}, "
               f"count(*) FROM requests WHERE {ROLLUP_IS_ERROR.format(r='')} GROUP BY 1, 2, 3, 4")
    db.execute(f"CREATE TRIGGER requests_rollup_insert AFTER INSERT ON requests BEGIN\n"
               f"{_rollup_add('new.')}END")
    db.execute(f"CREATE TRIGGER requests_rollup_delete AFTER DELETE ON requests BEGIN\n"
               f"{_rollup_remove('old.')}END")
    db.execute(f"CREATE TRIGGER requests_rollup_update AFTER UPDATE ON requests BEGIN\n"
               f"{_rollup_remove('old.')}{_rollup_add('new.')}END")
    db.execute("CREATE INDEX idx_request_hours_model ON request_hours (model)")
    db.execute("CREATE INDEX idx_request_hours_source ON request_hours (source)")
    # Exact latency percentiles: walk answered requests in latency order (p95 from the top)
    # instead of sorting a range's rows in Python.
    db.execute("CREATE INDEX idx_requests_ok_latency ON requests (latency_ms, ts, model, source) "
               "WHERE outcome = 'ok' AND from_cache = 0")
    # Per-bucket percentiles: answered requests in time order, covering what they read.
    db.execute("CREATE INDEX idx_requests_ok_ts ON requests (ts, outcome, from_cache, model, source, "
               "latency_ms, ttft_ms) WHERE outcome = 'ok' AND from_cache = 0")


@migrations()
def m003_probe_leases(db) -> None:
    """Half-open probe slots shared by every process on the file. A slot is a lease that
    expires, so a process that dies holding one cannot keep the breaker shut."""
    db.execute("CREATE TABLE breaker_probes (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
               "expires_at REAL NOT NULL)")
    db.execute("CREATE INDEX idx_breaker_probes_name ON breaker_probes (name, expires_at)")


@migrations()
def m004_breaker_open_for(db) -> None:
    """How long an open breaker stays open when the upstream said (Retry-After); NULL means
    breaker.reset_timeout_s. Shared, so every process probes at the same time."""
    db.execute("ALTER TABLE breakers ADD COLUMN open_for_s REAL")


@migrations()
def m005_pacing(db) -> None:
    """Rate-limit buckets learnt from the upstream's headers (or the pacing settings), one row
    per (upstream+model, dimension), shared by every process on the file (core.resilience.pacing)."""
    db.execute("CREATE TABLE pacing (key TEXT NOT NULL, dim TEXT NOT NULL, lim REAL NOT NULL, "
               "remaining REAL NOT NULL, reset_at REAL NOT NULL, window_s REAL NOT NULL, "
               "learned INTEGER NOT NULL DEFAULT 0, updated_at REAL, PRIMARY KEY (key, dim))")


# The rollup's sums since m006: m002's, plus the usage details (cached prompt tokens,
# cache writes, reasoning tokens), the prompt tokens the upstream answered (not our cache:
# the base of the provider's prompt-cache hit rate) and the rows with estimated counts.
ROLLUP_SUMS = ROLLUP_SUMS_M002 + (
    ("cached_tokens", "coalesce({r}cached_tokens, 0)"),
    ("cache_write_tokens", "coalesce({r}cache_write_tokens, 0)"),
    ("reasoning_tokens", "coalesce({r}reasoning_tokens, 0)"),
    ("upstream_prompt_tokens",
     "CASE WHEN coalesce({r}from_cache, 0) = 0 THEN coalesce({r}prompt_tokens, 0) ELSE 0 END"),
    ("estimated", "coalesce({r}tokens_estimated, 0)"),
)


@migrations()
def m006_usage_details(db) -> None:
    """Usage details per request (cached, cache-write and reasoning tokens; where the counts
    came from: 'reported', 'tokenizer' (the server's /tokenize) or 'estimated'; the finish
    reason), summed in the hourly rollup, whose triggers are rebuilt with the new sums."""
    for col, kind in (("cached_tokens", "INTEGER"), ("cache_write_tokens", "INTEGER"),
                      ("reasoning_tokens", "INTEGER"), ("token_source", "TEXT"),
                      ("finish_reason", "TEXT")):
        db.execute(f"ALTER TABLE requests ADD COLUMN {col} {kind}")
    added = ROLLUP_SUMS[len(ROLLUP_SUMS_M002):]
    for col, _ in added:
        db.execute(f"ALTER TABLE request_hours ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0")
    sets = ", ".join(f"{c} = coalesce(s.{c}, 0)" for c, _ in added)
    exprs = ", ".join(f"sum({e.format(r='')}) AS {c}" for c, e in added)
    db.execute(f"""UPDATE request_hours SET {sets} FROM (
        SELECT CAST(ts / 3600 AS INTEGER) AS hour, model, source, {exprs} FROM requests GROUP BY 1, 2, 3
        ) AS s WHERE s.hour = request_hours.hour AND s.model IS request_hours.model
        AND s.source IS request_hours.source""")
    for name in ("insert", "delete", "update"):
        db.execute(f"DROP TRIGGER requests_rollup_{name}")
    db.execute(f"CREATE TRIGGER requests_rollup_insert AFTER INSERT ON requests BEGIN\n"
               f"{_rollup_add('new.', ROLLUP_SUMS)}END")
    db.execute(f"CREATE TRIGGER requests_rollup_delete AFTER DELETE ON requests BEGIN\n"
               f"{_rollup_remove('old.', ROLLUP_SUMS)}END")
    db.execute(f"CREATE TRIGGER requests_rollup_update AFTER UPDATE ON requests BEGIN\n"
               f"{_rollup_remove('old.', ROLLUP_SUMS)}{_rollup_add('new.', ROLLUP_SUMS)}END")


@migrations()
def m007_batch(db) -> None:
    """Batch jobs and their rows (core.batch.ledger): each row pending, running, done (with
    its result) or failed (with the reason); history rows of a job carry its id."""
    db.execute("CREATE TABLE batch_jobs (id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
               "updated_at REAL NOT NULL, name TEXT, status TEXT NOT NULL, total INTEGER NOT NULL, "
               "concurrency INTEGER, max_cost REAL, owner TEXT, lease_until REAL, note TEXT, "
               "options TEXT)")
    db.execute("CREATE INDEX idx_batch_jobs_created ON batch_jobs (created_at)")
    db.execute("CREATE TABLE batch_rows (job_id TEXT NOT NULL, idx INTEGER NOT NULL, "
               "line INTEGER, status TEXT NOT NULL DEFAULT 'pending', request TEXT NOT NULL, "
               "content TEXT, result TEXT, error TEXT, error_kind TEXT, cost REAL, "
               "max_cost REAL, tries INTEGER NOT NULL DEFAULT 0, started_at REAL, "
               "finished_at REAL, request_id TEXT, PRIMARY KEY (job_id, idx))")
    db.execute("CREATE INDEX idx_batch_rows_status ON batch_rows (job_id, status, idx)")
    db.execute("ALTER TABLE requests ADD COLUMN job_id TEXT")
    db.execute("CREATE INDEX idx_requests_job ON requests (job_id) WHERE job_id IS NOT NULL")


@migrations()
def m008_budget_ledger(db) -> None:
    """Spend per budget scope ('all', 'model:NAME', 'source:NAME') and period ('d:2026-12-03',
    'm:2026-12'): what was spent and what requests in flight hold (core/budgets.py)."""
    db.execute("CREATE TABLE budget_ledger (scope TEXT NOT NULL, period TEXT NOT NULL, "
               "spent REAL NOT NULL DEFAULT 0, reserved REAL NOT NULL DEFAULT 0, "
               "PRIMARY KEY (scope, period))")


@migrations()
def m009_budget_holds(db) -> None:
    """Each request's budget hold until it settles, with an expiry, so the holds of a process
    that died are given back (core/budgets.py)."""
    # No index on expires_at: the table holds only requests in flight, and a scan once a
    # minute costs less than keeping an index on every reservation and settlement.
    db.execute("CREATE TABLE budget_holds (id INTEGER PRIMARY KEY, rows TEXT NOT NULL, "
               "amount REAL NOT NULL, expires_at REAL NOT NULL)")


@migrations()
def m010_pacing_pinned_and_waiting(db) -> None:
    """Pacing: whether a bucket's window end is the server's word or a refill's guess
    (``pinned``), and the marks of interactive requests waiting for a key, so batch rows of
    every process on the file hold back for them (core.resilience.pacing)."""
    db.execute("ALTER TABLE pacing ADD COLUMN pinned INTEGER NOT NULL DEFAULT 1")
    db.execute("CREATE TABLE pacing_waiting (key TEXT NOT NULL, owner TEXT NOT NULL, "
               "until REAL NOT NULL, PRIMARY KEY (key, owner))")


@migrations()
def m011_event_uid(db) -> None:
    """A unique id on events (core/history.py ``event``), so one spooled to the spill journal
    is inserted once however often a replay repeats; the settings' audit events have none."""
    db.execute("ALTER TABLE events ADD COLUMN uid TEXT")
    db.execute("CREATE UNIQUE INDEX idx_events_uid ON events (uid)")
