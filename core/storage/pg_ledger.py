"""The batch ledger in PostgreSQL: several replicas work one job together.

Unlike the file's ledger (one runner per job, holding the job's lease), any number of
runners may take a job. Rows are claimed with ``SELECT … FOR UPDATE SKIP LOCKED`` (two
replicas claiming at once get different rows, neither waits for the other), each under a
lease of the claiming process (``owner``, ``lease_until``) that its runner renews with the
job's (``renew``: the heartbeat of a live runner, every few seconds from its loop, so a long
request keeps its row; only a dead or stalled runner stops renewing). A row whose lease ran
out is claimable again.

Fencing: every claim bumps the row's claim generation (``claim``), and a row is finished
(done, failed or put back) only under the claim that is current, so a runner that stalled
past its lease, whose row another runner claimed since, cannot record it: its late answer is
refused (an event ``batch``/``late answer refused`` says so; its request's history row, with
what it cost, stays). A row is recorded done exactly once. Its request may still have reached
the upstream twice (the stalled runner's and the new one's): leases bound how long a row
waits for a runner that stopped answering, they cannot undo a request already sent.

While the database is unreachable, a done row's result goes to the spill journal (with its
claim) and is written when the database is back (core/storage/pg_history.py replays it under
the same fencing); the runner pauses meanwhile (core/batch/runner.py). The job is ``done``
when the last runner leaves it with no row pending or running.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from ..batch.ledger import LEASE_S, UNFINISHED, Ledger, owner_id
from ..errors import StorageError
from .postgres import PgDatabase

_log = logging.getLogger(__name__)

ROW_LEASE_S = LEASE_S    # renewed every few seconds (runner.RENEW_S) while the runner lives


class PgLedger(Ledger):
    """Ledger over a PgDatabase; ``owner`` is this process (host:pid) unless given."""

    def __init__(self, db: PgDatabase, clock: Callable[[], float] | None = None,
                 owner: str | None = None, journal=None) -> None:
        super().__init__(db, clock or time.time)
        self.owner = owner or owner_id()
        self.journal = journal        # the spill journal (History's): done rows while PG is gone

    # -- reading (PostgreSQL spellings of the file's queries) -----------------------------
    def counts(self, job_id: str) -> dict:
        counts = {s: 0 for s in ("pending", "running", "done", "failed")}
        for r in self.db.query("SELECT status, count(*)::int AS n FROM batch_rows WHERE job_id = ? "
                               "GROUP BY status", (job_id,)):
            counts[r["status"]] = r["n"]
        agg = self.db.query_one(
            "SELECT coalesce(sum(cost), 0)::float8 AS cost, "
            "coalesce(sum(CASE WHEN status = 'pending' THEN max_cost END), 0)::float8 AS max_cost_left, "
            "count(*) FILTER (WHERE finished_at > ?)::int AS recent FROM batch_rows WHERE job_id = ?",
            (self.clock() - 60.0, job_id))
        counts.update(agg)
        return counts

    def job(self, job_id: str) -> dict | None:
        """The job with its counts; ``alive`` while any runner holds its lease or a row's."""
        row = super().job(job_id)
        if row is not None and row["status"] in ("running", "waiting") and not row["alive"]:
            now = self.clock()
            held = self.db.query_one("SELECT count(*)::int AS n FROM batch_rows WHERE job_id = ? AND "
                                     "status = 'running' AND lease_until > ?", (job_id, now))["n"]
            row["alive"] = bool(held) or (row["lease_until"] or 0) > now
        return row

    def jobs(self, limit: int = 50) -> list[dict]:
        ids = [r["id"] for r in self.db.query(
            "SELECT id FROM batch_jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))]
        return [self.job(i) for i in ids]

    def last_unfinished(self) -> str | None:
        row = self.db.query_one(
            f"SELECT id FROM batch_jobs WHERE status IN ({','.join('?' * len(UNFINISHED))}) "
            "ORDER BY created_at DESC, id DESC LIMIT 1", UNFINISHED)
        return row["id"] if row else None

    def spent(self, job_id: str) -> float:
        row = self.db.query_one("SELECT coalesce(sum(cost), 0)::float8 AS c FROM batch_rows "
                                "WHERE job_id = ?", (job_id,))
        return row["c"]

    # -- runners ----------------------------------------------------------------------------
    def take(self, job_id: str, owner: str) -> int:
        """Join the job's runners (never JobBusy: replicas share it); rows whose lease ran out
        go back to ``pending`` (returns how many)."""
        now = self.clock()
        if self.db.query_one("SELECT 1 AS x FROM batch_jobs WHERE id = ?", (job_id,)) is None:
            raise KeyError(job_id)

        def write(conn) -> int:
            conn.execute("UPDATE batch_jobs SET owner = ?, lease_until = ?, status = 'running', "
                         "note = NULL, updated_at = ? WHERE id = ?", (owner, now + LEASE_S, now, job_id))
            return conn.execute("UPDATE batch_rows SET status = 'pending', owner = NULL, "
                                "lease_until = NULL, started_at = NULL WHERE job_id = ? AND "
                                "status = 'running' AND (lease_until IS NULL OR lease_until < ?)",
                                (job_id, now)).rowcount
        return self.db.write(write)

    async def renew(self, job_id: str, owner: str) -> None:
        """The heartbeat: extend the job's lease and this runner's leases on its running rows."""
        now = self.clock()

        def write(conn) -> None:
            conn.execute("UPDATE batch_jobs SET lease_until = ? WHERE id = ?", (now + LEASE_S, job_id))
            conn.execute("UPDATE batch_rows SET lease_until = ? WHERE job_id = ? AND owner = ? "
                         "AND status = 'running'", (now + ROW_LEASE_S, job_id, self.owner))
        await self.db.awrite(write)

    def rejoin(self, job_id: str, keep: dict[int, int]) -> set[int]:
        """After the database was unreachable: renew the leases of the rows in ``keep``
        ({idx: claim}, claimed and not sent yet) that this runner still holds, put every other
        row it holds back to ``pending`` (a put-back or a failure that could not be written),
        and say which of ``keep`` it still holds (another runner may have claimed the rest)."""
        now = self.clock()

        def write(conn) -> set[int]:
            conn.execute("UPDATE batch_jobs SET lease_until = ?, status = CASE WHEN status IN "
                         "('running', 'waiting') THEN 'running' ELSE status END, note = CASE WHEN "
                         "status IN ('running', 'waiting') THEN NULL ELSE note END WHERE id = ?",
                         (now + LEASE_S, job_id))
            held = {r[0]: r[1] for r in conn.execute(
                "SELECT idx, claim FROM batch_rows WHERE job_id = ? AND owner = ? AND status = 'running'",
                (job_id, self.owner))}
            mine = [i for i, c in keep.items() if held.get(i) == c]
            back = [i for i in held if i not in mine]
            if mine:
                conn.execute("UPDATE batch_rows SET lease_until = ? WHERE job_id = ? AND idx = ANY(?)",
                             (now + ROW_LEASE_S, job_id, mine))
            if back:
                conn.execute("UPDATE batch_rows SET status = 'pending', started_at = NULL, owner = NULL, "
                             "lease_until = NULL WHERE job_id = ? AND idx = ANY(?) AND owner = ?",
                             (job_id, back, self.owner))
            return set(mine)
        return self.db.write(write)

    def release(self, job_id: str, owner: str, status: str, note: str | None = None) -> None:
        """Leave the job: this runner's running rows go back. A ``done`` (or a ``paused``: this
        runner stopped) while other runners still hold rows leaves the job running; the last
        one out finishes it. A pause or cancel asked for by a user stays."""
        now = self.clock()

        def write(conn) -> None:
            conn.execute("SELECT 1 FROM batch_jobs WHERE id = ? FOR UPDATE", (job_id,))   # one at a time
            conn.execute("UPDATE batch_rows SET status = 'pending', owner = NULL, lease_until = NULL, "
                         "started_at = NULL WHERE job_id = ? AND owner = ? AND status = 'running'",
                         (job_id, self.owner))
            final = status
            if status == "done":
                left = conn.execute("SELECT count(*) FROM batch_rows WHERE job_id = ? AND "
                                    "status IN ('pending', 'running')", (job_id,)).fetchone()[0]
                if left:
                    final = "running"      # others are at it (or their rows wait for a resume)
            elif status == "paused":       # this runner stops (Ctrl-C, shutdown); others go on
                others = conn.execute("SELECT count(*) FROM batch_rows WHERE job_id = ? AND "
                                      "status = 'running' AND lease_until >= ?", (job_id, now)).fetchone()[0]
                if others:
                    final = "running"
            conn.execute("UPDATE batch_jobs SET owner = NULL, lease_until = NULL, updated_at = ?, "
                         "status = CASE WHEN status IN ('paused', 'cancelled') AND ? IN "
                         "('running', 'paused', 'done') THEN status ELSE ? END, "
                         "note = CASE WHEN status IN ('paused', 'cancelled') AND ? IN "
                         "('running', 'paused', 'done') THEN note ELSE ? END WHERE id = ?",
                         (now, final, final, final, note, job_id))
        self.db.write(write)

    def others_hold(self, job_id: str) -> float | None:
        """Seconds until the first lease another runner holds on a row of the job runs out
        (0 when one ran out: claimable now), or None when no other runner holds a row."""
        row = self.db.query_one("SELECT min(lease_until) AS until FROM batch_rows WHERE job_id = ? "
                                "AND status = 'running' AND owner <> ?", (job_id, self.owner))
        until = row["until"] if row else None
        return None if until is None else max(0.0, until - self.clock())

    # -- rows ---------------------------------------------------------------------------------
    async def claim(self, job_id: str, n: int = 1, reclaim: bool = True) -> list[dict]:
        """Up to ``n`` rows (lowest first) that are pending or (``reclaim``) whose lease ran
        out, now running under this process's lease and a new claim generation (``claim``,
        which finishing the row must name); rows another replica is claiming are skipped, not
        waited for. A runner just back from an outage claims pending rows only for a while,
        so the other runners, back too, replay their answers before their rows are taken."""
        now = self.clock()
        expired = " OR (status = 'running' AND lease_until < ?)" if reclaim else ""

        def write(conn):
            return conn.execute(
                f"WITH c AS (SELECT idx FROM batch_rows WHERE job_id = ? AND (status = 'pending'{expired}) "
                "ORDER BY idx LIMIT ? FOR UPDATE SKIP LOCKED) "
                "UPDATE batch_rows AS b SET status = 'running', started_at = ?, owner = ?, "
                "lease_until = ?, claim = b.claim + 1 FROM c WHERE b.job_id = ? AND b.idx = c.idx "
                "RETURNING b.idx, b.line, b.request, b.max_cost, b.tries, b.claim",
                (job_id, *((now,) if reclaim else ()), n, now, self.owner, now + ROW_LEASE_S,
                 job_id)).fetchall()
        rows = sorted(await self.db.awrite(write), key=lambda r: r[0])
        return [{"idx": r[0], "line": r[1], "request": json.loads(r[2]), "max_cost": r[3],
                 "tries": r[4], "claim": r[5]} for r in rows]

    def _held(self, claim: int | None) -> tuple[str, tuple]:
        """The condition a finishing write needs: this owner, still running, and (when the
        runner names it) the claim it was given."""
        if claim is None:
            return "owner = ? AND status = 'running'", (self.owner,)
        return "owner = ? AND status = 'running' AND claim = ?", (self.owner, claim)

    def done(self, job_id: str, idx: int, result: dict, claim: int | None = None) -> None:
        """Record the row's result (without waiting for the commit). Refused when the claim is
        no longer this runner's (an event says so; the request's history row stays). If the
        database cannot be reached the result goes to the spill journal, replayed later."""
        values = done_values(job_id, idx, result, self.clock(), self.owner, claim)

        def failed(exc: BaseException | None) -> None:
            if exc is None or not isinstance(exc, StorageError) or self.journal is None:
                if exc is not None:
                    _log.error("Batch row %s#%d: its result was not recorded: %s", job_id, idx, exc)
                return
            try:
                self.journal.append([values])
            except StorageError as jexc:
                _log.error("Batch row %s#%d: its result could not be recorded or spooled (%s); the "
                           "row is asked again when its lease runs out", job_id, idx, jexc.user_message)
        self.db.post(lambda conn: apply_done(conn, values), failed, lazy=False)

    async def failed(self, job_id: str, idx: int, kind: str, message: str, request_id: str | None,
                     claim: int | None = None) -> None:
        now = self.clock()
        cond, cparams = self._held(claim)
        await self.db.awrite(lambda conn: conn.execute(
            "UPDATE batch_rows SET status = 'failed', error = ?, error_kind = ?, finished_at = ?, "
            f"request_id = ?, tries = tries + 1, lease_until = NULL WHERE job_id = ? AND idx = ? AND {cond}",
            (message, kind, now, request_id, job_id, idx, *cparams)))

    async def back(self, job_id: str, idx: int, tried: bool, claim: int | None = None) -> None:
        cond, cparams = self._held(claim)
        await self.db.awrite(lambda conn: conn.execute(
            "UPDATE batch_rows SET status = 'pending', started_at = NULL, owner = NULL, lease_until = NULL, "
            f"tries = tries + ? WHERE job_id = ? AND idx = ? AND {cond}",
            (int(tried), job_id, idx, *cparams)))


def done_values(job_id: str, idx: int, result: dict, now: float, owner: str,
                claim: int | None) -> dict:
    """A done row's write as a plain dict: what ``apply_done`` needs, and a spill-journal line."""
    return {"_t": "batch_done", "job_id": job_id, "idx": idx, "owner": owner, "claim": claim,
            "content": result.get("content"), "finished_at": now,
            "result": json.dumps({k: result.get(k) for k in (
                "model", "finish_reason", "usage", "cost", "from_cache", "attempts", "latency_ms")}),
            "cost": result.get("cost") or 0.0, "request_id": result.get("request_id")}


def apply_done(conn, v: dict) -> bool:
    """Mark the row done if ``v``'s runner still holds its claim (else an event says its
    answer was refused); True when recorded. Replaying it again changes nothing."""
    cond = "owner = ? AND status = 'running'" + (" AND claim = ?" if v.get("claim") is not None else "")
    cparams = (v["owner"],) + ((v["claim"],) if v.get("claim") is not None else ())
    n = conn.execute(
        "UPDATE batch_rows SET status = 'done', content = ?, result = ?, cost = ?, error = NULL, "
        "error_kind = NULL, finished_at = ?, request_id = ?, tries = tries + 1, lease_until = NULL "
        f"WHERE job_id = ? AND idx = ? AND {cond}",
        (v["content"], v["result"], v["cost"], v["finished_at"], v["request_id"], v["job_id"], v["idx"],
         *cparams)).rowcount
    if n:
        return True
    row = conn.execute("SELECT status, owner, request_id FROM batch_rows WHERE job_id = ? AND idx = ?",
                       (v["job_id"], v["idx"])).fetchone()
    if row is None or (row[0] == "done" and row[2] == v["request_id"]):
        return False        # no such row, or this very answer is recorded (a replay repeated)
    conn.execute("INSERT INTO events (ts, kind, subject, old, new, cause, actor) VALUES (?,?,?,?,?,?,?)",
                 (v["finished_at"], "batch", f"{v['job_id']}#{v['idx']}", row[0], "late answer refused",
                  f"runner {v['owner']} lost the row's lease (held now by {row[1] or 'nobody'}); its "
                  f"request {v['request_id']} stays in history", v["owner"]))
    _log.warning("Batch row %s#%d: a late answer was refused (the row's lease ran out and it is "
                 "now %s); request %s stays in history", v["job_id"], v["idx"], row[0], v["request_id"])
    return False
