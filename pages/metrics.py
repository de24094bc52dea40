"""Metrics: cost, reliability and speed from the request history, for a range, models,
sources and a time zone. The numbers are History's (the same as `python -m core stats`)."""

from __future__ import annotations

import datetime as dt
import math
import time
import zoneinfo

import streamlit as st
from streamlit.errors import StreamlitAPIException

from core import budgets, charts, cost_charts
from core.demo import fill_history
from core.errors import GyroscopeError
from core.history import Filters
from core.ui import get_gyro, provider_badge, show_error

DEMO_ROWS, DEMO_DAYS = 5_000, 30
REFRESH_S = 5

st.title("Metrics")
try:
    gyro = get_gyro()
except GyroscopeError as exc:
    show_error(exc)
    st.stop()
provider_badge(gyro)
if gyro.history.lost_rows:
    st.warning(f"{gyro.history.lost_rows:,} request(s) since the app started could not be saved to "
               f"the history, so these figures leave them out. Last problem: {gyro.history.last_loss}",
               icon=":material/warning:")


def browser_zone() -> str:
    """The browser's time zone when it sent a known one, else UTC."""
    zone = st.context.timezone
    return zone if zone in zoneinfo.available_timezones() else "UTC"


def empty_state() -> None:
    st.info("No requests recorded yet. Generate some on the **Generate** page (or with "
            "`python -m core generate`), run `python -m core demo-history`, or load "
            f"{DEMO_ROWS:,} synthetic requests spread over the last {DEMO_DAYS} days here.",
            icon=":material/monitoring:")
    try:
        st.page_link("pages/generate.py", label="Go to Generate", icon=":material/edit_note:")
    except StreamlitAPIException:
        pass   # the page runs on its own (tests), without the app's navigation
    if st.button("Load demo history", key="load_demo", icon=":material/dataset:"):
        try:
            with st.spinner("Writing synthetic history…"):
                fill_history(gyro.db, rows=DEMO_ROWS, days=DEMO_DAYS)
        except GyroscopeError as exc:
            show_error(exc)
            return
        st.rerun()


try:
    models, sources = gyro.history.distinct("model"), gyro.history.distinct("source")
except GyroscopeError as exc:
    show_error(exc)
    st.stop()
if not models and not sources:
    empty_state()
    st.stop()

zones = sorted(zoneinfo.available_timezones())
c1, c2, c3 = st.columns([3, 2, 2])
choice = c1.radio("Range", list(charts.RANGES), index=1, horizontal=True, key="metrics_range")
tz = c2.selectbox("Time zone (days are days here)", zones, index=zones.index(browser_zone()),
                  key="metrics_tz")
live = c3.toggle(f"Auto-refresh every {REFRESH_S} s", key="metrics_live",
                 help="Re-reads the history while you watch live load.")
first = last = None
if choice == "Custom dates":
    today = dt.datetime.now(zoneinfo.ZoneInfo(tz)).date()
    d1, d2 = st.columns(2)
    first = d1.date_input("From (first day)", today - dt.timedelta(days=6), key="metrics_from")
    last = d2.date_input("To (last day, included)", today, key="metrics_to")
c4, c5 = st.columns(2)
picked_models = c4.multiselect("Models", models, key="metrics_models", placeholder="All models")
picked_sources = c5.multiselect("Sources", sources, key="metrics_sources", placeholder="All sources")


def show_range(start: float, end: float, unit: str) -> None:
    zone = zoneinfo.ZoneInfo(tz)
    since = dt.datetime.fromtimestamp(start, zone).isoformat()
    until = dt.datetime.fromtimestamp(end, zone).isoformat()
    st.caption(f"From **{since}** to **{until}** ({tz}), {'hourly' if unit == 'hour' else 'daily'} "
               f"buckets. The same totals: `python -m core stats --json --since {since} --until {until}`")


def show_headline(totals: dict, infos: list[dict]) -> None:
    figures = charts.headline(totals)
    for row in (figures[:5], figures[5:]):
        for col, (label, value, help_text) in zip(st.columns(5), row):
            col.metric(label, value, help=help_text)
    states = charts.breaker_states(infos)
    if states:
        st.markdown("**Circuit breakers now**")
        for i in range(0, len(states), 4):
            for col, (name, state) in zip(st.columns(4), states[i:i + 4]):
                col.metric(name, state)
    else:
        st.caption("No circuit breaker has been used yet.")


def show_charts(data: dict, filters: Filters, infos: list[dict]) -> None:
    series = data["series"]
    left, right = st.columns(2)
    left.plotly_chart(charts.cost_by_model(data["daily_cost_by_model"]), key="chart_cost")
    right.plotly_chart(charts.requests_and_errors(series, data["errors_by_kind"]), key="chart_requests")
    left.plotly_chart(charts.latency(series), key="chart_latency")
    right.plotly_chart(charts.cache(series), key="chart_cache")
    left.plotly_chart(charts.retries(series), key="chart_retries")
    events = charts.for_models(data["events"], filters.models, key="subject")
    now = {i["name"]: i["state"] for i in infos}
    right.plotly_chart(charts.breaker_timeline(events, filters.start, min(filters.end, time.time()),
                                               now, filters.tz), key="chart_breakers")
    left.plotly_chart(cost_charts.prompt_cache(series), key="chart_prompt_cache")


def show_budget(now: float) -> None:
    plan = budgets.plan_of(gyro.settings.snapshot())
    if not plan.limits:
        return
    status = gyro.budgets.status(plan, now)
    st.caption(" · ".join(f"{b['name'].capitalize()}: **{charts.money(b['left_usd'], 2)}** left of "
                          f"{charts.money(b['limit_usd'], 2)}" for b in status))
    for line in cost_charts.budget_warnings(status):
        st.warning(line, icon=":material/savings:")
    monthly = next((s["limit_usd"] for s in status if s["scope"] == "all" and s["period"] == "month"), None)
    days, start, end = cost_charts.budget_rows(gyro.history, plan, now)
    st.plotly_chart(cost_charts.budget(days, monthly, start, end, now, plan.tz), key="chart_budget")


def show_exports(data: dict, filters: Filters) -> None:
    daily = charts.daily_table(data["daily_cost_by_model"])
    zone = zoneinfo.ZoneInfo(tz)
    days = "-".join(dt.datetime.fromtimestamp(t, zone).strftime("%Y%m%d")
                    for t in (filters.start, filters.end - 1))   # the end is exclusive
    total = data["totals"]["total_requests"]
    with st.expander("Daily table", expanded=False):
        st.dataframe(daily, hide_index=True, key="daily_table")
    c1, c2 = st.columns(2)
    c1.download_button("Daily table (CSV)", charts.csv_text(daily, charts.DAILY_COLUMNS),
                       file_name=f"gyroscope-daily-{days}.csv", mime="text/csv", key="export_daily",
                       icon=":material/download:")

    def rows_csv() -> str:
        try:
            return charts.csv_text(gyro.history.rows(filters, limit=charts.EXPORT_CAP))
        except GyroscopeError as exc:
            return f"error\n{exc.user_message}\n"

    c2.download_button(f"Requests (CSV, newest {min(total, charts.EXPORT_CAP):,})", rows_csv,
                       file_name=f"gyroscope-requests-{days}.csv", mime="text/csv", key="export_rows",
                       icon=":material/download:")
    if total > charts.EXPORT_CAP:
        c2.caption(f"This range has {total:,} requests; the file holds the newest "
                   f"{charts.EXPORT_CAP:,}. Narrow the range for the rest.")


def body() -> None:
    try:
        # Whole seconds, so the range shown below reproduces these numbers exactly.
        start, end, unit = charts.resolve_range(choice, tz, math.ceil(time.time()), first, last)
        filters = Filters(start, end, tuple(picked_models), tuple(picked_sources), tz)
        data = {name: query() for name, query in charts.page_queries(gyro.history, filters, unit).items()}
        infos = charts.for_models(gyro.breakers.all_info(), filters.models)
    except GyroscopeError as exc:
        show_error(exc)
        return
    show_range(start, end, unit)
    if data["totals"]["total_requests"] == 0:
        st.info("No requests in this range with these filters. Widen the range, pick other "
                "dates, or clear the model and source filters.", icon=":material/search_off:")
        return
    show_headline(data["totals"], infos)
    drop = cost_charts.prompt_cache_warning(gyro.history, tz, time.time())
    if drop:
        st.warning(drop, icon=":material/trending_down:")
    show_budget(time.time())
    show_charts(data, filters, infos)
    show_exports(data, filters)


st.fragment(run_every=REFRESH_S if live else None)(body)()
