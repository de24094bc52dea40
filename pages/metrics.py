"""Metrics: cost, reliability and speed from the request history, for a range, models,
sources and a time zone. The numbers are History's (the same as `python -m core stats`)."""

from __future__ import annotations

import datetime as dt
import math
import time
import zoneinfo

import streamlit as st
from streamlit.errors import StreamlitAPIException

from core import budgets, charts, cost_charts, display
from core.demo import fill_history
from core.errors import GyroscopeError
from core.history import Filters
from core.ui import get_gyro, provider_badge, show_error, when_drawn

DEMO_ROWS, DEMO_DAYS = 5_000, 30
REFRESH_S = 5
TABS = ("Cost", "Requests and errors", "Speed", "Cache", "Retries and breakers")
STATE_BADGE = {"closed": "green", "half-open": "orange", "open": "red"}
# The charts come in a second pass. Plotly's component is a 4.7 MB script that the browser
# loads and runs (1.7 s of a core on this 2-core VM) when the first chart arrives, and it held
# back everything drawn with it: the headline numbers and filters waited for the charts. So a
# tab's first visit draws the page without charts, and asks for them once the browser has
# drawn the rest (core.ui.when_drawn).
CHARTS_ON = "metrics_charts_on"      # session: this tab has asked for charts (Plotly loaded)

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
    """The browser's time zone (its name, else its whole-hour offset), else UTC."""
    return display.viewer_zone_key(st.context.timezone, st.context.timezone_offset)


def empty_state() -> None:
    st.info("No requests recorded yet. Generate some on the **Generate** page, or load "
            f"{DEMO_ROWS:,} synthetic requests spread over the last {DEMO_DAYS} days here to "
            "see what this page shows.", icon=":material/monitoring:")
    try:
        st.page_link("pages/generate.py", label="Go to Generate", icon=":material/edit_note:")
    except StreamlitAPIException:
        pass   # the page runs on its own (tests), without the app's navigation
    if st.button("Load demo history", key="load_demo", icon=":material/dataset:"):
        try:
            with st.spinner("Writing synthetic history…"):
                fill_history(gyro.history.db, rows=DEMO_ROWS, days=DEMO_DAYS)
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

zones = display.known_zones()
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


def show_range(start: float, end: float, unit: str, partial: dict[str, str]) -> None:
    zone = zoneinfo.ZoneInfo(tz)
    shown = [dt.datetime.fromtimestamp(t, zone) for t in (start, end)]
    words = " to ".join(f"{d:%a %-d %b %Y, %H:%M}" for d in shown)
    unit_word = "day" if unit == "day" else "hour"
    edges = " and ".join(edge for edge, ts in (("first", start), ("last", min(end, time.time())))
                         if charts.partial_buckets(start, min(end, time.time()), unit, tz)
                         and dt.datetime.fromtimestamp(ts if edge == "first" else ts - 1e-6, zone)
                         .strftime("%Y-%m-%d" if unit == "day" else "%Y-%m-%d %H:00") in partial)
    note = (f" The {edges} {unit_word}{'s are' if ' and ' in edges else ' is'} only partly in the "
            "range (shaded in the charts).") if edges else ""
    st.caption(f"{words} ({tz}), by {'hour' if unit == 'hour' else 'day'}.{note}")
    # Lazy: its code box needs the 1.5 MB syntax highlighter, loaded only when opened.
    details = st.expander("Technical details", icon=":material/terminal:", key="metrics_details",
                          on_change="rerun")
    if details.open:
        since, until = (d.isoformat() for d in shown)
        details.markdown(f"Range: `{since}` to `{until}` (end excluded). The same totals from the "
                         "command line:")
        details.code(f"python -m core stats --json --since {since} --until {until}", language="bash")


def show_headline(totals: dict, infos: list[dict]) -> None:
    figures = charts.headline(totals)
    for i in range(0, len(figures), 3):
        for col, (label, value, help_text) in zip(st.columns(3), figures[i:i + 3]):
            col.metric(label, value, help=help_text, border=True)
    states = charts.breaker_states(infos)
    if states:
        st.markdown("**Circuit breakers now:** " + " · ".join(
            f"{name} :{STATE_BADGE.get(state.split(' ')[0], 'gray')}-badge[{state}]" for name, state in states))
    else:
        st.caption("No circuit breaker was used in this range.")


def chart(where, fig, key: str, partial: dict[str, str] | None = None, unit: str = "day") -> None:
    if partial:
        charts.mark_partial(fig, partial, unit)
    where.plotly_chart(charts.legend_below(fig), key=key, config={"displaylogo": False})


def show_budget(now: float, with_chart: bool) -> None:
    """Money left and warnings (words: the first pass too), then the budget line (a chart)."""
    plan = budgets.plan_of(gyro.settings.snapshot())
    if not plan.limits:
        return
    status = gyro.budgets.status(plan, now)
    st.caption(" · ".join(f"{b['name'].capitalize()}: **{charts.money(b['left_usd'], 2)}** left of "
                          f"{charts.money(b['limit_usd'], 2)}" for b in status))
    for line in cost_charts.budget_warnings(status):
        st.warning(line, icon=":material/savings:")
    if not with_chart:
        return
    monthly = next((s["limit_usd"] for s in status if s["scope"] == "all" and s["period"] == "month"), None)
    days, start, end = cost_charts.budget_rows(gyro.history, plan, now)
    chart(st, cost_charts.budget(days, monthly, start, end, now, plan.tz), "chart_budget")


def _charts_on() -> None:
    st.session_state[CHARTS_ON] = True
    st.session_state["metrics_reuse"] = True     # the same range and figures as the first pass


def ask_for_charts() -> None:
    """The first pass's stand-in for the charts: a note, and a component that reruns the page
    with the charts on once the browser has drawn this pass."""
    st.caption("Drawing the charts…")
    when_drawn("metrics_drawn", _charts_on)


def show_charts(data: dict, filters: Filters, infos: list[dict], unit: str, partial: dict) -> bool:
    """The chart tabs; False in a first pass (no charts yet, asked for once drawn)."""
    # Lazy tabs: only the open tab's charts are built and drawn.
    tabs = st.tabs(TABS, key="metrics_tab", on_change="rerun")
    if not st.session_state.get(CHARTS_ON):
        if tabs[0].open:
            with tabs[0]:
                show_budget(time.time(), with_chart=False)
        with next(tab for tab in tabs if tab.open):
            ask_for_charts()
        return False
    series = data["series"]
    if tabs[0].open:
        with tabs[0]:
            show_budget(time.time(), with_chart=True)
            chart(st, charts.cost_by_model(data["daily_cost_by_model"]), "chart_cost",
                  charts.partial_buckets(filters.start, min(filters.end, time.time()), "day", filters.tz), "day")
    if tabs[1].open:
        with tabs[1]:
            chart(st, charts.requests_and_errors(series, data["errors_by_kind"]), "chart_requests", partial, unit)
    if tabs[2].open:
        with tabs[2]:
            chart(st, charts.latency(series), "chart_latency", partial, unit)
    if tabs[3].open:
        with tabs[3]:
            left, right = st.columns(2)
            chart(left, charts.cache(series), "chart_cache", partial, unit)
            chart(right, cost_charts.prompt_cache(series), "chart_prompt_cache", partial, unit)
    if tabs[4].open:
        with tabs[4]:
            left, right = st.columns(2)
            chart(left, charts.retries(series), "chart_retries", partial, unit)
            events = charts.for_models(data["events"], filters.models, key="subject")
            now = {i["name"]: i["state"] for i in infos}
            chart(right, charts.breaker_timeline(events, filters.start, min(filters.end, time.time()),
                                                 now, filters.tz), "chart_breakers")
    return True


def show_exports(data: dict, filters: Filters) -> None:
    daily = charts.daily_table(data["daily_cost_by_model"])
    zone = zoneinfo.ZoneInfo(tz)
    days = "-".join(dt.datetime.fromtimestamp(t, zone).strftime("%Y%m%d")
                    for t in (filters.start, filters.end - 1))   # the end is exclusive
    total = data["totals"]["total_requests"]
    money = st.column_config.NumberColumn(format="$%.4f")
    # A toggle, not an expander: a folded table would still be drawn (and the table
    # component loaded) on every visit.
    if st.toggle("Show the daily table", key="show_daily"):
        st.dataframe(daily, hide_index=True, key="daily_table",
                     column_config={"cost": money, "cost_saved": st.column_config.NumberColumn(
                         "saved by the cache", format="$%.4f")})
    c1, c2 = st.columns(2)
    c1.download_button("Daily table (CSV)", charts.csv_text(charts.daily_csv_rows(daily), charts.DAILY_COLUMNS),
                       file_name=f"gyroscope-daily-{days}.csv", mime="text/csv", key="export_daily",
                       icon=":material/download:")

    def rows_csv() -> str:
        try:
            return charts.csv_text(charts.export_rows(gyro.history.rows(filters, limit=charts.EXPORT_CAP), tz))
        except GyroscopeError as exc:
            return f"error\n{exc.user_message}\n"

    c2.download_button(f"Requests (CSV, newest {min(total, charts.EXPORT_CAP):,})", rows_csv,
                       file_name=f"gyroscope-requests-{days}.csv", mime="text/csv", key="export_rows",
                       icon=":material/download:", help=f"Times in {tz} (ISO 8601 with the offset); "
                                                        "money in dollars.")
    if total > charts.EXPORT_CAP:
        c2.caption(f"This range has {total:,} requests; the file holds the newest "
                   f"{charts.EXPORT_CAP:,}. Narrow the range for the rest.")


def body() -> None:
    try:
        key = (choice, tz, first, last, tuple(picked_models), tuple(picked_sources))
        memo = st.session_state.get("metrics_memo")
        if st.session_state.pop("metrics_reuse", False) and memo and memo["key"] == key:
            now, data = memo["now"], memo["data"]    # the charts' pass: what the first pass read
        else:
            # Whole seconds, so the technical range reproduces these numbers exactly.
            now, data = math.ceil(time.time()), None
        start, end, unit = charts.resolve_range(choice, tz, now, first, last)
        filters = Filters(start, end, tuple(picked_models), tuple(picked_sources), tz)
        if data is None:
            data = {name: query() for name, query in charts.page_queries(gyro.history, filters, unit).items()}
            st.session_state["metrics_memo"] = {"key": key, "now": now, "data": data}
        infos = charts.seen_breakers(charts.with_event_breakers(
            charts.for_models(gyro.breakers.all_info(), filters.models),
            charts.for_models(data["events"], filters.models, key="subject")),
            charts.models_seen(data["daily_cost_by_model"]))
    except GyroscopeError as exc:
        show_error(exc)
        return
    partial = charts.partial_buckets(start, min(end, now), unit, tz)
    show_range(start, end, unit, partial)
    if data["totals"]["total_requests"] == 0:
        st.info("No requests in this range with these filters. Widen the range, pick other "
                "dates, or clear the model and source filters.", icon=":material/search_off:")
        return
    show_headline(data["totals"], infos)
    drop = cost_charts.prompt_cache_warning(gyro.history, tz, time.time())
    if drop:
        st.warning(drop, icon=":material/trending_down:")
    # The exports (below the charts) come with them: their toggle and buttons are three more
    # element scripts for the browser to load before the first pass is drawn.
    if show_charts(data, filters, infos, unit, partial):
        show_exports(data, filters)


st.fragment(run_every=REFRESH_S if live else None)(body)()
