"""Budgets that hold: 1000 concurrent requests against the simulator over real HTTP, a
ledger on a real SQLite file, days and months from an injected clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading

import pytest

from core import budgets, errors, prices
from core.config import Config
from core.db import Database
from core.errors import BudgetExceeded, InvalidParameter
from core.models import GenerationRequest
from core.providers.openai_provider import OpenAIProvider
from core.providers.simulator_provider import SimulatorProvider
from core.service import Gyroscope
from tests.support import FakeClock
from tests.test_pipeline import make_gyro, rows

# 2027-01-15 08:00:00 UTC
NOW = 1_800_000_000.0
NEXT_MIDNIGHT = dt.datetime(2027, 1, 16, tzinfo=dt.timezone.utc).timestamp()


def ask(i: int = 0, source: str = "api", model: str = "gpt-4o-mini", max_tokens: int = 40):
    return GenerationRequest(prompt=f"Write tagline number {i} for a bakery", model=model,
                             max_tokens=max_tokens, cache=False, source=source)


def hold_of(request: GenerationRequest) -> float:
    """What the pipeline holds for one request: its prompt and max_tokens at the price."""
    from core import tokens
    from core.models import chat_messages
    prompt = tokens.count_messages(chat_messages(request.prompt), request.model)
    return prices.price(request.model, prices.OPENAI, prompt, request.max_tokens)


def guard_ledger(db_path, limit: float) -> None:
    """A trigger that aborts any write leaving spent + reserved above ``limit`` on the global
    day: if a reservation ever passed the limit, that request would fail loudly."""
    db = Database(db_path)
    for when in ("INSERT", "UPDATE"):
        db.write(lambda conn, when=when: conn.execute(
            f"CREATE TRIGGER guard_{when.lower()} AFTER {when} ON budget_ledger "
            f"WHEN new.scope = 'all' AND new.period LIKE 'd:%' AND new.reserved > 0 "
            f"AND new.spent + new.reserved > {limit!r} + 1e-9 "
            "BEGIN SELECT RAISE(ABORT, 'budget passed'); END"))
    db.close()


@pytest.fixture
def clock():
    return FakeClock(NOW)


@pytest.fixture
def gyro(tmp_path, simulator, clock):
    g = make_gyro(tmp_path, simulator, clock)
    yield g
    g.close()


def run_concurrently(gyro, requests, refusals=(BudgetExceeded,)):
    async def one(r):
        try:
            return await gyro.agenerate(r)
        except refusals as exc:
            return exc

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))
    return asyncio.run(main())


def ledger(gyro) -> dict:
    gyro.db.flush()
    return {(r["scope"], r["period"]): (r["spent"], r["reserved"])
            for r in gyro.db.query("SELECT * FROM budget_ledger")}


def test_1000_concurrent_requests_never_hold_more_than_the_limit_and_refusals_send_nothing(
        gyro, simulator, tmp_path):
    requests = [ask(i) for i in range(1000)]
    limit = sum(hold_of(r) for r in requests[:300])     # room for about 300 holds
    guard_ledger(tmp_path / "g.db", limit)
    gyro.settings.set("budget.daily_usd", limit, actor="test")
    simulator.sim.reset_stats()
    results = run_concurrently(gyro, requests)
    answered = [r for r in results if not isinstance(r, BudgetExceeded)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(answered) >= 300 and refused            # answers cost less than their holds
    assert simulator.sim.stats()["chat_requests"] == len(answered)   # nothing sent for refusals
    spent, held = ledger(gyro)[("all", "d:2027-01-15")]
    assert held == pytest.approx(0, abs=1e-12)
    assert spent == pytest.approx(sum(r.cost for r in answered)) and spent <= limit
    got = rows(gyro)
    assert len(got) == 1000
    assert sum(r["error_kind"] == "budget_exceeded" and r["outcome"] == "rejected" for r in got) == len(refused)
    message = refused[0].user_message
    assert "resets at 2027-01-16T00:00:00+00:00 (in 57,600 s)" in message and "Nothing was sent" in message
    assert refused[0].as_dict()["resets_at"] == "2027-01-16T00:00:00+00:00"
    assert refused[0].retry_in_s == pytest.approx(NEXT_MIDNIGHT - NOW)


def test_overshoot_stays_within_the_stated_bound_when_the_server_counts_more_prompt_tokens(
        gyro, simulator):
    extra = 50     # a chat template's tokens the server counts and tiktoken does not
    simulator.sim.set_faults(prompt_tokens_extra=extra)
    # Answers wait 300 ms, so every admitted request is in flight when the limit is reached
    # (on a busy machine they could otherwise settle one by one, and nothing overshoots).
    simulator.sim.set_latency(ttft_ms=300)
    requests = [ask(i, max_tokens=5) for i in range(1000)]
    limit = sum(hold_of(r) for r in requests[:200])
    gyro.settings.set("budget.daily_usd", limit, actor="test")
    results = run_concurrently(gyro, requests)
    answered = [r for r in results if not isinstance(r, BudgetExceeded)]
    spent, _ = ledger(gyro)[("all", "d:2027-01-15")]
    input_rate = prices.OPENAI.rates("gpt-4o-mini").input
    # docs/metrics.md: at most (reported - estimated prompt tokens) x input rate per request
    # in flight when the limit is reached; every answered request was in flight here.
    bound = len(answered) * extra * input_rate
    assert spent > limit                      # the case the bound is about does happen
    assert spent - limit <= bound + 1e-12


def test_the_budget_resets_at_the_next_local_midnight_of_the_injected_clock(gyro, clock):
    gyro.settings.set_many({"budget.daily_usd": hold_of(ask()) * 1.5, "budget.timezone": "Europe/Berlin"},
                           actor="test")
    gyro.generate(ask(1))
    with pytest.raises(BudgetExceeded) as refused:
        gyro.generate(ask(2))
    berlin_midnight = dt.datetime(2027, 1, 16, tzinfo=dt.timezone(dt.timedelta(hours=1))).timestamp()
    assert refused.value.resets_at == berlin_midnight
    assert "2027-01-15T23:00:00+00:00" in refused.value.user_message
    clock.now = berlin_midnight - 1
    with pytest.raises(BudgetExceeded):
        gyro.generate(ask(3))
    clock.now = berlin_midnight
    assert gyro.generate(ask(4)).outcome == "ok"
    assert set(ledger(gyro)) == {("all", "d:2027-01-15"), ("all", "d:2027-01-16")}


def test_monthly_limit_runs_to_the_first_of_next_month(gyro, clock):
    gyro.settings.set("budget.monthly_usd", hold_of(ask()) * 1.5, actor="test")
    gyro.generate(ask(1))
    with pytest.raises(BudgetExceeded) as refused:
        gyro.generate(ask(2))
    assert refused.value.as_dict()["resets_at"] == "2027-02-01T00:00:00+00:00"
    assert "monthly budget" in refused.value.user_message


def test_limits_per_model_and_per_source(gyro):
    one = hold_of(ask())
    gyro.settings.set("budget.limits", json.dumps({"source:batch": {"day": one * 1.5},
                                                   "model:gpt-4o": {"month": 1e-9}}), actor="test")
    gyro.generate(ask(1, source="batch"))
    with pytest.raises(BudgetExceeded, match="daily budget of source batch"):
        gyro.generate(ask(2, source="batch"))
    assert gyro.generate(ask(3, source="api")).outcome == "ok"       # other sources go on
    with pytest.raises(BudgetExceeded, match="monthly budget of model gpt-4o"):
        gyro.generate(ask(4, model="gpt-4o"))


def test_a_warning_is_recorded_once_when_the_threshold_is_passed(gyro):
    gyro.settings.set_many({"budget.daily_usd": hold_of(ask()) * 3, "budget.warn_percent": 50},
                           actor="test")
    gyro.generate(ask(1))
    assert gyro.history.events("budget_warning") == []
    gyro.generate(ask(2))
    gyro.generate(ask(3))
    warnings = gyro.history.events("budget_warning")
    assert len(warnings) == 1 and warnings[0]["subject"] == "all|d:2027-01-15"
    status = gyro.budgets.status(budgets.plan_of(gyro.settings.snapshot()))
    assert status[0]["warn"] and status[0]["left_usd"] >= 0


def test_unknown_price_is_refused_while_a_budget_applies(tmp_path, simulator, clock):
    cfg = Config(provider="openai", base_url=simulator.base_url, db_path=tmp_path / "h.db")
    gyro = Gyroscope(cfg, provider=OpenAIProvider("sk-x", simulator.base_url), clock=clock.as_clock())
    gyro.settings.ttl = 0
    try:
        gyro.settings.set("budget.daily_usd", 10.0, actor="test")
        simulator.sim.reset_stats()
        with pytest.raises(BudgetExceeded, match="no known price"):
            gyro.generate(ask(1))
        assert simulator.sim.stats()["chat_requests"] == 0
        gyro.settings.set("budget.unknown_price", "allow", actor="test")
        result = gyro.generate(ask(2))
        assert result.cost is None and result.cost_unknown
    finally:
        gyro.close()


def test_two_services_on_one_file_share_the_budget(tmp_path, simulator, clock):
    """Two Gyroscope instances with their own connections (as two processes would have)."""
    first = make_gyro(tmp_path, simulator, clock)
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db")
    second = Gyroscope(cfg, provider=SimulatorProvider(simulator), clock=clock.as_clock())
    second.settings.ttl = 0
    try:
        requests = [ask(i) for i in range(200)]
        limit = sum(hold_of(r) for r in requests[:60])
        guard_ledger(tmp_path / "g.db", limit)
        first.settings.set("budget.daily_usd", limit, actor="test")
        out: list = []
        # Two services contend for one file: a reservation that cannot get it within
        # Budgets.BUSY_S is refused as busy ("try again"), before anything is held or sent.
        refusals = (BudgetExceeded, errors.StorageError)
        threads = [threading.Thread(target=lambda g=g, part=part: out.extend(
            run_concurrently(g, part, refusals))) for g, part in ((first, requests[:100]), (second, requests[100:]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 200
        answered = [r for r in out if not isinstance(r, refusals)]
        second.db.flush()
        spent, held = ledger(first)[("all", "d:2027-01-15")]
        assert spent == pytest.approx(sum(r.cost for r in answered)) and spent <= limit
        assert held == pytest.approx(0, abs=1e-12) and len(answered) < 200
    finally:
        second.close()
        first.close()


@pytest.mark.parametrize("bad, words", [
    ("[1]", "must be a JSON object"),
    ('{"gpt-4o": {"day": 1}}', "must be 'model:NAME' or 'source:NAME'"),
    ('{"model:x": {"week": 1}}', "'day' and/or 'month'"),
    ('{"model:x": {"day": 0}}', "positive number"),
    ('{"source:bacth": {"day": 1}}', "the sources are page, api, v1, batch, cli"),
])
def test_bad_limits_are_refused_and_change_nothing(gyro, bad, words):
    with pytest.raises(InvalidParameter, match=words):
        gyro.settings.set("budget.limits", bad, actor="test")
    assert gyro.settings.get("budget.limits") == ""
    with pytest.raises(InvalidParameter, match="not a time zone"):
        gyro.settings.set("budget.timezone", "Mars/Olympus", actor="test")


# -- the Metrics page's budget line and forecast --------------------------------------------------
def test_month_end_forecast_and_budget_figure():
    from core import cost_charts
    start = dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    end = dt.datetime(2027, 2, 1, tzinfo=dt.timezone.utc).timestamp()
    now = start + 10 * 86400                       # a third of January gone
    assert cost_charts.month_end_forecast(10.0, start, end, now) == pytest.approx(31.0)
    days = [{"bucket": f"2027-01-{d:02d}", "cost": 1.0} for d in range(1, 11)]
    fig = cost_charts.budget(days, 25.0, start, end, now)
    spent, forecast, limit = fig.data
    assert list(spent.y) == [float(i) for i in range(1, 11)]
    assert list(forecast.x) == ["2027-01-11", "2027-01-31"] and forecast.y[-1] == pytest.approx(31.0)
    assert list(limit.y) == [25.0, 25.0] and "monthly limit $25.00" == limit.name


def test_metrics_page_shows_the_budget_line_and_a_warning(app_env):
    from streamlit.testing.v1 import AppTest
    import core.service
    from tests.test_metrics_page import ROOT, figures
    gyro = core.service.default_service()
    gyro.settings.set_many({"budget.monthly_usd": 1e-4, "budget.warn_percent": 1}, actor="test")
    gyro.generate(ask(1, max_tokens=60))
    at = AppTest.from_file(str(ROOT / "pages" / "metrics.py"), default_timeout=30).run()
    assert not at.exception
    assert "Budget this month" in figures(at)
    assert any("monthly budget is" in w.value for w in at.warning)


def test_v1_and_api_refuse_past_the_budget_with_402_and_when_it_resets(app_env):
    """The real openai client against /v1 and a plain POST to /api/generate, on the app."""
    import openai
    from starlette.applications import Starlette
    from starlette.testclient import TestClient
    import core.service
    from core import api
    gyro = core.service.default_service()
    gyro.settings.set("budget.daily_usd", 1e-9, actor="test")
    with TestClient(Starlette(routes=api.routes())) as client:
        got = client.post("/api/generate", json={"prompt": "Hello"})
        assert got.status_code == 402 and got.json()["error"]["kind"] == "budget_exceeded"
        assert got.json()["error"]["resets_at"].endswith("+00:00") and int(got.headers["retry-after"]) >= 1
        sdk = openai.OpenAI(api_key="x", base_url="http://testserver/v1", http_client=client, max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert refused.value.status_code == 402 and "resets at" in refused.value.message
    assert [r["error_kind"] for r in gyro.db.query("SELECT error_kind FROM requests")] == [
        "budget_exceeded", "budget_exceeded"]


_WORKER = """
import asyncio, json, sys
from core.config import Config
from core.errors import BudgetExceeded, StorageError
from core.models import GenerationRequest
from core.providers.openai_provider import OpenAIProvider
from core.service import Gyroscope
url, db, tag = sys.argv[1:4]
gyro = Gyroscope(Config(provider="openai", base_url=url, db_path=db), provider=OpenAIProvider("sk-x", url))
async def one(i):
    while True:
        try:
            r = await gyro.agenerate(GenerationRequest(prompt=f"Write tagline number {i} for a bakery",
                                     model="gpt-4o-mini", max_tokens=40, cache=False, source="api"))
            return r.cost
        except BudgetExceeded:
            return None
        except StorageError as exc:     # the other process held the file: nothing was sent;
            await asyncio.sleep(exc.retry_in_s or 1.0)      # again when it says, as a client would
async def main():
    return await asyncio.gather(*(one(f"{tag}{i}") for i in range(150)))
costs = asyncio.run(main())
gyro.close()
print(json.dumps([c for c in costs if c is not None]))
"""


def test_two_processes_on_one_file_never_pass_the_limit_together(tmp_path, simulator):
    """Real processes, each with 150 concurrent requests, against one ledger."""
    import subprocess
    import sys
    db = tmp_path / "shared.db"
    setup = Gyroscope(Config(provider="openai", base_url=simulator.base_url, db_path=db),
                      provider=OpenAIProvider("sk-x", simulator.base_url))
    limit = sum(hold_of(ask(i)) for i in range(90))
    setup.settings.set_many({"prices.upstreams": json.dumps({simulator.base_url: "openai"}),
                             "budget.daily_usd": limit}, actor="test")
    setup.close()
    guard_ledger(db, limit)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, simulator.base_url, str(db), tag],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    answered = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        answered += json.loads(out.strip().splitlines()[-1])
    check = Database(db)
    day = check.query("SELECT spent, reserved FROM budget_ledger WHERE scope = 'all'")
    check.close()
    assert len(day) == 1 and day[0]["reserved"] == pytest.approx(0, abs=1e-12)
    assert day[0]["spent"] == pytest.approx(sum(answered)) and day[0]["spent"] <= limit
    assert 90 <= len(answered) < 300


def test_holds_of_a_process_that_died_are_given_back_after_their_expiry(gyro, clock):
    one = hold_of(ask())
    gyro.settings.set("budget.daily_usd", one * 1.5, actor="test")
    plan = budgets.plan_of(gyro.settings.snapshot())
    stuck = gyro.budgets.reserve(plan, "gpt-4o-mini", "api", one)     # never settled: a crash
    assert stuck is not None
    with pytest.raises(BudgetExceeded):
        gyro.generate(ask(1))
    clock.advance(budgets.Budgets.HOLD_TTL_S + 1)
    assert gyro.generate(ask(2)).outcome == "ok"
    gyro.db.flush()
    assert gyro.db.query("SELECT count(*) AS n FROM budget_holds")[0]["n"] == 0
    gyro.budgets.settle(stuck, one)    # it comes back after all: its cost counts, once
    spent, held = ledger(gyro)[("all", "d:2027-01-15")]
    assert held == pytest.approx(0, abs=1e-12) and spent > one
