"""The Metrics page under AppTest, on a real SQLite file: empty state, demo history, filters,
the same totals as `python -m core stats --json`, bad ranges, and days in the viewer's zone."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import core.service
from core import charts
from core.demo import fill_history
from core.history import Filters, RequestRecord

ROOT = Path(__file__).resolve().parents[1]
# Demo history ends "now", so tests pick whole past days from a fixed end instead.
END = dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture
def page(app_env):
    """(AppTest of pages/metrics.py, its Gyroscope) on a fresh database file."""
    gyro = core.service.default_service()
    at = AppTest.from_file(str(ROOT / "pages" / "metrics.py"), default_timeout=30)
    yield at, gyro
    assert len(at.exception) == 0


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [c.value for c in at.code]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def shown(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def custom(at, first: dt.date, last: dt.date, tz: str | None = None) -> AppTest:
    if tz:
        at.selectbox(key="metrics_tz").set_value(tz)
    at.radio(key="metrics_range").set_value("Custom dates").run()
    at.date_input(key="metrics_from").set_value(first)
    at.date_input(key="metrics_to").set_value(last)
    return at.run()


def charts_tabs():
    return ("Cost", "Requests and errors", "Speed", "Cache", "Retries and breakers")


def figures(at, tabs=("Cost",)) -> dict[str, dict]:
    """The figures of the chart tabs (lazy: only the open one draws), opened one by one."""
    out = {}
    at.session_state["metrics_charts_on"] = True     # what the page does once the browser drew its first pass
    for tab in tabs:
        at.session_state["metrics_tab"] = tab     # what a click on the tab does
        at.run()
        out.update({json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
                    for c in at.get("plotly_chart")})
    return out


def test_empty_database_says_how_to_get_data(page):
    at, _ = page
    at.run()
    assert len(at.exception) == 0
    assert "No requests recorded yet" in texts(at) and "Generate" in texts(at)
    assert at.button(key="load_demo").label == "Load demo history"
    assert not at.metric and not at.get("plotly_chart")


def test_demo_button_fills_history_and_the_page_shows_figures_and_charts(page):
    at, gyro = page
    at.run()
    at.button(key="load_demo").click().run()
    assert len(at.exception) == 0
    assert gyro.history.totals()["total_requests"] == 5000
    figs = shown(at)
    assert int(figs["Requests"].replace(",", "")) > 0 and figs["p95 latency"].endswith(" ms")
    assert set(figures(at, charts_tabs())) == {"Cost per day by model", "Requests and errors",
                                "Latency (answers from the AI service)", "Cache", "Retries",
                                "Circuit breakers", "Provider prompt cache"}
    assert at.download_button(key="export_daily").label == "Daily table (CSV)"
    assert at.download_button(key="export_rows").label.startswith("Requests (CSV, newest ")


def test_the_first_pass_draws_numbers_and_filters_and_the_charts_and_exports_come_next(page):
    """No chart in a tab's first pass (Plotly's browser bundle would hold the page back), nor
    the exports below them; the pass that the browser asks for once it has drawn the first
    (its script presses a hidden button) draws them, over the same figures."""
    at, gyro = page
    fill_history(gyro.db, rows=2000, days=10)
    at.run()
    first = shown(at)
    assert len(first) == 9 and not at.get("plotly_chart")
    assert "Drawing the charts…" in texts(at)
    [script] = [h.proto.body for h in at.get("html") if "<script>" in h.proto.body]
    assert ".st-key-metrics_drawn button" in script and "click()" in script
    assert at.button(key="metrics_drawn")                   # what the script presses
    assert at.radio(key="metrics_range").value == "Last 7 days"
    assert not at.get("download_button") and "show_daily" not in [t.key for t in at.toggle]
    assert at.session_state["metrics_memo"]["data"]["totals"]["total_requests"] == \
        int(first["Requests"].replace(",", ""))
    fill_history(gyro.db, rows=50, days=1, seed=9)         # new rows between the two passes
    at.button(key="metrics_drawn").click().run()           # the browser has drawn the first pass
    assert shown(at) == first                              # the same range and figures
    assert not [h for h in at.get("html") if "<script>" in h.proto.body]
    assert not [b for b in at.button if b.key == "metrics_drawn"]
    assert [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")] == \
        ["Cost per day by model"]
    assert at.download_button(key="export_rows") and at.download_button(key="export_daily")
    assert "Drawing the charts…" not in texts(at)
    at.run()                                               # any later run reads afresh
    assert int(shown(at)["Requests"].replace(",", "")) > int(first["Requests"].replace(",", ""))
    assert len(at.get("plotly_chart")) == 1


def test_budget_words_come_in_the_first_pass_and_its_line_with_the_charts(page):
    at, gyro = page
    from core.models import GenerationRequest
    gyro.settings.set_many({"budget.monthly_usd": 1e-4, "budget.warn_percent": 1}, actor="test")
    gyro.generate(GenerationRequest(prompt="A tagline for a bakery", model="gpt-4o-mini", max_tokens=60,
                                    cache=False, source="api"))
    at.run()
    assert any("Monthly budget: **" in c.value and " left of $0.00" in c.value for c in at.caption)
    assert any("monthly budget is" in w.value for w in at.warning)
    assert not at.get("plotly_chart")                           # no chart yet, the words already
    assert set(figures(at)) == {"Budget this month", "Cost per day by model"}
    assert any("monthly budget is" in w.value for w in at.warning)


def test_filters_change_the_figures(page):
    at, gyro = page
    fill_history(gyro.db, rows=3000, days=30)
    at.run()
    week = shown(at)["Requests"]
    at.radio(key="metrics_range").set_value("Last 30 days").run()
    month = shown(at)["Requests"]
    at.multiselect(key="metrics_models").set_value(["gpt-4o"]).run()
    one_model = shown(at)["Requests"]
    at.multiselect(key="metrics_sources").set_value(["cli"]).run()
    narrower = shown(at)["Requests"]
    counts = [int(v.replace(",", "")) for v in (week, month, one_model, narrower)]
    assert counts[1] > counts[0] and counts[1] > counts[2] > counts[3] > 0
    assert counts[2] == gyro.history.totals(
        Filters(models=("gpt-4o",)))["total_requests"]
    cost = figures(at)["Cost per day by model"]
    assert {t["name"] for t in cost["data"]} == {"gpt-4o"}
    assert len(at.exception) == 0


def test_headline_equals_the_cli_for_the_same_range(page):
    at, gyro = page
    fill_history(gyro.db, rows=4000, days=20, end=END, seed=3)
    at.context = {"timezone": "Europe/Berlin"}
    at.run()
    custom(at, dt.date(2026, 11, 15), dt.date(2026, 11, 22))
    at.session_state["metrics_details"] = True       # a click on "Technical details"
    at.run()
    since, until = re.search(r"--since (\S+) --until (\S+)$", texts(at), re.M).groups()
    assert since == "2026-11-15T00:00:00+01:00" and until == "2026-11-23T00:00:00+01:00"
    out = subprocess.run([sys.executable, "-m", "core", "stats", "--json", "--since", since, "--until", until],
                         env={**os.environ, "GYROSCOPE_DB": str(gyro.db.path)}, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    cli = json.loads(out.stdout)
    assert cli["total_requests"] > 1000
    assert shown(at) == {label: value for label, value, _ in charts.headline(cli)}
    assert len(at.exception) == 0


def test_end_before_start_and_an_empty_range_get_a_message_not_an_exception(page):
    at, gyro = page
    fill_history(gyro.db, rows=500, days=5, end=END)
    at.run()
    custom(at, dt.date(2026, 11, 20), dt.date(2026, 11, 10))
    assert len(at.exception) == 0
    assert any("before the start date" in w.value for w in at.warning)
    custom(at, dt.date(2025, 1, 1), dt.date(2025, 1, 31))
    assert len(at.exception) == 0
    assert "No requests in this range" in texts(at) and not at.metric


def test_daily_table_follows_the_viewers_zone_far_from_utc(page):
    at, gyro = page
    # 10:30 UTC on Nov 24 is 00:30 Nov 25 in Kiritimati (UTC+14); 09:30 UTC is still Nov 24 there.
    for i, (hour, cost) in enumerate(((9, 2.0), (10, 1.0))):
        ts = dt.datetime(2026, 11, 24, hour, 30, tzinfo=dt.timezone.utc).timestamp()
        gyro.history.record(RequestRecord(ts=ts, request_id=f"k{i}", model="gpt-4o-mini", cost=cost))
    at.context = {"timezone": "Pacific/Kiritimati"}
    at.run()
    assert at.selectbox(key="metrics_tz").value == "Pacific/Kiritimati"   # the browser's zone by default
    at.session_state["metrics_charts_on"] = True          # the table comes with the charts
    custom(at, dt.date(2026, 11, 20), dt.date(2026, 11, 27))
    at.toggle(key="show_daily").set_value(True).run()
    table = at.dataframe[0].value
    assert dict(zip(table["day"], table["cost"])) == {"2026-11-24": 2.0, "2026-11-25": 1.0}
    cost = figures(at)["Cost per day by model"]["data"][0]
    assert dict(zip(cost["x"], cost["y"])) == {"2026-11-24": 2.0, "2026-11-25": 1.0}
    custom(at, dt.date(2026, 11, 20), dt.date(2026, 11, 27), tz="UTC")
    table = at.dataframe[0].value
    assert dict(zip(table["day"], table["cost"])) == {"2026-11-24": 3.0}
    assert len(at.exception) == 0


def test_breaker_states_and_transitions_with_their_cause(page):
    at, gyro = page
    fill_history(gyro.db, rows=300, days=2, end=END)
    breaker = gyro.breakers.get("simulator", "gpt-4o")
    t = dt.datetime(2026, 11, 27, 12, tzinfo=dt.timezone.utc).timestamp()
    gyro.history.event("breaker", breaker.name, "closed", "open", "5 consecutive failures (last: server_error)", ts=t)
    gyro.history.event("breaker", breaker.name, "open", "half-open", "reset timeout elapsed; probing", ts=t + 30)
    gyro.db.flush()
    at.run()
    custom(at, dt.date(2026, 11, 26), dt.date(2026, 11, 27), tz="UTC")
    assert "simulator · gpt-4o :green-badge[closed]" in texts(at)
    [marks] = [t for t in figures(at, ["Retries and breakers"])["Circuit breakers"]["data"]
               if t["name"] == "transitions"]
    assert "5 consecutive failures (last: server_error)" in marks["hovertext"][0]
    assert "open → half-open" in marks["hovertext"][1]
    at.toggle(key="metrics_live").set_value(True).run()     # the auto-refreshing fragment renders too
    assert len(at.exception) == 0 and "simulator · gpt-4o" in texts(at)


def test_rows_the_database_refused_are_announced(page):
    at, gyro = page
    gyro.history.add(RequestRecord(ts=END - 3600, request_id="twice", model="gpt-4o-mini"))
    gyro.history.add(RequestRecord(ts=END - 3600, request_id="twice", model="gpt-4o-mini"))
    gyro.db.flush()
    at.run()
    assert "1 request(s) since the app started could not be saved" in texts(at)
    assert "UNIQUE constraint failed" in texts(at)


def test_demo_data_is_consistent_breaker_events_match_circuit_open_rows(page):
    _, gyro = page
    fill_history(gyro.db, rows=20_000, days=30, end=END)
    gyro.db.flush()
    events = gyro.history.events("breaker", limit=10_000)
    open_at: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e["new"] == "open":
            open_at.setdefault(e["subject"], []).append((e["ts"], None))
        elif e["old"] == "open":
            opened, _ = open_at[e["subject"]][-1]
            open_at[e["subject"]][-1] = (opened, e["ts"])
    assert open_at, "the demo has outages"
    refused = gyro.db.query("SELECT ts, upstream, model FROM requests WHERE outcome = 'circuit_open'")
    assert refused
    for r in refused:     # every refusal falls while its breaker was open...
        spans = open_at.get(f"{r['upstream']}|{r['model']}", [])
        assert any(a <= r["ts"] < b for a, b in spans), r
    for name, spans in open_at.items():   # ...and every time it opened, it refused something
        for a, b in spans:
            assert any(a <= r["ts"] < b and f"{r['upstream']}|{r['model']}" == name for r in refused)
    fill_history(gyro.db, rows=20_000, days=30, end=END)   # the same again adds nothing
    gyro.db.flush()
    assert len(gyro.history.events("breaker", limit=10_000)) == len(events)


def test_a_mistyped_model_stays_out_of_cost_charts_and_old_breakers_out_of_the_list(page):
    at, gyro = page
    fill_history(gyro.db, rows=500, days=3, end=END)
    old = END - 20 * 86400     # a 404 model tried once, weeks ago, and one tried in range
    for i, ts in enumerate((old, END - 86400)):
        gyro.history.record(RequestRecord(ts=ts, request_id=f"nope{i}", upstream="simulator",
                                          model=f"gpt-nope{i}", outcome="error", error_kind="model_not_found",
                                          http_status=404))
        gyro.breakers.get("simulator", f"gpt-nope{i}")
    gyro.db.flush()
    at.run()
    custom(at, dt.date(2026, 11, 24), dt.date(2026, 11, 27), tz="UTC")
    said = texts(at)
    assert "simulator · gpt-nope1" in said and "gpt-nope0" not in said    # seen in range only
    traces = {t["name"] for t in figures(at)["Cost per day by model"]["data"] if t.get("type") == "bar"}
    assert traces and not any(name.startswith("gpt-nope") for name in traces)
    errors = figures(at, ["Requests and errors"])["Requests and errors"]
    assert "Unknown model" in {t["name"] for t in errors["data"]}
    assert not any(t["name"].startswith("error:") for t in errors["data"])


def test_technical_details_are_folded_away_and_the_range_is_in_words(page):
    at, gyro = page
    fill_history(gyro.db, rows=300, days=3, end=END)
    at.run()
    custom(at, dt.date(2026, 11, 25), dt.date(2026, 11, 27), tz="UTC")
    [details] = [e for e in at.expander if e.label == "Technical details"]
    assert not details.markdown and not details.code    # folded: drawn only when opened
    at.session_state["metrics_details"] = True          # a click on it
    at.run()
    outside = [c.value for c in at.caption] + [m.value for m in at.markdown]
    [details] = [e for e in at.expander if e.label == "Technical details"]
    inside = [m.value for m in details.markdown] + [c.value for c in details.code]
    assert not any("python -m core" in t or "T00:00:00" in t for t in outside if t not in inside)
    assert any("python -m core stats" in t for t in inside)
    assert any("Wed 25 Nov 2026, 00:00 to Sat 28 Nov 2026, 00:00 (UTC), by day." in t for t in outside)
