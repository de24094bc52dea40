"""Budgets in a real PostgreSQL (GYROSCOPE_DATABASE_URL): one ledger for every replica.

Two real app processes share one budget over a real PostgreSQL (a trigger there aborts any
write that would pass the limit); in-process services on one database with an injected
clock for refusals, expiry and the money left; our own cluster stopped for the outage.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")

from core import budgets  # noqa: E402
from core.config import Config  # noqa: E402
from core.errors import BudgetExceeded, StorageError  # noqa: E402
from core.providers.simulator_provider import SimulatorProvider  # noqa: E402
from core.service import Gyroscope  # noqa: E402
from core.storage.pg_budgets import OUTAGE_RETRY_S, RECONNECT_S, SETTLED_KEEP_S, PgBudgets  # noqa: E402

from pg_support import create_database  # noqa: E402
from tests.support import FakeClock  # noqa: E402
from tests.test_budgets import NEXT_MIDNIGHT, NOW, ask, hold_of  # noqa: E402
from tests.test_postgres_backend import cluster, pg_server, pg_url, start_replica, stop  # noqa: E402,F401

DAY = "d:2027-01-15"


def pg_gyro(tmp_path, name: str, simulator, clock: FakeClock, url: str | None) -> Gyroscope:
    """A service with its own file (and its own connections: as a replica has) on ``url``."""
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / f"{name}.db", database_url=url)
    gyro = Gyroscope(cfg, provider=SimulatorProvider(simulator), clock=clock.as_clock())
    gyro.settings.ttl = 0
    return gyro


def guard_ledger(url: str, limit: float) -> None:
    """A trigger that aborts any write leaving spent + reserved above ``limit`` on a global
    day: a reservation that passed the limit would fail its request loudly (a 503)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"""CREATE FUNCTION guard_budget() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.scope = 'all' AND NEW.period LIKE 'd:%' AND NEW.reserved > 0
                   AND NEW.spent + NEW.reserved > {limit!r} + 1e-9 THEN
                    RAISE EXCEPTION 'budget passed: % + %', NEW.spent, NEW.reserved;
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER guard AFTER INSERT OR UPDATE ON budget_ledger "
                     "FOR EACH ROW EXECUTE FUNCTION guard_budget()")
        with pytest.raises(psycopg.errors.RaiseException):     # the guard does bite
            with conn.transaction():
                conn.execute("INSERT INTO budget_ledger VALUES ('all', 'd:probe', 0, %s)", (limit * 2,))


def left(scraped: str, period: str) -> float:
    """The global limit's money left, as Prometheus reads it."""
    start = f'gyroscope_budget_left_usd{{period="{period}",scope="all"}} '
    return float(next(ln for ln in scraped.splitlines() if ln.startswith(start)).split()[-1])


def day_row(url: str, scope: str = "all") -> tuple[float, float]:
    """(spent, reserved) of the scope's one day."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT spent, reserved FROM budget_ledger WHERE scope = %s "
                            "AND period LIKE 'd:2%%'", (scope,)).fetchall()
    assert len(rows) == 1, rows
    return rows[0]


# -- two replicas, one budget -------------------------------------------------------------------
def test_two_replicas_never_hold_or_spend_past_one_shared_limit(tmp_path, pg_url, simulator):
    """150 concurrent requests through each of two real app processes; a trigger in
    PostgreSQL aborts any write passing the limit; the simulator counts what was sent."""
    import httpx2
    import openai
    clock = FakeClock(time.time())
    setup = pg_gyro(tmp_path, "setup", simulator, clock, pg_url)
    limit = sum(hold_of(ask(i)) for i in range(90))              # room for about 90 holds
    setup.settings.set_many({"prices.upstreams": json.dumps({simulator.base_url: "openai"}),
                             "budget.daily_usd": limit}, actor="test")
    setup.close()
    guard_ledger(pg_url, limit)
    env = {"OPENAI_BASE_URL": simulator.base_url, "OPENAI_API_KEY": "sk-test"}
    (a, base_a), (b, base_b) = (start_replica(tmp_path, n, pg_url, **env) for n in ("a", "b"))
    simulator.sim.reset_stats()
    try:
        async def load(base: str, tag: str) -> list:
            async with httpx2.AsyncClient(base_url=base, timeout=60,
                                          limits=httpx2.Limits(max_connections=150)) as client:
                async def one(i: int):
                    r = ask(i)
                    return await client.post("/api/generate", json={
                        "prompt": r.prompt, "model": r.model, "max_tokens": r.max_tokens, "cache": False})
                return await asyncio.gather(*(one(f"{tag}{i}") for i in range(150)))

        async def both():
            return await asyncio.gather(load(base_a, "a"), load(base_b, "b"))

        got = [resp for part in asyncio.run(both()) for resp in part]
        assert {r.status_code for r in got} <= {200, 402}, {r.status_code: r.text for r in got}
        answered = [r.json() for r in got if r.status_code == 200]
        refused = [r for r in got if r.status_code == 402]
        assert 90 <= len(answered) < 300 and refused
        # Answers cost less than their holds, so a little more than 90 fit; not 2 x 90.
        assert len(answered) < 2 * 90
        assert simulator.sim.stats()["chat_requests"] == len(answered)    # nothing sent for refusals
        deadline = time.monotonic() + 10                # settlements: each replica's thread
        while (held := day_row(pg_url)[1]) > 1e-12 and time.monotonic() < deadline:
            time.sleep(0.05)
        spent, held = day_row(pg_url)
        assert held == pytest.approx(0, abs=1e-12)
        assert spent == pytest.approx(sum(r["cost"] for r in answered)) and spent <= limit
        body = refused[0].json()["error"]
        assert body["kind"] == "budget_exceeded" and "Nothing was sent" in body["message"]
        assert body["resets_at"].endswith("T00:00:00+00:00") and int(refused[0].headers["retry-after"]) >= 1
        # The money left, as either replica tells Prometheus: the shared spend.
        for base in (base_a, base_b):
            text = httpx2.get(base + "/api/metrics", timeout=10).text
            assert left(text, "day") == pytest.approx(max(0.0, limit - spent), abs=1e-9)
        health = httpx2.get(base_a + "/api/health", timeout=10).json()
        assert health["budgets"] == "ok" and health["budget_settlements_waiting"] == 0
        # The real openai client through B's /v1: the same 402, with when it resets.
        sdk = openai.OpenAI(api_key="x", base_url=base_b + "/v1", max_retries=0)
        with pytest.raises(openai.APIStatusError) as no:
            sdk.chat.completions.create(model="gpt-4o-mini", max_tokens=40,
                                        messages=[{"role": "user", "content": "One more tagline"}])
        assert no.value.status_code == 402 and "resets at" in no.value.message
    finally:
        stop(a)
        stop(b)


# -- in-process services on one database, an injected clock -------------------------------------
@pytest.fixture
def clock():
    return FakeClock(NOW)


def test_a_refusal_reads_as_with_the_file(tmp_path, pg_url, simulator, clock):
    """The same requests and limit against the file's ledger and PostgreSQL's: the same
    answers, the same refusal (message, resets_at, Retry-After)."""
    seen = []
    for name, url in (("file", None), ("pg", pg_url)):
        gyro = pg_gyro(tmp_path, name, simulator, clock, url)
        try:
            gyro.settings.set_many({"budget.daily_usd": hold_of(ask()) * 2.5,
                                    "budget.limits": json.dumps({"model:gpt-4o-mini": {"month": 1.0}})},
                                   actor="test")
            assert isinstance(gyro.budgets, PgBudgets) == (url is not None)
            costs = []
            for i in range(2):
                costs.append(gyro.generate(ask(i)).cost)
                gyro.budgets.flush()    # PostgreSQL's settle is on a thread of its own
            with pytest.raises(BudgetExceeded) as refused:
                gyro.generate(ask(2))
            gyro.budgets.flush()
            plan = budgets.plan_of(gyro.settings.snapshot())
            status = gyro.budgets.status(plan)
            seen.append((costs, refused.value.user_message, refused.value.as_dict(),
                         refused.value.retry_in_s, status))
        finally:
            gyro.close()
    (file_costs, file_msg, file_body, file_wait, file_status), pg = seen[0], seen[1]
    assert pg[0] == file_costs
    assert pg[1] == file_msg and "resets at 2027-01-16T00:00:00+00:00" in pg[1]
    assert pg[2] == file_body and pg[2]["resets_at"] == "2027-01-16T00:00:00+00:00"
    assert pg[3] == file_wait == pytest.approx(NEXT_MIDNIGHT - NOW)
    assert [s["name"] for s in pg[4]] == [s["name"] for s in file_status]
    for ours, theirs in zip(pg[4], file_status):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert value == (pytest.approx(theirs[key]) if isinstance(value, float) else theirs[key]), key


def test_holds_of_a_replica_that_died_are_given_back_after_their_expiry(tmp_path, pg_url, simulator, clock):
    one = hold_of(ask())
    dead = pg_gyro(tmp_path, "dead", simulator, clock, pg_url)
    alive = pg_gyro(tmp_path, "alive", simulator, clock, pg_url)
    try:
        alive.settings.set("budget.daily_usd", one * 1.5, actor="test")
        plan = budgets.plan_of(alive.settings.snapshot())
        stuck = dead.budgets.reserve(plan, "gpt-4o-mini", "api", one)     # its replica dies
        assert stuck is not None
        with pytest.raises(BudgetExceeded, match=r"\$0\.0000 spent"):
            alive.generate(ask(1))
        clock.advance(budgets.Budgets.HOLD_TTL_S - 1)
        with pytest.raises(BudgetExceeded):                   # not expired yet
            alive.generate(ask(2))
        clock.advance(budgets.Budgets.SWEEP_EVERY_S)          # expired, and a sweep is due
        result = alive.generate(ask(3))                       # the next reservation gave it back
        alive.budgets.flush()
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM budget_holds").fetchone()[0] == 0
        assert day_row(pg_url) == pytest.approx((result.cost, 0.0))
        # It comes back after all: its cost counts, once, however often it is written.
        dead.budgets.settle(stuck, one)
        dead.budgets.flush()
        dead.budgets._write([(stuck.id, one, stuck.rows)])   # a journal replayed twice
        assert day_row(pg_url) == pytest.approx((result.cost + one, 0.0))
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM budget_holds").fetchone()[0] == 0
        # Marks of settled holds go after a day (the settler prunes them, off the requests).
        assert alive.budgets.prune() == 0
        clock.advance(SETTLED_KEEP_S + 1)
        assert dead.budgets.prune() == 2                     # the stuck hold's and ask(3)'s
    finally:
        dead.close()
        alive.close()


def test_the_money_left_is_what_every_replica_spent(tmp_path, pg_url, simulator, clock):
    a = pg_gyro(tmp_path, "a", simulator, clock, pg_url)
    b = pg_gyro(tmp_path, "b", simulator, clock, pg_url)
    try:
        a.settings.set_many({"budget.monthly_usd": 1.0, "budget.warn_percent": 1}, actor="test")
        spent = a.generate(ask(1, max_tokens=60)).cost + b.generate(ask(2, max_tokens=60)).cost
        a.budgets.flush()
        b.budgets.flush()
        for gyro in (a, b):
            month = gyro.budgets.status(budgets.plan_of(gyro.settings.snapshot()))[0]
            assert month["spent_usd"] == pytest.approx(spent) and month["held_usd"] == 0
            assert month["left_usd"] == pytest.approx(1.0 - spent)
            assert left(gyro.prometheus.exposition().decode(), "month") == pytest.approx(1.0 - spent)
    finally:
        a.close()
        b.close()


def test_ledger_rows_held_by_a_stuck_session_refuse_as_busy_and_send_nothing(
        tmp_path, pg_url, simulator, clock, monkeypatch):
    monkeypatch.setattr(PgBudgets, "LOCK_WAIT_S", 0.05)
    gyro = pg_gyro(tmp_path, "r", simulator, clock, pg_url)
    try:
        gyro.settings.set("budget.daily_usd", 1.0, actor="test")
        gyro.generate(ask(1))                                # the day's row exists
        gyro.budgets.flush()
        simulator.sim.reset_stats()
        with psycopg.connect(pg_url) as stuck:               # a session that holds the row
            stuck.execute("SELECT * FROM budget_ledger WHERE scope = 'all' FOR UPDATE")
            with pytest.raises(StorageError, match="locked by another session") as busy:
                gyro.generate(ask(2))
            stuck.rollback()
        assert "Nothing was sent" in busy.value.user_message and busy.value.retry_in_s == 1.0
        assert simulator.sim.stats()["chat_requests"] == 0
        assert gyro.generate(ask(3)).outcome == "ok"         # the row free again: served
    finally:
        gyro.close()


# -- PostgreSQL gone ----------------------------------------------------------------------------
def test_postgresql_gone_refuses_budgeted_requests_and_keeps_settlements_until_it_is_back(
        tmp_path, simulator, clock, cluster):
    """Our own cluster (never the machine's server), stopped and started again."""
    gyro = None
    try:
        url = create_database(cluster.url)
        gyro = pg_gyro(tmp_path, "r", simulator, clock, url)
        one = hold_of(ask())
        gyro.settings.set("budget.limits", json.dumps({"source:api": {"day": one * 10}}), actor="test")
        plan = budgets.plan_of(gyro.settings.snapshot())
        in_flight = gyro.budgets.reserve(plan, "gpt-4o-mini", "api", one)    # answered during the outage
        # An immediate stop is a crash: the reservation, committed without waiting for the
        # WAL flush, may be lost with it. Either way its settlement counts its cost once.
        cluster.stop("immediate")
        simulator.sim.reset_stats()
        with pytest.raises(StorageError) as refused:
            gyro.generate(ask(1, source="api"))
        message = refused.value.user_message
        assert message.startswith("The budget could not be checked") and "Nothing was sent" in message
        assert "did not answer" in message and f"127.0.0.1:{cluster.port}" in message
        assert refused.value.retry_in_s == OUTAGE_RETRY_S and refused.value.kind == "storage"   # a 503
        with pytest.raises(StorageError, match="did not answer a moment ago"):     # at once now
            gyro.generate(ask(2, source="api"))
        assert gyro.generate(ask(3, source="page")).outcome == "ok"    # no budget applies: served
        assert simulator.sim.stats()["chat_requests"] == 1            # only that one was sent
        gyro.budgets.settle(in_flight, one * 0.5)                     # its answer's cost
        gyro.budgets.flush()
        assert gyro.budgets.settles_waiting == 1
        health = gyro.budgets.health()
        assert health["budgets"] == "unreachable" and health["budget_settlements_waiting"] == 1
        assert "refused until it does" in health["budgets_message"]
        assert json.loads(gyro.budgets.journal.path.read_text()) == {
            "hold": in_flight.id, "cost": one * 0.5, "rows": [["source:api", DAY]]}

        cluster.start()
        assert gyro.budgets.replay() and gyro.budgets.settles_waiting == 0
        assert gyro.budgets.health()["budget_settlements_waiting"] == 0
        assert day_row(url, "source:api") == pytest.approx((one * 0.5, 0.0))
        deadline = time.monotonic() + 10 * RECONNECT_S    # the settler thread connects again
        while True:
            try:
                result = gyro.generate(ask(4, source="api"))
                break
            except StorageError:
                assert time.monotonic() < deadline, "budgets did not come back"
                time.sleep(RECONNECT_S / 10)
        gyro.budgets.flush()
        assert gyro.budgets.health() == {"budgets": "ok", "budget_settlements_waiting": 0}
        assert result.outcome == "ok" and day_row(url, "source:api") == pytest.approx((one * 0.5 + result.cost, 0.0))
    finally:
        if gyro is not None:
            gyro.close()


def test_the_metrics_page_shows_what_another_replica_spent(app_env, pg_url, monkeypatch):
    """Money spent through another service (a replica: its own file, its own connections) on
    the same PostgreSQL is what the Metrics page of this one reports as spent and left."""
    from streamlit.testing.v1 import AppTest

    import core.service
    from core.providers.simulator_provider import shared_simulator
    from tests.test_metrics_page import ROOT, figures
    monkeypatch.setenv("GYROSCOPE_DATABASE_URL", pg_url)
    other = Gyroscope(Config(provider="simulator", base_url=None, db_path=app_env / "other.db",
                             database_url=pg_url), provider=SimulatorProvider(shared_simulator()))
    try:
        other.settings.set_many({"budget.monthly_usd": 0.002, "budget.warn_percent": 1}, actor="test")
        spent = sum(other.generate(ask(i, max_tokens=400)).cost for i in range(3))
        other.budgets.flush()
    finally:
        other.close()
    assert isinstance(core.service.default_service().budgets, PgBudgets)     # this replica spent nothing
    at = AppTest.from_file(str(ROOT / "pages" / "metrics.py"), default_timeout=60).run()
    assert not at.exception
    assert "Budget this month" in figures(at)        # the second pass, where budgets are drawn
    shown = " ".join(str(c.value) for c in at.caption)
    assert f"Monthly budget: **${0.002 - spent:,.2f}** left of $0.00" in shown
    warning = next(w.value for w in at.warning if "monthly budget is" in w.value)
    assert f"(${spent:,.4f} spent, $0.0000 held, limit $0.00)" in warning and spent >= 0.0001


def test_a_replica_answers_503_for_budgeted_requests_while_postgresql_is_gone(tmp_path, simulator, cluster):
    """A real app process on our own cluster, stopped and started: the HTTP shape of the
    refusal (503, Retry-After, the message), health, and service again once it is back."""
    import httpx2
    proc = None
    try:
        url = create_database(cluster.url)
        setup = pg_gyro(tmp_path, "setup", simulator, FakeClock(time.time()), url)
        setup.settings.set_many({"prices.upstreams": json.dumps({simulator.base_url: "openai"}),
                                 "budget.daily_usd": 10.0}, actor="test")
        setup.close()
        proc, base = start_replica(tmp_path, "r", url, OPENAI_BASE_URL=simulator.base_url,
                                   OPENAI_API_KEY="sk-test")
        body = {"prompt": "A tagline for a bakery", "model": "gpt-4o-mini", "max_tokens": 20, "cache": False}
        with httpx2.Client(base_url=base, timeout=30) as client:
            assert client.post("/api/generate", json=body).status_code == 200
            cluster.stop("fast")
            simulator.sim.reset_stats()
            refused = [client.post("/api/generate", json=body) for _ in range(2)]
            assert [r.status_code for r in refused] == [503, 503]
            assert refused[0].headers["retry-after"] == str(round(OUTAGE_RETRY_S))
            error = refused[0].json()["error"]
            assert error["kind"] == "storage" and error["message"].startswith("The budget could not be checked")
            assert "Nothing was sent" in error["message"] and "sk-test" not in refused[0].text
            assert simulator.sim.stats()["chat_requests"] == 0
            health = client.get("/api/health").json()
            assert health["status"] == "degraded" and health["budgets"] == "unreachable"
            cluster.start()
            deadline = time.monotonic() + 30     # the settler connects again (every RECONNECT_S)
            while (again := client.post("/api/generate", json=body)).status_code != 200:
                assert again.status_code == 503 and time.monotonic() < deadline, again.text
                time.sleep(RECONNECT_S / 5)
            assert simulator.sim.stats()["chat_requests"] == 1
    finally:
        if proc is not None:
            stop(proc)
