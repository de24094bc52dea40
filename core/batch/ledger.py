"""The batch ledger: jobs and their rows in the SQLite file.

A row is ``pending``, ``running``, ``done`` (its result kept) or ``failed`` (with the
reason). A job is run by one process at a time: it holds the job's lease (``owner`` =
host:pid, ``lease_until``), renewed while it runs. When that process dies (a crash,
SIGKILL, a restart), its lease runs out; whoever resumes the job first puts the rows it
left ``running`` back to ``pending``. Done rows are never asked again, so a resumed job
pays only for the rows that were in flight.

Job status: ``pending`` (never started), ``running``, ``waiting`` (the upstream's breaker is
open; the runner goes on by itself when it closes), ``paused`` (by a user, Ctrl-C or a
problem every row would share, in ``note``), ``capped`` (stopped before its cost cap),
``cancelled``, ``done`` (no row left to run; some may have failed).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Callable, Iterator

UNFINISHED = ("pending", "running", "waiting", "paused", "capped")
LEASE_S = 30.0          # a runner renews its lease every few seconds; a dead one's runs out


def owner_id() -> str:
    """This process, as a job's owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(owner: str | None) -> bool:
    """Whether a job's owner is a live process on this host (unknown hosts: assume alive)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def ledger_for(gyro) -> "Ledger":
    """The service's ledger: in PostgreSQL when configured (shared by replicas), else the file's."""
    if getattr(gyro, "pg", None) is not None:
        from ..storage.pg_ledger import PgLedger
        return PgLedger(gyro.pg, clock=gyro.clock.time, journal=gyro.history.journal)
    return Ledger(gyro.db, clock=gyro.clock.time)


class JobBusy(Exception):
    """Another live process runs this job."""


class Ledger:
    """Reads and writes jobs and rows (writes go through the database's writer thread)."""

    def __init__(self, db, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # -- jobs ----------------------------------------------------------------------------------
    def create(self, rows: list[dict], *, name: str = "", concurrency: int | None = None,
               max_cost: float | None = None, options: dict | None = None) -> str:
        """A new job with ``rows`` (each: line, request dict, max_cost), all in one transaction."""
        job_id = uuid.uuid4().hex[:12]
        now = self.clock()
        values = [(job_id, i, r["line"], json.dumps(r["request"], ensure_ascii=False), r.get("max_cost"))
                  for i, r in enumerate(rows)]

        def write(conn) -> None:
            conn.execute("INSERT INTO batch_jobs (id, created_at, updated_at, name, status, total, "
                         "concurrency, max_cost, options) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                         (job_id, now, now, name, len(rows), concurrency, max_cost,
                          json.dumps(options or {})))
            conn.executemany("INSERT INTO batch_rows (job_id, idx, line, request, max_cost) "
                             "VALUES (?, ?, ?, ?, ?)", values)
        self.db.write(write, timeout=120)
        return job_id

    def job(self, job_id: str) -> dict | None:
        """The job with its row counts, or None."""
        row = self.db.query_one("SELECT * FROM batch_jobs WHERE id = ?", (job_id,))
        if row is None:
            return None
        row["options"] = json.loads(row["options"] or "{}")
        row.update(self.counts(job_id))
        row["alive"] = (row["status"] in ("running", "waiting") and _process_alive(row["owner"])
                        and (row["lease_until"] or 0) > self.clock())
        return row

    def counts(self, job_id: str) -> dict:
        """Rows per status, the cost so far and how many finished in the last minute."""
        counts = {s: 0 for s in ("pending", "running", "done", "failed")}
        for r in self.db.query("SELECT status, count(*) AS n FROM batch_rows WHERE job_id = ? "
                               "GROUP BY status", (job_id,)):
            counts[r["status"]] = r["n"]
        agg = self.db.query_one(
            "SELECT coalesce(sum(cost), 0) AS cost, "
            "coalesce(sum(CASE WHEN status = 'pending' THEN max_cost END), 0) AS max_cost_left, "
            "sum(finished_at > ?) AS recent FROM batch_rows WHERE job_id = ?",
            (self.clock() - 60.0, job_id))
        counts["cost"] = agg["cost"]
        counts["max_cost_left"] = agg["max_cost_left"]
        counts["recent"] = agg["recent"] or 0
        return counts

    def jobs(self, limit: int = 50) -> list[dict]:
        """The latest jobs, newest first, with their counts."""
        ids = [r["id"] for r in self.db.query(
            "SELECT id FROM batch_jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))]
        return [self.job(i) for i in ids]

    def last_unfinished(self) -> str | None:
        """The newest job that still has rows to run."""
        row = self.db.query_one(
            f"SELECT id FROM batch_jobs WHERE status IN ({','.join('?' * len(UNFINISHED))}) "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1", UNFINISHED)
        return row["id"] if row else None

    def set_status(self, job_id: str, status: str, note: str | None = None,
                   only_if: tuple[str, ...] | None = None) -> bool:
        """Change a job's status (when it is one of ``only_if``); True when it changed."""
        cond = f" AND status IN ({','.join('?' * len(only_if))})" if only_if else ""

        def write(conn) -> int:
            return conn.execute(f"UPDATE batch_jobs SET status = ?, note = ?, updated_at = ? "
                                f"WHERE id = ?{cond}", (status, note, self.clock(), job_id,
                                                        *(only_if or ()))).rowcount
        return bool(self.db.write(write))

    def status(self, job_id: str) -> str | None:
        row = self.db.query_one("SELECT status FROM batch_jobs WHERE id = ?", (job_id,))
        return row["status"] if row else None

    # -- the lease -----------------------------------------------------------------------------
    def take(self, job_id: str, owner: str) -> int:
        """Become the job's runner; the rows a dead runner left ``running`` go back to
        ``pending`` (returns how many). JobBusy when a live process holds it."""
        now = self.clock()
        job = self.db.query_one("SELECT owner, lease_until, status FROM batch_jobs WHERE id = ?",
                                (job_id,))
        if job is None:
            raise KeyError(job_id)
        if (job["owner"] and job["owner"] != owner and job["status"] in ("running", "waiting")
                and (job["lease_until"] or 0) > now and _process_alive(job["owner"])):
            raise JobBusy(f"Job {job_id} is being run by process {job['owner']}; wait for it "
                          "or stop it first.")

        def write(conn) -> int:
            conn.execute("UPDATE batch_jobs SET owner = ?, lease_until = ?, status = 'running', "
                         "note = NULL, updated_at = ? WHERE id = ?", (owner, now + LEASE_S, now, job_id))
            return conn.execute("UPDATE batch_rows SET status = 'pending', started_at = NULL "
                                "WHERE job_id = ? AND status = 'running'", (job_id,)).rowcount
        return self.db.write(write)

    async def renew(self, job_id: str, owner: str) -> None:
        now = self.clock()
        await self.db.awrite(lambda conn: conn.execute(
            "UPDATE batch_jobs SET lease_until = ? WHERE id = ? AND owner = ?",
            (now + LEASE_S, job_id, owner)))

    def release(self, job_id: str, owner: str, status: str, note: str | None = None) -> None:
        """Give the job up with its final (or paused) status; rows still ``running`` go back."""
        now = self.clock()

        def write(conn) -> None:
            conn.execute("UPDATE batch_rows SET status = 'pending', started_at = NULL "
                         "WHERE job_id = ? AND status = 'running'", (job_id,))
            # A pause or cancel asked for meanwhile (the page) wins over 'running'.
            conn.execute("UPDATE batch_jobs SET owner = NULL, lease_until = NULL, updated_at = ?, "
                         "status = CASE WHEN status IN ('paused', 'cancelled') AND ? IN "
                         "('running', 'paused') THEN status ELSE ? END, "
                         "note = CASE WHEN status IN ('paused', 'cancelled') AND ? IN "
                         "('running', 'paused') THEN note ELSE ? END "
                         "WHERE id = ? AND (owner = ? OR owner IS NULL)",
                         (now, status, status, status, note, job_id, owner))
        self.db.write(write)

    def ping(self) -> None:
        """A round trip through the writer: StorageError while the database is unreachable."""
        self.db.write(lambda conn: conn.execute("SELECT 1"), timeout=30)

    def rejoin(self, job_id: str, keep: dict[int, int | None]) -> set[int]:
        """After the database refused writes: renew the job's lease, put every running row
        not in ``keep`` (claimed, not sent yet) back to ``pending``; the rows of ``keep`` held."""
        now = self.clock()

        def write(conn) -> None:
            conn.execute("UPDATE batch_jobs SET lease_until = ? WHERE id = ?", (now + LEASE_S, job_id))
            running = [r[0] for r in conn.execute("SELECT idx FROM batch_rows WHERE job_id = ? AND "
                                                  "status = 'running'", (job_id,))]
            conn.executemany("UPDATE batch_rows SET status = 'pending', started_at = NULL WHERE "
                             "job_id = ? AND idx = ?", [(job_id, i) for i in running if i not in keep])
        self.db.write(write)
        return set(keep)

    def others_hold(self, job_id: str) -> float | None:
        """Seconds until another runner's lease on a row of the job runs out (None: no other
        runner holds one). The file has one runner per job: always None."""
        return None

    # -- rows ----------------------------------------------------------------------------------
    async def claim(self, job_id: str, n: int = 1, reclaim: bool = True) -> list[dict]:
        """Up to ``n`` pending rows (lowest first), now ``running``, in one transaction
        (``reclaim`` is PostgreSQL's: the file's job has one runner)."""
        now = self.clock()

        def write(conn):
            return conn.execute(
                "UPDATE batch_rows SET status = 'running', started_at = ? WHERE rowid IN ("
                "SELECT rowid FROM batch_rows WHERE job_id = ? AND status = 'pending' "
                "ORDER BY idx LIMIT ?) RETURNING idx, line, request, max_cost, tries",
                (now, job_id, n)).fetchall()
        rows = sorted(await self.db.awrite(write), key=lambda r: r[0])
        return [{"idx": r[0], "line": r[1], "request": json.loads(r[2]), "max_cost": r[3],
                 "tries": r[4]} for r in rows]

    def done(self, job_id: str, idx: int, result: dict, claim: int | None = None) -> None:
        """Mark a row done with its result, without waiting for the commit: a crash before it
        leaves the row ``running``, so a resume asks it again (it was in flight)."""
        now = self.clock()
        self.db.post(lambda conn: conn.execute(
            "UPDATE batch_rows SET status = 'done', content = ?, result = ?, cost = ?, error = NULL, "
            "error_kind = NULL, finished_at = ?, request_id = ?, tries = tries + 1 "
            "WHERE job_id = ? AND idx = ?",
            (result.get("content"), json.dumps({k: result.get(k) for k in (
                "model", "finish_reason", "usage", "cost", "from_cache", "attempts", "latency_ms")}),
             result.get("cost") or 0.0, now, result.get("request_id"), job_id, idx)), lazy=False)

    async def failed(self, job_id: str, idx: int, kind: str, message: str, request_id: str | None,
                     claim: int | None = None) -> None:
        now = self.clock()
        await self.db.awrite(lambda conn: conn.execute(
            "UPDATE batch_rows SET status = 'failed', error = ?, error_kind = ?, finished_at = ?, "
            "request_id = ?, tries = tries + 1 WHERE job_id = ? AND idx = ?",
            (message, kind, now, request_id, job_id, idx)))

    async def back(self, job_id: str, idx: int, tried: bool, claim: int | None = None) -> None:
        """Put a running row back to ``pending`` (``tried``: the attempt counts). ``claim``
        (PostgreSQL's fencing) means nothing here: one runner holds a job's rows."""
        await self.db.awrite(lambda conn: conn.execute(
            "UPDATE batch_rows SET status = 'pending', started_at = NULL, tries = tries + ? "
            "WHERE job_id = ? AND idx = ?", (int(tried), job_id, idx)))

    def retry_failed(self, job_id: str) -> int:
        """Failed rows back to ``pending`` (their tries start again); how many."""
        def write(conn) -> int:
            n = conn.execute("UPDATE batch_rows SET status = 'pending', tries = 0, error = NULL, "
                             "error_kind = NULL, finished_at = NULL WHERE job_id = ? AND "
                             "status = 'failed'", (job_id,)).rowcount
            if n:
                conn.execute("UPDATE batch_jobs SET status = CASE WHEN status IN ('running', "
                             "'waiting') THEN status ELSE 'paused' END, note = ?, updated_at = ? "
                             "WHERE id = ?", (f"{n} failed row(s) to retry", self.clock(), job_id))
            return n
        return self.db.write(write)

    def spent(self, job_id: str) -> float:
        row = self.db.query_one("SELECT coalesce(sum(cost), 0) AS c FROM batch_rows WHERE job_id = ?",
                                (job_id,))
        return row["c"]

    def rows(self, job_id: str, limit: int | None = None) -> Iterator[dict]:
        """Rows in input order, with their request and result decoded."""
        sql = ("SELECT idx, line, status, request, content, result, error, error_kind, cost, tries "
               "FROM batch_rows WHERE job_id = ? ORDER BY idx")
        params: tuple = (job_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (job_id, limit)
        for r in self.db.query(sql, params):
            r["request"] = json.loads(r["request"])
            r["result"] = json.loads(r["result"]) if r["result"] else None
            yield r
