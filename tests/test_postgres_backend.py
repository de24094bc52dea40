"""History, events and settings in a real PostgreSQL (GYROSCOPE_DATABASE_URL), shared by replicas.

The machine's server (127.0.0.1:5432) when it answers, else a temporary cluster started here
(initdb + pg_ctl); each test gets a database of its own, dropped after. The restart test
always runs its own cluster (the machine's server is never stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")

from core.config import Config, load_config  # noqa: E402
from core.db import Database  # noqa: E402
from core.errors import ConfigError  # noqa: E402
from core.history import Filters, History, RequestRecord  # noqa: E402
from core.schema import ROLLUP_SUMS  # noqa: E402
from core.service import Gyroscope  # noqa: E402
from core.storage.pg_history import PG_SUMS, PgHistory  # noqa: E402
from core.storage.postgres import PgDatabase, migrate  # noqa: E402

from pg_support import MACHINE_URL, TempCluster, answers, create_database, drop_database, own_cluster, pg_bin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server URL (to its maintenance database)."""
    if answers(MACHINE_URL):
        yield MACHINE_URL
        return
    if not (pg_bin("initdb") and pg_bin("pg_ctl")):
        pytest.skip("No PostgreSQL answers at 127.0.0.1:5432 and initdb/pg_ctl are not installed "
                    "(apt-get install postgresql), so there is no server to test against.")
    cluster = TempCluster()
    cluster.start()
    yield cluster.url
    cluster.remove()


@pytest.fixture
def pg_url(pg_server):
    url = create_database(pg_server)
    yield url
    drop_database(pg_server, url)


@pytest.fixture
def cluster():
    """A cluster of our own, for the tests that stop and start PostgreSQL."""
    with own_cluster() as ours:
        yield ours


def rows_for(n: int, seed: int = 7) -> list[RequestRecord]:
    """Varied rows over ten days: models, sources, outcomes, latencies, costs, cache hits."""
    rng = random.Random(seed)
    start = 1_795_000_000.0
    out = []
    for i in range(n):
        outcome = rng.choice(["ok"] * 6 + ["error", "circuit_open", "cancelled", "rejected"])
        cached = outcome == "ok" and rng.random() < 0.2
        out.append(RequestRecord(
            ts=start + rng.uniform(0, 10 * 86400), request_id=f"r{seed}-{i}",
            source=rng.choice(["api", "page", "batch"]), model=rng.choice(["m-a", "m-b", "m-c"]),
            outcome=outcome, error_kind=rng.choice([None, "timeout", "rate_limited"]) if outcome == "error" else None,
            attempts=rng.randint(1, 4), retry_wait_s=rng.random(),
            latency_ms=None if outcome == "rejected" else rng.uniform(1, 900),
            ttft_ms=rng.uniform(1, 300) if outcome == "ok" else None,
            prompt_tokens=rng.randint(1, 500), completion_tokens=rng.randint(0, 900),
            tokens_estimated=rng.random() < 0.1, cost=None if rng.random() < 0.05 else rng.random() / 100,
            cost_unknown=rng.random() < 0.05, from_cache=cached, cost_saved=rng.random() / 100 if cached else 0.0,
            cached_tokens=rng.randint(0, 50), reasoning_tokens=rng.randint(0, 20)))
    return out


def close(a, b, path=""):
    """Equal, floats up to summation order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_the_sums_mirror_the_sqlite_rollup():
    assert set(PG_SUMS) == {name for name, _ in ROLLUP_SUMS}


def test_migrations_are_applied_once_and_recorded(pg_url):
    db = PgDatabase(pg_url)
    try:
        names = [r["name"] for r in db.query("SELECT name FROM gyroscope_migrations ORDER BY name")]
        assert names and names[0].startswith("0001_")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert migrate(conn) == []                 # nothing twice
        assert db.query_one("SELECT count(*) AS n FROM gyroscope_migrations")["n"] == len(names)
    finally:
        db.close()


def test_a_url_that_is_not_postgresql_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config({"GYROSCOPE_DATABASE_URL": "mysql://bob:hunter2@db/x"}, secrets_path=tmp_path / "none")
    assert "postgresql://" in str(err.value) and "hunter2" not in str(err.value)


def test_an_unreachable_server_names_it_without_the_password(tmp_path):
    from core.errors import StorageError
    url = "postgresql://bob:hunter2@127.0.0.1:1/x"
    with pytest.raises(StorageError) as err:
        PgDatabase(url)
    assert "127.0.0.1:1" in str(err.value) and "hunter2" not in str(err.value)
    assert "hunter2" not in repr(Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db",
                                        database_url=url))


def test_doctor_says_which_migrations_are_applied_and_pending(pg_url, tmp_path):
    from core.storage.doctor import check_postgres
    fresh = check_postgres(pg_url)             # before any replica migrated it
    assert fresh.ok and fresh.version.startswith("PostgreSQL") and "pending" in " ".join(fresh.notes)
    PgDatabase(pg_url).close()
    done = check_postgres(pg_url)
    assert done.ok and not any("pending" in n for n in done.notes)
    gone = check_postgres("postgresql://bob:hunter2@127.0.0.1:1/x")
    assert not gone.ok and "hunter2" not in gone.detail


def test_the_same_rows_give_the_same_figures_as_sqlite(tmp_path, pg_url):
    """Every aggregation the Metrics page and `stats --json` use, on both backends."""
    lite_db, pg_db = Database(tmp_path / "h.db"), PgDatabase(pg_url)
    lite, pg = History(lite_db, tmp_path / "lite-spill"), PgHistory(pg_db, tmp_path / "pg-spill")
    try:
        records = rows_for(600)
        for history in (lite, pg):
            tickets = [history.add(r) for r in records]      # the durable path: add, then wait
            for t in tickets:
                history.wait(t)
        everything = Filters()
        some = Filters(start=1_795_100_000.0, end=1_795_600_000.0, models=("m-a", "m-c"), tz="Asia/Kolkata")
        for f in (everything, some, Filters(sources=("batch",), tz="America/New_York")):
            close(pg.totals(f), lite.totals(f), "totals")
            for unit in ("day", "hour"):
                close(pg.series(f, unit), lite.series(f, unit), f"series {unit}")
                close(pg.series(f, unit, by_model=False), lite.series(f, unit, by_model=False), "all")
                close(pg.errors_by_kind(f, unit), lite.errors_by_kind(f, unit), "errors")
            close(pg.daily_cost_by_model(f), lite.daily_cost_by_model(f), "cost")
        assert pg.distinct("model") == lite.distinct("model") == ["m-a", "m-b", "m-c"]
        assert [r["request_id"] for r in pg.rows(some)] == [r["request_id"] for r in lite.rows(some)]
        assert pg.totals()["total_requests"] == 600
    finally:
        lite_db.close()
        pg_db.close()


def test_rows_events_and_settings_live_in_postgresql(tmp_path, pg_url, simulator):
    """One service on PostgreSQL: its rows, events and settings are there, not in the file."""
    from core.models import GenerationRequest
    config = Config(provider="openai", base_url=simulator.base_url, db_path=tmp_path / "g.db",
                    api_key="sk-test", database_url=pg_url)
    gyro = Gyroscope(config)
    try:
        gyro.generate(GenerationRequest(prompt="hello", max_tokens=8, cache=False))
        gyro.settings.set("retry.max_retries", 1, actor="tester")
        gyro.history.event("cache", "all", None, "3 removed", "test").result(10)
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
            assert conn.execute("SELECT value FROM settings WHERE name = 'retry.max_retries'").fetchone()[0] == "1"
            kinds = [r[0] for r in conn.execute("SELECT kind FROM events ORDER BY id")]
        assert kinds == ["setting", "cache"]
        assert [e["kind"] for e in gyro.history.events()] == ["setting", "cache"]
        assert gyro.settings.audit()[0]["actor"] == "tester"
        assert Database(tmp_path / "g.db").query_one("SELECT count(*) AS n FROM requests")["n"] == 0
    finally:
        gyro.close()


# -- two replicas ---------------------------------------------------------------------------------
SERVER = """
import socket, uvicorn
from starlette.applications import Starlette
from core.api import routes, lifespan
sock = socket.socket(); sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(Starlette(routes=routes(), lifespan=lifespan), log_level="error")).run(sockets=[sock])
"""


def start_replica(tmp_path: Path, name: str, url: str, **extra: str):
    """An API server process on a port of its own, its SQLite file its own, on PostgreSQL ``url``."""
    import httpx2
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_PROVIDER", "GYROSCOPE_API_TOKEN")}
    env.update(GYROSCOPE_DB=str(tmp_path / f"{name}.db"), GYROSCOPE_DATABASE_URL=url,
               GYROSCOPE_SIM_TTFT_MS="1", GYROSCOPE_SIM_TOKENS_PER_S="0", PYTHONPATH=str(ROOT), **extra)
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = f"http://127.0.0.1:{int(proc.stdout.readline())}"
    for _ in range(500):
        with contextlib.suppress(httpx2.HTTPError):
            if httpx2.get(base + "/api/health", timeout=5).json().get("status") == "ok":
                return proc, base
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"replica {name} did not start")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_two_replicas_share_history_and_settings(tmp_path, pg_url):
    import httpx2
    (a, base_a), (b, base_b) = start_replica(tmp_path, "a", pg_url), start_replica(tmp_path, "b", pg_url)
    try:
        with httpx2.Client(timeout=30) as client:
            for i in range(7):
                assert client.post(base_a + "/api/generate", json={"prompt": f"a {i}", "max_tokens": 8}).status_code == 200
            for i in range(5):
                assert client.post(base_b + "/api/generate", json={"prompt": f"b {i}", "max_tokens": 8}).status_code == 200
            for base in (base_a, base_b):     # either replica counts the requests of both
                assert client.get(base + "/api/generate/metrics").json()["total_requests"] == 12
                assert client.get(base + "/api/stats").json()["total_requests"] == 12
            # B caches an answer; the cache turned off through A is off in B within a second.
            body = {"prompt": "cache me", "max_tokens": 8}
            client.post(base_b + "/api/generate", json=body)
            assert client.post(base_b + "/api/generate", json=body).json()["from_cache"] is True
            resp = client.patch(base_a + "/api/settings", json={"cache.enabled": False})
            assert resp.status_code == 200, resp.text
            changed = time.monotonic()          # stored (PATCH answers after the commit)
            while client.post(base_b + "/api/generate", json=body).json()["from_cache"]:
                assert time.monotonic() - changed < 1.0, "B still serves from its cache"
                time.sleep(0.05)
            assert time.monotonic() - changed < 1.0
            seen_a, seen_b = (client.get(base + "/api/settings").json() for base in (base_a, base_b))
            assert seen_b["settings"]["cache.enabled"] is False and seen_b["version"] == seen_a["version"]
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM settings").fetchone()[0] == 1       # stored once
            assert conn.execute("SELECT count(*) FROM events WHERE kind = 'setting'").fetchone()[0] == 1
            assert conn.execute("SELECT count(DISTINCT request_id) = count(*) FROM requests").fetchone()[0]
    finally:
        stop(a)
        stop(b)


# -- PostgreSQL restarted mid-load --------------------------------------------------------------
async def load(base: str, answered: list[str], stop: asyncio.Event, clients: int = 32) -> None:
    """Clients sending requests until told to stop; a request answered 200 is 'answered'."""
    import httpx2
    async with httpx2.AsyncClient(base_url=base, timeout=30,
                                  limits=httpx2.Limits(max_connections=clients)) as client:
        async def one(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                resp = await client.post("/api/generate", json={"prompt": f"restart {n} {i}",
                                                                "max_tokens": 8, "cache": False})
                assert resp.status_code == 200, resp.text     # served all along
                answered.append(resp.json()["request_id"])
        await asyncio.gather(*(one(n) for n in range(clients)))


def test_postgresql_restarted_mid_load_loses_no_answered_row(tmp_path, cluster):
    """Our own cluster (never the machine's server): stopped under load, rows go to the spill
    journal and health says degraded; started again, every answered row is in the database."""
    import httpx2
    proc = None
    try:
        url = create_database(cluster.url)
        proc, base = start_replica(tmp_path, "r", url)
        answered: list[str] = []
        health: list[dict] = []
        probe = PgDatabase(url)          # this process's view: reads on an event loop
        probe_errors: list[str] = []

        def read_twice() -> None:
            from core.errors import StorageError
            for _ in range(2):          # the first waits for the gone server, the second not
                with pytest.raises(StorageError) as err:
                    probe.query_one_nowait("SELECT value FROM meta WHERE key = 'settings_version'")
                probe_errors.append(err.value.user_message)

        async def main() -> None:
            stop_ = asyncio.Event()
            loader = asyncio.create_task(load(base, answered, stop_))
            async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
                async def wait_for(n: int) -> None:
                    while len(answered) < n:
                        assert not loader.done(), loader.exception()
                        await asyncio.sleep(0.01)
                await wait_for(100)
                await asyncio.to_thread(cluster.stop, "immediate")      # the database goes away
                down_at = len(answered)
                await wait_for(down_at + 200)                           # still serving
                health.append((await client.get("/api/health")).json())
                read_twice()
                await asyncio.to_thread(cluster.start)                  # ...and comes back
                up_at = len(answered)
                await wait_for(up_at + 100)
                stop_.set()
                await loader
                for _ in range(200):                                    # the replay (once a second)
                    health.append((await client.get("/api/health")).json())
                    if health[-1]["history"] == "ok" and not health[-1]["spilled_rows_waiting"]:
                        break
                    await asyncio.sleep(0.05)

        asyncio.run(main())
        down = health[0]
        assert probe_errors[1].startswith("The PostgreSQL database") and "a moment ago" in probe_errors[1]
        assert down["status"] == "degraded" and down["history"] == "spilling"
        assert down["spilled_rows_waiting"] > 0 and "PostgreSQL" in down["history_message"]
        assert health[-1]["status"] == "ok" and health[-1]["history_rows_lost"] == 0
        with psycopg.connect(url) as conn:
            stored = {r[0] for r in conn.execute("SELECT request_id FROM requests")}
            assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == len(stored)
        assert set(answered) <= stored, f"{len(set(answered) - stored)} answered rows lost"
        probe.close()
    finally:
        if proc is not None:
            stop(proc)


# -- the batch ledger, shared ---------------------------------------------------------------------
def test_rows_are_claimed_once_and_a_dead_replicas_rows_again_after_their_lease(pg_url):
    """Two ledgers (two replicas) on one job, time from an injected clock."""
    from core.storage.pg_ledger import ROW_LEASE_S, PgLedger
    now = [1_800_000_000.0]
    db = PgDatabase(pg_url)
    try:
        a, b = (PgLedger(db, clock=lambda: now[0], owner=o) for o in ("host:1", "host:2"))
        job = a.create([{"line": i + 1, "request": {"prompt": f"p{i}"}, "max_cost": 0.001}
                        for i in range(10)])
        a.take(job, a.owner)
        b.take(job, b.owner)                                     # replicas join, nobody is refused
        got_a = asyncio.run(a.claim(job, 4))
        got_b = asyncio.run(b.claim(job, 4))
        assert [r["idx"] for r in got_a] == [0, 1, 2, 3] and [r["idx"] for r in got_b] == [4, 5, 6, 7]
        for r in got_b:
            b.done(job, r["idx"], {"content": "x", "request_id": f"b{r['idx']}", "cost": 0.0})
        # A dies holding 0-3. Before its lease runs out nobody else gets them...
        now[0] += ROW_LEASE_S - 1
        assert [r["idx"] for r in asyncio.run(b.claim(job, 10))] == [8, 9]
        # ...after it, B claims them again, and A's late answers change nothing.
        now[0] += 2
        assert [r["idx"] for r in asyncio.run(b.claim(job, 10))] == [0, 1, 2, 3]
        a.done(job, 0, {"content": "late", "request_id": "a0", "cost": 0.0})
        asyncio.run(a.back(job, 1, tried=True))
        for idx in (0, 1, 2, 3, 8, 9):
            b.done(job, idx, {"content": "x", "request_id": f"b{idx}", "cost": 0.0})
        b.release(job, b.owner, "done")
        db.flush()
        rows = list(b.rows(job))
        assert [r["status"] for r in rows] == ["done"] * 10 and {r["content"] for r in rows} == {"x"}
        assert [r["tries"] for r in rows] == [1] * 10
        assert b.job(job)["status"] == "done"
    finally:
        db.close()


def test_a_stalled_replicas_late_answer_is_refused_and_the_row_is_done_once(tmp_path, pg_url):
    """Fencing: A holds row 0 past its lease without renewing (stalled), B claims it; A's late
    answer is refused by the claim generation, B's is recorded: one done, and the refusal is
    an event naming A's request (its history row stays). Time from an injected clock."""
    from core.storage.pg_ledger import ROW_LEASE_S, PgLedger
    now = [1_800_000_000.0]
    db = PgDatabase(pg_url)
    history = PgHistory(db, tmp_path / "spill")
    try:
        a, b = (PgLedger(db, clock=lambda: now[0], owner=o) for o in ("host:1", "host:2"))
        job = a.create([{"line": i + 1, "request": {"prompt": f"p{i}"}} for i in range(2)])
        a.take(job, a.owner)
        b.take(job, b.owner)
        (ra,) = asyncio.run(a.claim(job, 1))
        now[0] += ROW_LEASE_S + 1                      # A stalls: no heartbeat
        history.wait(history.add(RequestRecord(ts=now[0], request_id="a-late", job_id=job)))
        (rb,) = asyncio.run(b.claim(job, 1))
        assert rb["idx"] == ra["idx"] == 0 and rb["claim"] == ra["claim"] + 1
        a.done(job, 0, {"content": "from A", "request_id": "a-late", "cost": 0.01}, claim=ra["claim"])
        b.done(job, 0, {"content": "from B", "request_id": "b-0", "cost": 0.01}, claim=rb["claim"])
        a.done(job, 0, {"content": "from A", "request_id": "a-late", "cost": 0.01}, claim=ra["claim"])
        db.flush()
        (row,) = [r for r in b.rows(job) if r["idx"] == 0]
        assert (row["status"], row["content"], row["tries"]) == ("done", "from B", 1)
        refused = history.events("batch")
        assert [e["new"] for e in refused] == ["late answer refused"] * 2
        assert "a-late" in refused[0]["cause"] and "host:2" in refused[0]["cause"]
        assert history.totals()["total_requests"] == 1          # A's request stays in history
        # The same runner claiming its own expired row again: only the newest claim finishes it.
        (r1,) = asyncio.run(a.claim(job, 1))
        now[0] += ROW_LEASE_S + 1
        (r2,) = asyncio.run(a.claim(job, 1))
        assert r1["idx"] == r2["idx"] == 1
        asyncio.run(a.back(job, 1, tried=True, claim=r1["claim"]))          # stale: nothing
        a.done(job, 1, {"content": "old", "request_id": "a-1-old", "cost": 0.0}, claim=r1["claim"])
        a.done(job, 1, {"content": "new", "request_id": "a-1-new", "cost": 0.0}, claim=r2["claim"])
        db.flush()
        (row,) = [r for r in a.rows(job) if r["idx"] == 1]
        assert (row["status"], row["content"], row["tries"]) == ("done", "new", 1)
    finally:
        db.close()


def test_the_heartbeat_keeps_a_live_runners_rows_past_the_first_lease(pg_url):
    """A runner that renews (its loop alive) keeps its row however long the request takes;
    once it stops renewing, the row is claimable one lease later, not before."""
    from core.storage.pg_ledger import ROW_LEASE_S, PgLedger
    now = [1_800_000_000.0]
    db = PgDatabase(pg_url)
    try:
        a, b = (PgLedger(db, clock=lambda: now[0], owner=o) for o in ("host:1", "host:2"))
        job = a.create([{"line": 1, "request": {"prompt": "slow"}}])
        a.take(job, a.owner)
        (ra,) = asyncio.run(a.claim(job, 1))
        for _ in range(6):                         # three leases' time, renewed every 15 s
            now[0] += ROW_LEASE_S / 2
            asyncio.run(a.renew(job, a.owner))
            assert asyncio.run(b.claim(job, 1)) == []
        now[0] += ROW_LEASE_S - 1                  # A stops renewing
        assert asyncio.run(b.claim(job, 1)) == []
        now[0] += 2
        assert asyncio.run(b.claim(job, 1, reclaim=False)) == []    # pending rows only
        (rb,) = asyncio.run(b.claim(job, 1))
        assert rb["claim"] == ra["claim"] + 1
    finally:
        db.close()


def test_the_last_runner_out_finishes_the_job(pg_url):
    from core.storage.pg_ledger import PgLedger
    db = PgDatabase(pg_url)
    try:
        a, b = (PgLedger(db, owner=o) for o in ("host:1", "host:2"))
        job = a.create([{"line": i + 1, "request": {"prompt": f"p{i}"}} for i in range(2)])
        a.take(job, a.owner)
        b.take(job, b.owner)
        (ra,), (rb,) = asyncio.run(a.claim(job, 1)), asyncio.run(b.claim(job, 1))
        a.done(job, ra["idx"], {"content": "x", "request_id": "a", "cost": 0.0})
        a.release(job, a.owner, "done")               # B still works on its row
        assert a.job(job)["status"] == "running" and a.job(job)["alive"]   # not offered for resume
        b.done(job, rb["idx"], {"content": "x", "request_id": "b", "cost": 0.0})
        b.release(job, b.owner, "done")
        assert a.job(job)["status"] == "done"
    finally:
        db.close()


def test_a_batch_job_worked_by_two_replicas_does_every_row_exactly_once(tmp_path, pg_url):
    rows = 240
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "c.db",
                            database_url=pg_url))
    try:
        src = tmp_path / "in.csv"
        src.write_text("prompt\n" + "".join(f"row number {i}\n" for i in range(rows)))
        job = gyro.batch.create(gyro.batch.parse_path(src), name="shared")
    finally:
        gyro.close()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_PROVIDER", "GYROSCOPE_API_TOKEN")}
    procs = []
    # 100 ms a row, 4 at a time: ~6 s for one replica alone, so both have started long before
    # the job is done (starting a process takes a few seconds on a busy machine).
    for name in ("a", "b"):
        env_r = dict(env, GYROSCOPE_DB=str(tmp_path / f"{name}.db"), GYROSCOPE_DATABASE_URL=pg_url,
                     GYROSCOPE_SIM_TTFT_MS="100", GYROSCOPE_SIM_TOKENS_PER_S="0", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "core", "batch", "--resume", job, "-o", str(tmp_path / f"{name}.jsonl"),
             "--no-progress", "--concurrency", "4"], cwd=tmp_path, env=env_r,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err             # each waits for the other's rows, then both are done
    with psycopg.connect(pg_url) as conn:
        status = conn.execute("SELECT status FROM batch_jobs WHERE id = %s", (job,)).fetchone()[0]
        done = conn.execute("SELECT status, tries, owner, request_id FROM batch_rows WHERE job_id = %s",
                            (job,)).fetchall()
        history = conn.execute("SELECT request_id, outcome FROM requests WHERE job_id = %s", (job,)).fetchall()
    assert status == "done"
    assert [r[0] for r in done] == ["done"] * rows and {r[1] for r in done} == {1}
    assert len({r[2] for r in done}) == 2, "both replicas worked the job"
    assert len(history) == rows and {o for _, o in history} == {"ok"}      # each row sent once
    assert {r[3] for r in done} == {rid for rid, _ in history}


# -- the Metrics page and the CLI on PostgreSQL ----------------------------------------------------
def test_the_metrics_page_reads_postgresql_and_agrees_with_the_cli(app_env, pg_url, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import core.service
    from core import charts
    monkeypatch.setenv("GYROSCOPE_DATABASE_URL", pg_url)
    gyro = core.service.default_service()
    assert isinstance(gyro.history, PgHistory)
    at = AppTest.from_file(str(ROOT / "pages" / "metrics.py"), default_timeout=60)
    at.run()
    at.button(key="load_demo").click().run()          # the demo rows go to PostgreSQL
    assert len(at.exception) == 0
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 5000
        assert conn.execute("SELECT count(*) FROM events WHERE kind = 'breaker'").fetchone()[0] > 0
    at.radio(key="metrics_range").set_value("Last 30 days").run()
    assert at.metric and len(at.exception) == 0
    at.session_state["metrics_tab"] = "Requests and errors"
    at.session_state["metrics_charts_on"] = True      # what the page does once the browser drew its first pass
    at.session_state["metrics_details"] = True        # a click on "Technical details"
    at.run()
    assert at.get("plotly_chart") and len(at.exception) == 0
    # The page prints the CLI command for its range; the CLI, on the same database, agrees.
    shown_text = "\n".join(str(e.value) for e in [*at.markdown, *at.caption, *at.code])
    since, until = re.search(r"--since (\S+) --until (\S+)$", shown_text, re.M).groups()
    out = subprocess.run([sys.executable, "-m", "core", "stats", "--json", "--since", since, "--until", until],
                         cwd=ROOT, env={**os.environ, "GYROSCOPE_DB": str(app_env / "cli.db")},
                         capture_output=True, text=True, timeout=60, check=True)
    cli = json.loads(out.stdout)
    assert cli["total_requests"] > 1000
    assert {m.label: m.value for m in at.metric} == {label: value for label, value, _ in charts.headline(cli)}


def test_a_runner_takes_up_the_rows_of_a_replica_that_died_when_their_lease_runs_out(tmp_path, pg_url,
                                                                                       simulator):
    """Time from an injected clock: the runner's waits for the dead replica's lease advance it."""
    from core.batch.runner import JobRunner
    from core.providers.simulator_provider import SimulatorProvider
    from core.storage.pg_ledger import ROW_LEASE_S, PgLedger
    from tests.support import FakeClock
    clock = FakeClock()
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db", database_url=pg_url),
                     provider=SimulatorProvider(simulator), clock=clock.as_clock())
    try:
        src = tmp_path / "in.csv"
        src.write_text("prompt\n" + "".join(f"row {i}\n" for i in range(12)))
        job = gyro.batch.create(gyro.batch.parse_path(src))
        dead = PgLedger(gyro.pg, clock=clock.time, owner="elsewhere:99")
        dead.take(job, dead.owner)
        assert [r["idx"] for r in asyncio.run(dead.claim(job, 3))] == [0, 1, 2]   # ...and it dies
        started = clock.time()
        runner = JobRunner(gyro, job, concurrency=4)
        assert asyncio.run(runner.run()) == "done"
        assert clock.time() - started >= ROW_LEASE_S          # it waited for the lease, no longer
        rows = list(gyro.batch.ledger.rows(job))
        assert [r["status"] for r in rows] == ["done"] * 12 and [r["tries"] for r in rows] == [1] * 12
        assert gyro.batch.ledger.job(job)["status"] == "done"
        assert simulator.sim.stats()["completions"] == 12      # each row sent once
    finally:
        gyro.close()
