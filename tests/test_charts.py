"""Metrics page pieces without Streamlit: chart builders on fixed rows, the range, the headline
figures, CSV; and the hourly rollup behind the charts against a plain Python recount of the
rows, in zones with DST and half-hour offsets. Real SQLite files in a temp dir."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import random
from collections import defaultdict
from zoneinfo import ZoneInfo

import pytest

from core import charts
from core.db import Database
from core.errors import InvalidParameter
from core.buckets import nearest_rank
from core.history import Filters, History, RequestRecord, insert_fn

DAY = [
    {"bucket": "2026-11-24", "model": "gpt-4o", "requests": 3, "cost": 0.5, "cost_saved": 0.0},
    {"bucket": "2026-11-24", "model": "gpt-4o-mini", "requests": 10, "cost": 0.25, "cost_saved": 0.1},
    {"bucket": "2026-11-25", "model": "gpt-4o-mini", "requests": 4, "cost": 0.125, "cost_saved": 0.0},
    {"bucket": "2026-11-26", "model": "gpt-4o", "requests": 1, "cost": 2.0, "cost_saved": 0.0},
]


def _series_row(bucket, requests, **kw):
    row = dict(bucket=bucket, model="all", requests=requests, ok=requests, errors=0, cancelled=0,
               cached=0, prompt_tokens=0, completion_tokens=0, cost=0.0, cost_saved=0.0,
               optimizer_tokens_saved=0, retries=0, retry_wait_s=0.0, latency_p50_ms=None,
               latency_p95_ms=None, ttft_p50_ms=None, hit_rate=0.0)
    row.update(kw)
    return row


# -- figures ---------------------------------------------------------------------------------
def test_cost_bars_stack_one_trace_per_model_and_add_up_to_the_rows():
    fig = charts.cost_by_model(DAY)
    assert fig.layout.barmode == "stack"
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"gpt-4o", "gpt-4o-mini"} and all(t.type == "bar" for t in fig.data)
    for model, trace in traces.items():
        assert sum(trace.y) == sum(r["cost"] for r in DAY if r["model"] == model)
    per_day = defaultdict(float)
    for trace in fig.data:
        for x, y in zip(trace.x, trace.y):
            per_day[x] += y
    assert dict(per_day) == {"2026-11-24": 0.75, "2026-11-25": 0.125, "2026-11-26": 2.0}


def test_requests_and_errors_stack_errors_by_kind_under_the_requests_line():
    series = [_series_row("2026-11-24 10:00", 50), _series_row("2026-11-24 11:00", 70)]
    errors = [{"bucket": "2026-11-24 10:00", "kind": "rate_limited", "n": 3},
              {"bucket": "2026-11-24 10:00", "kind": "timeout", "n": 1},
              {"bucket": "2026-11-24 11:00", "kind": "rate_limited", "n": 2}]
    fig = charts.requests_and_errors(series, errors)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["Requests"].y) == [50, 70]
    # Plain names, and errors on their own axis (a few beside hundreds of requests).
    assert list(by_name["Rate limited"].y) == [3, 2] and list(by_name["Timed out"].y) == [1]
    assert {t.yaxis for t in fig.data if t.type == "bar"} == {"y2"} and by_name["Requests"].yaxis in (None, "y")
    assert sum(sum(t.y) for t in fig.data if t.type == "bar") == 6
    # Tidy axes: four round steps from 0 on both sides, so their grid lines meet.
    assert (fig.layout.yaxis.dtick, list(fig.layout.yaxis.range)) == (20, [0, 80])
    assert (fig.layout.yaxis2.dtick, list(fig.layout.yaxis2.range)) == (1, [0, 4])
    assert fig.layout.legend.y < 0       # the legend sits below the plot, off the dates


def test_latency_cache_and_retry_figures_carry_the_series_values():
    series = [_series_row("2026-11-24", 10, latency_p50_ms=800.0, latency_p95_ms=2400.0, ttft_p50_ms=150.0,
                          cost_saved=0.25, hit_rate=0.2, retries=4, retry_wait_s=6.5),
              _series_row("2026-11-25", 0)]
    lat = {t.name: list(t.y) for t in charts.latency(series).data}
    assert lat == {"p50 latency": [800.0, None], "p95 latency": [2400.0, None],
                   "p50 time to first token": [150.0, None]}
    cache = {t.name: t for t in charts.cache(series).data}
    assert list(cache["saved by the cache"].y) == [0.25, 0.0] and cache["hit rate"].yaxis == "y2"
    retry = {t.name: list(t.y) for t in charts.retries(series).data}
    assert retry == {"retries": [4, 0], "total retry wait": [6.5, 0.0]}


def test_empty_rows_give_a_figure_that_says_so():
    for fig in (charts.cost_by_model([]), charts.latency([]), charts.breaker_timeline([], 0, 10, {})):
        assert fig.layout.annotations[0].text == "No data in this range"


def test_breaker_timeline_marks_each_transition_with_its_cause():
    t0 = dt.datetime(2026, 11, 24, 12, tzinfo=dt.timezone.utc).timestamp()
    name = "simulator|gpt-4o-mini"
    events = [
        {"ts": t0 + 60, "subject": name, "old": "closed", "new": "open",
         "cause": "5 consecutive failures (last: server_error)"},
        {"ts": t0 + 120, "subject": name, "old": "open", "new": "half-open", "cause": "reset timeout elapsed; probing"},
        {"ts": t0 + 125, "subject": name, "old": "half-open", "new": "closed", "cause": "1 successful probe(s)"},
    ]
    fig = charts.breaker_timeline(events, t0, t0 + 3600, {name: "closed", "other|gpt-4o": "open"},
                                  tz="Pacific/Kiritimati")
    [marks] = [t for t in fig.data if t.name == "transitions"]
    assert len(marks.x) == 3
    for event, text in zip(events, marks.hovertext):
        assert event["cause"] in text and f"{event['old']} → {event['new']}" in text
    assert "2026-11-25 02:01:00" in marks.hovertext[0]      # local time in UTC+14
    bands = {t.name: t for t in fig.data if t.mode == "lines"}
    assert set(bands) == {"closed", "open", "half-open"}
    # A breaker without transitions in the range is drawn in its state now, across the range.
    assert "other|gpt-4o" in list(bands["open"].y)


# -- range, headline, filters, files ---------------------------------------------------------
def test_resolve_range_units_and_local_days():
    now = 1_800_000_000
    assert charts.resolve_range("Last 24 h", "UTC", now) == (now - 86400, now, "hour")
    assert charts.resolve_range("Last 7 days", "UTC", now)[2] == "day"
    zone = ZoneInfo("Pacific/Kiritimati")
    start, end, unit = charts.resolve_range("Custom dates", zone.key, now, dt.date(2026, 11, 24),
                                            dt.date(2026, 11, 25))
    assert dt.datetime.fromtimestamp(start, zone) == dt.datetime(2026, 11, 24, tzinfo=zone)
    assert dt.datetime.fromtimestamp(end, zone) == dt.datetime(2026, 11, 26, tzinfo=zone)
    assert unit == "hour"                      # two whole days: 48 h, hourly
    assert charts.resolve_range("Custom dates", "UTC", now, dt.date(2026, 11, 1), dt.date(2026, 11, 3))[2] == "day"
    with pytest.raises(InvalidParameter, match="before the start"):
        charts.resolve_range("Custom dates", "UTC", now, dt.date(2026, 11, 5), dt.date(2026, 11, 4))


def test_headline_formats_every_figure():
    t = dict(total_requests=12345, success_rate=0.9234, total_cost=12.34567, unknown_cost_requests=2,
             cost_saved=1.5, optimizer_tokens_saved=4321, optimizer_cost_saved=0.01, cache_hit_rate=0.25,
             average_cost=0.00123456, latency_p95_ms=2345.6, retries_per_request=0.0812, retries=1002,
             retry_wait_s=1234.5)
    shown = {label: value for label, value, _ in charts.headline(t)}
    assert shown == {"Requests": "12,345", "Success rate": "92.3%", "Total cost": "$12.35",
                     "Saved by the cache": "$1.50", "Tokens saved by the optimizer": "4,321",
                     "Cache hit rate": "25.0%", "Cost per answered request": "$0.001235",
                     "p95 latency": "2,346 ms", "Retries per request": "0.081"}
    assert {label: value for label, value, _ in charts.headline({**t, "latency_p95_ms": None})}["p95 latency"] == "—"


def test_breakers_are_filtered_by_model_and_named_by_upstream():
    infos = [{"name": "simulator|gpt-4o", "state": "open", "retry_in_s": 12.4},
             {"name": "simulator|gpt-4o-mini", "state": "closed", "retry_in_s": 0.0}]
    assert charts.breaker_states(charts.for_models(infos, ["gpt-4o"])) == [
        ("simulator · gpt-4o", "open (12 s to probe)")]
    assert len(charts.for_models(infos, [])) == 2


def test_csv_text_has_a_header_and_one_line_per_row():
    text = charts.csv_text(charts.daily_table(DAY), charts.DAILY_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and rows[0] == {"day": "2026-11-24", "model": "gpt-4o", "requests": "3",
                                          "cost": "0.5", "cost_saved": "0.0"}
    assert charts.csv_text([], charts.DAILY_COLUMNS).strip() == "day,model,requests,cost,cost_saved"
    # Upstream text never becomes a spreadsheet formula; numbers stay numbers.
    [row] = csv.DictReader(io.StringIO(charts.csv_text([{"error_message": "=HYPERLINK(1)", "cost": -0.5}])))
    assert row == {"error_message": "'=HYPERLINK(1)", "cost": "-0.5"}


# -- the rollup behind the charts equals a recount of the rows --------------------------------
@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "charts.db")
    yield database
    database.close()


def _random_records(n: int, start: float, end: float, seed: int = 7) -> list[RequestRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        outcome = rng.choices(["ok", "error", "circuit_open", "cancelled", "rejected"], [70, 12, 5, 8, 5])[0]
        cached = outcome == "ok" and rng.random() < 0.2
        out.append(RequestRecord(
            ts=rng.uniform(start, end), request_id=f"r{i}", model=rng.choice(["a", "b", "c"]),
            source=rng.choice(["page", "api"]), outcome=outcome,
            error_kind=rng.choice(["timeout", "server_error", None]) if outcome == "error" else None,
            attempts=rng.randint(0, 3), retry_wait_s=rng.choice([0.0, 1.5, 2.25]),
            latency_ms=None if rng.random() < 0.05 else rng.lognormvariate(6, 1),
            ttft_ms=None if rng.random() < 0.3 else rng.lognormvariate(4, 1),
            prompt_tokens=rng.randint(1, 500), completion_tokens=rng.choice([None, rng.randint(1, 500)]),
            cost=None if rng.random() < 0.1 else rng.random() / 100, from_cache=cached,
            cost_saved=rng.random() / 100 if cached else 0.0, optimizer_tokens_saved=rng.randint(0, 5)))
    return out


def _label(ts: float, tz: str, unit: str) -> str:
    local = dt.datetime.fromtimestamp(ts, ZoneInfo(tz))
    return local.date().isoformat() if unit == "day" else local.strftime("%Y-%m-%d %H:00")


def _recount(records, f: Filters, unit: str) -> dict:
    """Plain Python over the records: what each bucket and model must show."""
    out = defaultdict(lambda: defaultdict(list))
    for r in records:
        if not (f.start <= r.ts < f.end) or (f.models and r.model not in f.models) or \
                (f.sources and r.source not in f.sources):
            continue
        g = out[(_label(r.ts, f.tz, unit), r.model)]
        g["requests"].append(1)
        g["errors"].append(r.outcome in ("error", "circuit_open"))
        g["cost"].append(r.cost or 0.0)
        g["retries"].append(max(r.attempts - 1, 0))
        if r.outcome == "ok" and not r.from_cache:
            if r.latency_ms is not None:
                g["latency"].append(r.latency_ms)
            if r.ttft_ms is not None:
                g["ttft"].append(r.ttft_ms)
        if r.outcome in ("error", "circuit_open"):
            g["kind:" + (r.error_kind or r.outcome)].append(1)
    return out


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"])
def test_rollup_sums_and_exact_percentiles_equal_a_recount(db, tz):
    # Around the 2026-11-01 New York and 2026-10-04 Lord Howe (30-minute) DST changes.
    start = dt.datetime(2026, 9, 28, 7, 13, 5, tzinfo=dt.timezone.utc).timestamp()
    end = start + 40 * 86400 + 1234.5
    records = _random_records(3000, start - 86400, end + 86400)
    db.write(lambda conn: [insert_fn(r)(conn) for r in records])
    history = History(db)
    fall_back = dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=-4))).timestamp()
    for f, unit in ((Filters(start, end, tz=tz), "day"), (Filters(start, start + 47 * 3600, tz=tz), "hour"),
                    (Filters(fall_back - 20 * 3600, fall_back + 20 * 3600, tz=tz), "hour"),
                    (Filters(start, end, models=("a", "c"), sources=("api",), tz=tz), "day")):
        want = _recount(records, f, unit)
        got = {(r["bucket"], r["model"]): r for r in history.series(f, unit, by_model=True)}
        assert set(got) == set(want)
        for key, g in want.items():
            row = got[key]
            assert row["requests"] == len(g["requests"]) and row["errors"] == sum(g["errors"])
            assert row["retries"] == sum(g["retries"])
            assert math.isclose(row["cost"], math.fsum(g["cost"]), rel_tol=1e-12, abs_tol=1e-15)
            lat = sorted(g["latency"])
            assert (row["latency_p50_ms"], row["latency_p95_ms"]) == (nearest_rank(lat, 50), nearest_rank(lat, 95))
            assert row["ttft_p50_ms"] == nearest_rank(sorted(g["ttft"]), 50)
        kinds = {(r["bucket"], r["kind"]): r["n"] for r in history.errors_by_kind(f, unit)}
        want_kinds = defaultdict(int)
        for (bucket, _), g in want.items():
            for name, values in g.items():
                if name.startswith("kind:"):
                    want_kinds[(bucket, name[5:])] += len(values)
        assert kinds == dict(want_kinds)
        totals = history.totals(f)
        all_lat = sorted(v for g in want.values() for v in g["latency"])
        assert totals["total_requests"] == sum(len(g["requests"]) for g in want.values())
        assert totals["latency_p95_ms"] == nearest_rank(all_lat, 95)
        assert totals["latency_p50_ms"] == nearest_rank(all_lat, 50)


def test_rollup_follows_deletes_and_updates(db):
    history = History(db)
    t = dt.datetime(2026, 11, 24, 10, tzinfo=dt.timezone.utc).timestamp()
    for i in range(4):
        history.record(RequestRecord(ts=t + i * 60, request_id=f"r{i}", model="m", cost=1.0,
                                     outcome="error" if i == 3 else "ok", error_kind="timeout"))
    db.write(lambda conn: conn.execute("DELETE FROM requests WHERE request_id IN ('r0', 'r3')"))
    db.write(lambda conn: conn.execute("UPDATE requests SET cost = 5.0, model = 'n' WHERE request_id = 'r1'"))
    f = Filters(t - 7200, t + 7200)
    assert {(r["model"], r["cost"]) for r in history.daily_cost_by_model(f)} == {("m", 1.0), ("n", 5.0)}
    assert history.errors_by_kind(f) == []
    assert history.distinct("model") == ["m", "n"]


def test_rows_export_is_newest_first_and_capped(db):
    history = History(db)
    t = dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc).timestamp()
    db.write(lambda conn: [insert_fn(RequestRecord(ts=t + i, request_id=f"r{i}", cost=0.001))(conn)
                           for i in range(50)])
    text = charts.csv_text(history.rows(Filters(t, t + 3600), limit=20))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 20 and rows[0]["request_id"] == "r49" and rows[-1]["request_id"] == "r30"
    assert {"ts", "model", "outcome", "cost", "latency_ms"} <= set(rows[0])


def test_nice_steps_are_round():
    assert [charts.nice_step(v) for v in (37, 0.0123, 1, 950, 0)] == [10, 0.005, 0.25, 250, 1.0]


def test_a_model_that_never_cost_anything_is_not_in_the_cost_chart():
    rows = DAY + [{"bucket": "2026-11-25", "model": "gpt-nope", "requests": 40, "cost": None, "cost_saved": 0.0}]
    assert {t.name for t in charts.cost_by_model(rows).data} == {"gpt-4o", "gpt-4o-mini"}


def test_partial_first_and_last_buckets_are_found_and_shaded():
    tz = "Europe/Berlin"
    start = dt.datetime(2026, 11, 20, 14, 5, tzinfo=ZoneInfo(tz)).timestamp()
    end = dt.datetime(2026, 11, 27, 14, 5, tzinfo=ZoneInfo(tz)).timestamp()
    assert set(charts.partial_buckets(start, end, "day", tz)) == {"2026-11-20", "2026-11-27"}
    whole = dt.datetime(2026, 11, 21, tzinfo=ZoneInfo(tz)).timestamp()
    assert charts.partial_buckets(whole, whole + 3 * 86400, "day", tz) == {}
    fig = charts.mark_partial(charts.cost_by_model(DAY), charts.partial_buckets(start, end, "day", tz), "day")
    assert len(fig.layout.shapes) == 2 and {a.text for a in fig.layout.annotations} == {"partial"}


def test_csv_export_has_local_iso_times_and_money_without_float_noise():
    row = {"ts": dt.datetime(2026, 11, 24, 10, 30, tzinfo=dt.timezone.utc).timestamp(), "model": "m",
           "cost": 0.05407120000000001, "cost_saved": 6e-05, "optimizer_cost_saved": 0.0}
    [out] = charts.export_rows([row], "Pacific/Kiritimati")
    assert out["ts"] == "2026-11-25T00:30:00.000+14:00"
    assert (out["cost"], out["cost_saved"], out["optimizer_cost_saved"]) == ("0.054071", "0.000060", "0.000000")
    text = charts.csv_text(charts.export_rows([row], "UTC"))
    assert "2026-11-24T10:30:00.000+00:00" in text and "e-05" not in text and "0000000001" not in text
    daily = charts.daily_table([{"bucket": "2026-11-24", "model": "m", "requests": 2, "cost": 0.1 + 0.2,
                                 "cost_saved": None}])
    assert daily[0]["cost"] == 0.3 and daily[0]["cost_saved"] == 0.0
    assert "2026-11-24,m,2,0.300000,0.000000" in charts.csv_text(charts.daily_csv_rows(daily), charts.DAILY_COLUMNS)
