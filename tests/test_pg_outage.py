"""PostgreSQL gone and back, on a temporary cluster of this module's own (initdb + pg_ctl; the
machine's server is never stopped): events wait in the spill journal and are replayed in
order, once; a settings change is refused and changes nothing; a batch job pauses and goes on
by itself, every answer it received recorded once, no row sent twice.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")

from core import admin  # noqa: E402
from core.config import Config  # noqa: E402
from core.errors import StorageError  # noqa: E402
from core.history import RequestRecord  # noqa: E402
from core.models import GenerationRequest  # noqa: E402
from core.service import Gyroscope  # noqa: E402
from core.storage.pg_history import PgHistory  # noqa: E402
from core.storage.postgres import PgDatabase  # noqa: E402

from pg_support import create_database, own_cluster  # noqa: E402
from support import FakeClock  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with own_cluster() as ours:
        ours.running = True
        yield ours


def stop(cluster) -> None:
    cluster.stop("immediate")
    cluster.running = False


def start(cluster) -> None:
    cluster.start()
    cluster.running = True


@pytest.fixture
def url(cluster):
    if not cluster.running:          # a test that failed mid-outage left it stopped
        start(cluster)
    return create_database(cluster.url)


class PacedClock(FakeClock):
    """Injected time whose sleeps advance it at once, yielding the loop a moment of real time
    (a runner waiting for a stopped server retries it without spinning a core)."""

    async def sleep(self, seconds: float) -> None:
        self.sleep_blocking(seconds)
        await asyncio.sleep(0.02)


def until(cond, what: str, timeout: float = 60.0) -> None:
    """Poll a condition the code under test makes true (not a wait for a backoff)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def done_rows(url: str, job: str) -> int:
    """The job's rows the ledger in PostgreSQL holds as done."""
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM batch_rows WHERE job_id = %s AND "
                            "status = 'done'", (job,)).fetchone()[0]


def run_in_thread(runner) -> tuple[threading.Thread, list[str]]:
    """Run a batch job on a thread of its own; the list gets its final status."""
    final: list[str] = []
    thread = threading.Thread(target=lambda: final.append(asyncio.run(runner.run())))
    thread.start()
    return thread, final


def test_events_while_postgresql_is_gone_are_replayed_in_order_once(tmp_path, cluster, url):
    db = PgDatabase(url)
    history = PgHistory(db, tmp_path / "spill.jsonl")
    try:
        history.event("cache", "all", None, "1 removed", "before").result(10)
        stop(cluster)
        got = [history.event("breaker", f"m{i}", "closed", "open", f"during {i}", ts=1_000.0 + i)
               for i in range(5)]
        for fut in got:
            assert fut.result(30) is None          # durable: kept in the journal
        history.wait(history.add(RequestRecord(ts=2_000.0, request_id="during-1")))
        state = history.status()
        assert state["history"] == "spilling" and state["spilled_rows_waiting"] == 6
        lines = history.journal.read()[0]
        start(cluster)
        assert history.drain(30)
        # A crash between the replay's commit and the journal's emptying: replayed again.
        history.journal.append(lines)
        assert history.drain(30)
        events = history.events()
        assert [e["cause"] for e in events] == ["before"] + [f"during {i}" for i in range(5)]
        assert [e["ts"] for e in events[1:]] == [1_000.0 + i for i in range(5)]
        assert len({e["uid"] for e in events}) == 6
        assert history.totals()["total_requests"] == 1
        assert history.status()["history"] == "ok" and history.lost_rows == 0
    finally:
        if not cluster.running:
            start(cluster)
        db.close()


def test_a_service_keeps_breaker_and_cache_events_and_refuses_settings_while_postgresql_is_gone(
        tmp_path, cluster, url, simulator):
    """Through the service: a breaker forced open and a cache clear during the outage are in
    the database afterwards; a settings change is refused with what to do and changes nothing."""
    from core.providers.simulator_provider import SimulatorProvider
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db",
                            database_url=url), provider=SimulatorProvider(simulator))
    try:
        gyro.generate(GenerationRequest(prompt="hello", max_tokens=8, cache=False))
        gyro.settings.set("retry.max_retries", 1, actor="before")
        version = gyro.settings.snapshot().version
        breaker = gyro.breakers.get(gyro.provider.upstream_id, gyro.settings.get("provider.default_model"))
        stop(cluster)
        breaker.force_open("tester")          # what the Settings page's buttons call
        breaker.reset("tester")
        admin.clear_cache(gyro, "tester")
        with pytest.raises(StorageError) as err:
            gyro.settings.set("retry.max_retries", 3, actor="during")
        message = err.value.user_message
        assert "Nothing was changed" in message and "Try again once it is back" in message
        assert "cannot be reached" in message
        assert gyro.settings.get("retry.max_retries") == 1 and gyro.settings.snapshot().version == version
        # Requests are still answered (their rows spill too).
        assert gyro.generate(GenerationRequest(prompt="during", max_tokens=8, cache=False)).content
        start(cluster)
        assert gyro.history.drain(30)
        with psycopg.connect(url) as conn:
            events = conn.execute("SELECT kind, old, new, actor FROM events ORDER BY id").fetchall()
            setting = conn.execute("SELECT value FROM settings WHERE name = 'retry.max_retries'").fetchone()
            requests = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        assert [(o, n) for k, o, n, _ in events if k == "breaker"] == [("closed", "open"), ("open", "closed")]
        assert [k for k, *_ in events] == ["setting", "breaker", "breaker", "cache"]
        assert setting == ("1",) and requests == 2
    finally:
        if not cluster.running:
            start(cluster)
        gyro.close()


def test_a_batch_job_pauses_while_postgresql_is_gone_and_goes_on_by_itself(tmp_path, cluster, url, simulator):
    """Stopped mid-job (pg_ctl stop -m immediate) and started again: the runner pauses (no row
    failed, the job not stopped), the answers of rows in flight wait in the journal with their
    claim, and once the server is back they are recorded and the job finishes: every row done
    once, each sent once (nobody paid twice). Waits for the server on an injected clock."""
    from core.batch.runner import JobRunner
    from core.providers.simulator_provider import SimulatorProvider
    clock = PacedClock()
    simulator.sim.set_latency(40, 0)               # rows take real time, so some are in flight
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db",
                            database_url=url), provider=SimulatorProvider(simulator),
                     clock=clock.as_clock())
    n = 60
    try:
        src = tmp_path / "in.csv"
        src.write_text("prompt\n" + "".join(f"row {i}\n" for i in range(n)))
        job = gyro.batch.create(gyro.batch.parse_path(src))
        runner = JobRunner(gyro, job, concurrency=4)
        thread, final = run_in_thread(runner)
        until(lambda: done_rows(url, job) >= 10, "10 rows done")
        stop(cluster)
        until(lambda: runner.outages == 1, "the runner to pause")

        def spooled_results() -> list[dict]:
            return [line for line in gyro.history.journal.read()[0] if line.get("_t") == "batch_done"]
        until(lambda: spooled_results(), "a result of a row in flight in the journal")
        until(lambda: clock.slept, "the runner to wait for the server (on the injected clock)")
        assert thread.is_alive() and not final        # paused, not stopped
        sent_during = simulator.sim.stats()["completions"]
        start(cluster)
        thread.join(120)
        assert final == ["done"]
        assert runner.outages == 1
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT idx, status, tries, content, request_id, claim FROM batch_rows "
                                "WHERE job_id = %s ORDER BY idx", (job,)).fetchall()
            history = conn.execute("SELECT request_id FROM requests WHERE job_id = %s", (job,)).fetchall()
            refused = conn.execute("SELECT count(*) FROM events WHERE kind = 'batch'").fetchone()[0]
            status = conn.execute("SELECT status FROM batch_jobs WHERE id = %s", (job,)).fetchone()[0]
        assert status == "done" and [r[1] for r in rows] == ["done"] * n
        assert {r[2] for r in rows} == {1} and all(r[3] for r in rows)
        assert simulator.sim.stats()["completions"] == n, "a row was sent twice"
        assert len(history) == n and {r[4] for r in rows} == {h[0] for h in history}
        assert refused == 0 and gyro.history.journal.pending == 0
        assert sent_during < n                         # rows were left for after the outage
    finally:
        simulator.sim.set_latency(0, 0)
        if not cluster.running:
            start(cluster)
        gyro.close()


def test_back_from_an_outage_a_runner_leaves_another_replicas_rows_until_it_has_replayed(
        tmp_path, cluster, url, simulator):
    """Replica A holds the last row and got its answer during the outage (kept in A's journal);
    its lease runs out meanwhile. Back from the outage, the runner claims pending rows only
    for REJOIN_GRACE_S, so A replays its answer first: the row is done once, by A, and the
    simulator never asked for it."""
    from core.batch.runner import JobRunner
    from core.providers.simulator_provider import SimulatorProvider
    from core.storage.pg_ledger import ROW_LEASE_S, PgLedger
    clock = PacedClock()
    simulator.sim.set_latency(20, 0)
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db",
                            database_url=url), provider=SimulatorProvider(simulator),
                     clock=clock.as_clock())
    db_a = PgDatabase(url)
    history_a = PgHistory(db_a, tmp_path / "a-spill.jsonl")
    n = 24
    try:
        src = tmp_path / "in.csv"
        src.write_text("prompt\n" + "".join(f"row {i}\n" for i in range(n)))
        job = gyro.batch.create(gyro.batch.parse_path(src))
        a = PgLedger(db_a, clock=clock.time, owner="replica-a:1", journal=history_a.journal)
        a.take(job, a.owner)
        held_from = clock.time()
        rows_a = asyncio.run(a.claim(job, 1))           # A takes row 0 (the lowest pending)
        assert [r["idx"] for r in rows_a] == [0]
        runner = JobRunner(gyro, job, concurrency=4)
        thread, final = run_in_thread(runner)
        until(lambda: done_rows(url, job) >= 4, "4 rows done")
        stop(cluster)
        a.done(job, 0, {"content": "from A", "request_id": "a-0", "cost": 0.0}, claim=rows_a[0]["claim"])
        until(lambda: history_a.journal.pending == 1, "A's answer kept in its journal")
        until(lambda: clock.time() > held_from + ROW_LEASE_S + 1, "A's lease to run out (injected clock)")
        start(cluster)
        until(lambda: done_rows(url, job) >= n - 1, "every other row done")
        assert history_a.drain(30)                      # A, back too, records its answer
        thread.join(120)
        assert final == ["done"]
        with psycopg.connect(url) as conn:
            row0 = conn.execute("SELECT status, content, owner, tries FROM batch_rows WHERE job_id = %s "
                                "AND idx = 0", (job,)).fetchone()
            refused = conn.execute("SELECT count(*) FROM events WHERE kind = 'batch'").fetchone()[0]
            statuses = {r[0] for r in conn.execute("SELECT status FROM batch_rows WHERE job_id = %s", (job,))}
        assert row0 == ("done", "from A", "replica-a:1", 1) and refused == 0 and statuses == {"done"}
        assert simulator.sim.stats()["completions"] == n - 1      # row 0 never sent by the runner
    finally:
        simulator.sim.set_latency(0, 0)
        if not cluster.running:
            start(cluster)
        db_a.close()
        gyro.close()


def test_a_spooled_result_whose_row_was_claimed_again_is_refused_on_replay(tmp_path, cluster, url):
    """The outage outlasted the lease and another runner claimed the row before this one's
    journal was replayed: its result is refused (fencing), the other's recorded, one done."""
    from core.storage.pg_ledger import ROW_LEASE_S, PgLedger
    now = [1_800_000_000.0]
    db = PgDatabase(url)
    history = PgHistory(db, tmp_path / "spill.jsonl")
    try:
        a = PgLedger(db, clock=lambda: now[0], owner="host:1", journal=history.journal)
        b = PgLedger(db, clock=lambda: now[0], owner="host:2", journal=history.journal)
        job = a.create([{"line": 1, "request": {"prompt": "p"}}])
        a.take(job, a.owner)
        (ra,) = asyncio.run(a.claim(job, 1))
        stop(cluster)
        a.done(job, 0, {"content": "from A", "request_id": "a-0", "cost": 0.0}, claim=ra["claim"])
        db.flush()
        (line,) = history.journal.read()[0]
        assert line["_t"] == "batch_done" and line["claim"] == ra["claim"] and line["content"] == "from A"
        start(cluster)
        now[0] += ROW_LEASE_S + 1
        (rb,) = asyncio.run(b.claim(job, 1))
        assert history.drain(30)                   # A's result: refused, B holds the row
        b.done(job, 0, {"content": "from B", "request_id": "b-0", "cost": 0.0}, claim=rb["claim"])
        db.flush()
        (row,) = list(b.rows(job))
        assert (row["status"], row["content"], row["tries"]) == ("done", "from B", 1)
        assert [e["new"] for e in history.events("batch")] == ["late answer refused"]
        history.journal.append([line])             # replayed once more: changes nothing
        assert history.drain(30)
        assert [e["new"] for e in history.events("batch")] == ["late answer refused"] * 2
        assert list(b.rows(job))[0]["content"] == "from B"
    finally:
        if not cluster.running:
            start(cluster)
        db.close()


def test_the_settings_api_answers_503_with_what_to_do_while_postgresql_is_gone(tmp_path, cluster, url):
    import httpx2
    from test_postgres_backend import start_replica
    from test_postgres_backend import stop as stop_proc
    proc, base = start_replica(tmp_path, "r", url)
    try:
        with httpx2.Client(base_url=base, timeout=30) as client:
            before = client.get("/api/settings").json()
            stop(cluster)
            resp = client.patch("/api/settings", json={"cache.enabled": False})
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert error["kind"] == "storage" and "Nothing was changed" in error["message"]
            after = client.get("/api/settings").json()
            assert after["settings"] == before["settings"] and after["version"] == before["version"]
            start(cluster)
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT count(*) FROM events WHERE kind = 'setting'").fetchone()[0] == 0
            assert client.patch("/api/settings", json={"cache.enabled": False}).status_code == 200
    finally:
        if not cluster.running:
            start(cluster)
        stop_proc(proc)


def test_the_batch_command_pauses_through_a_restart_and_finishes(tmp_path, cluster, url):
    """`python -m core batch` (its own process, real time): PostgreSQL stopped mid-job and
    started again; the command neither crashes nor fails rows, and exits 0 with every row
    done once and sent once."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    rows = 80
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "c.db", database_url=url))
    try:
        src = tmp_path / "in.csv"
        src.write_text("prompt\n" + "".join(f"row number {i}\n" for i in range(rows)))
        job = gyro.batch.create(gyro.batch.parse_path(src), name="restart")
    finally:
        gyro.close()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_PROVIDER", "GYROSCOPE_API_TOKEN")}
    env.update(GYROSCOPE_DB=str(tmp_path / "r.db"), GYROSCOPE_DATABASE_URL=url, PYTHONPATH=str(root),
               GYROSCOPE_SIM_TTFT_MS="50", GYROSCOPE_SIM_TOKENS_PER_S="0")
    proc = subprocess.Popen([sys.executable, "-m", "core", "batch", "--resume", job, "-o",
                             str(tmp_path / "out.jsonl"), "--no-progress", "--concurrency", "4"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: done_rows(url, job) >= 10, "10 rows done")
        stop(cluster)
        spill = tmp_path / "r.db-spill.jsonl"
        until(lambda: spill.exists() and b"batch_done" in spill.read_bytes(), "results kept in the journal")
        assert proc.poll() is None
        start(cluster)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    with psycopg.connect(url) as conn:
        got = conn.execute("SELECT status, tries FROM batch_rows WHERE job_id = %s", (job,)).fetchall()
        history = conn.execute("SELECT count(*), count(DISTINCT request_id) FROM requests "
                               "WHERE job_id = %s", (job,)).fetchone()
    assert [s for s, _ in got] == ["done"] * rows and {t for _, t in got} == {1}
    assert history == (rows, rows)                  # each row sent once
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == rows
