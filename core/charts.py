"""The Metrics page without Streamlit: its range, its queries, its figures and its files.

Chart builders are plain functions, History rows in and a plotly figure out, so tests read
their traces directly. Aggregation stays in SQL (core/history.py); these only lay rows out.

    resolve_range(...) -> (start, end, unit)     page_queries(history, filters, unit)
    headline(totals) -> [(label, value, help)]   for_models(breakers), breaker_states(infos)
    cost_by_model / requests_and_errors / latency / cache / retries / breaker_timeline
    csv_text(rows, columns)                      EXPORT_CAP
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Callable, Iterable
from zoneinfo import ZoneInfo

import plotly.graph_objects as go

from .errors import InvalidParameter

RANGES = {"Last 24 h": 1, "Last 7 days": 7, "Last 30 days": 30, "Custom dates": None}
HOURLY_UP_TO_S = 48 * 3600
EXPORT_CAP = 100_000
STATE_COLORS = {"closed": "#2e7d32", "half-open": "#f9a825", "open": "#c62828"}
DAILY_COLUMNS = ("day", "model", "requests", "cost", "cost_saved")


# -- the range --------------------------------------------------------------------------
def resolve_range(choice: str, tz: str, now: float, first: dt.date | None = None,
                  last: dt.date | None = None) -> tuple[float, float, str]:
    """(start, end, unit) in unix seconds for a range choice; custom days are whole local days."""
    days = RANGES.get(choice, "?")
    if days == "?":
        raise InvalidParameter(f"Unknown range {choice!r}; pick one of {', '.join(RANGES)}.")
    if days is not None:
        start, end = now - days * 86400, now
    else:
        if first is None or last is None:
            raise InvalidParameter("Pick both a start and an end date.")
        if last < first:
            raise InvalidParameter(f"The end date ({last}) is before the start date ({first}); "
                                   "pick an end on or after the start.")
        zone = ZoneInfo(tz)
        start = dt.datetime.combine(first, dt.time(), zone).timestamp()
        end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), zone).timestamp()
    return start, end, "hour" if end - start <= HOURLY_UP_TO_S else "day"


def page_queries(history, filters, unit: str) -> dict[str, Callable[[], object]]:
    """Every query the page runs for one range, by name (the bench times exactly these)."""
    return {
        "totals": lambda: history.totals(filters),
        "series": lambda: history.series(filters, unit, by_model=False),
        "daily_cost_by_model": lambda: history.daily_cost_by_model(filters),
        "errors_by_kind": lambda: history.errors_by_kind(filters, unit),
        "events": lambda: history.events("breaker", filters.start, filters.end),
    }


# -- headline figures -------------------------------------------------------------------
def money(value: float, places: int = 4) -> str:
    """Dollars with thousands separators: $1,234.5678."""
    return f"${value:,.{places}f}"


def headline(t: dict) -> list[tuple[str, str, str]]:
    """(label, shown value, help) for each headline figure, from ``History.totals``."""
    p95 = t["latency_p95_ms"]
    return [
        ("Requests", f"{t['total_requests']:,}", "Every request in the range, whatever its outcome."),
        ("Success rate", f"{t['success_rate']:.1%}",
         "Answered requests (from the AI service or the cache) / all requests."),
        ("Total cost", money(t["total_cost"]), f"{t['unknown_cost_requests']:,} request(s) had no known price."),
        ("Saved by the cache", money(t["cost_saved"]), "What the cached answers would have cost."),
        ("Tokens saved by the optimizer", f"{t['optimizer_tokens_saved']:,}",
         f"Worth {money(t['optimizer_cost_saved'])}."),
        ("Cache hit rate", f"{t['cache_hit_rate']:.1%}", "Answers served from the cache / answered requests."),
        ("Cost per answered request", money(t["average_cost"], 6), "Total cost / answered requests."),
        ("p95 latency", "—" if p95 is None else f"{p95:,.0f} ms",
         "95% of answers from the AI service took at most this long (cache hits excluded)."),
        ("Retries per request", f"{t['retries_per_request']:.3f}",
         f"{t['retries']:,} retries, {t['retry_wait_s']:,.1f} s spent waiting between attempts."),
    ]


def for_models(items: Iterable[dict], models: Iterable[str], key: str = "name") -> list[dict]:
    """Breakers (``name``) or breaker events (``subject``) of the given models; all if none.
    A breaker is named 'upstream|model'."""
    wanted = set(models)
    return [i for i in items if not wanted or i[key].partition("|")[2] in wanted]


def breaker_states(infos: Iterable[dict]) -> list[tuple[str, str]]:
    """(upstream · model, state now) for each breaker of ``Breakers.all_info()``."""
    out = []
    for info in infos:
        upstream, _, model = info["name"].partition("|")
        state = info["state"]
        if state == "open" and info.get("retry_in_s"):
            state = f"open ({info['retry_in_s']:.0f} s to probe)"
        out.append((f"{upstream} · {model}" if model else upstream, state))
    return out


# -- figures ----------------------------------------------------------------------------
def _figure(title: str, y_title: str, empty: bool, **layout) -> go.Figure:
    fig = go.Figure()
    layout = {"hovermode": "x unified", **layout}
    fig.update_layout(title=title, yaxis_title=y_title, legend_orientation="h",
                      margin=dict(l=10, r=10, t=50, b=10), **layout)
    if empty:
        fig.add_annotation(text="No data in this range", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    return fig


def _second_axis(title: str, **kw) -> dict:
    return dict(yaxis2=dict(title=title, overlaying="y", side="right", showgrid=False, **kw))


def cost_by_model(rows: list[dict]) -> go.Figure:
    """Stacked bars: cost per local day, one trace per model (from ``daily_cost_by_model``)."""
    fig = _figure("Cost per day by model", "Cost ($)", not rows, barmode="stack")
    for model in sorted({r["model"] for r in rows}, key=str):
        mine = [r for r in rows if r["model"] == model]
        fig.add_bar(name=model or "(none)", x=[r["bucket"] for r in mine], y=[r["cost"] for r in mine],
                    customdata=[r["requests"] for r in mine],
                    hovertemplate="%{fullData.name}: $%{y:,.4f} (%{customdata:,} requests)<extra></extra>")
    return fig


def requests_and_errors(series: list[dict], errors: list[dict]) -> go.Figure:
    """Requests per bucket (line) over failed requests stacked by error kind (bars)."""
    fig = _figure("Requests and errors", "Requests", not series, barmode="stack")
    for kind in sorted({e["kind"] for e in errors}, key=str):
        mine = [e for e in errors if e["kind"] == kind]
        fig.add_bar(name=f"error: {kind}", x=[e["bucket"] for e in mine], y=[e["n"] for e in mine])
    fig.add_scatter(name="requests", mode="lines+markers", x=[r["bucket"] for r in series],
                    y=[r["requests"] for r in series])
    return fig


def latency(series: list[dict]) -> go.Figure:
    """Latency p50 and p95 and time to first token (p50), upstream answers only."""
    fig = _figure("Latency (answers from the AI service)", "ms", not series)
    x = [r["bucket"] for r in series]
    for name, key in (("p50 latency", "latency_p50_ms"), ("p95 latency", "latency_p95_ms"),
                      ("p50 time to first token", "ttft_p50_ms")):
        fig.add_scatter(name=name, mode="lines+markers", x=x, y=[r[key] for r in series],
                        hovertemplate="%{y:,.0f} ms")
    return fig


def cache(series: list[dict]) -> go.Figure:
    """Money the cache saved per bucket (bars) and its hit rate (line, right axis)."""
    fig = _figure("Cache", "Saved ($)", not series, **_second_axis("Hit rate", tickformat=".0%", rangemode="tozero"))
    x = [r["bucket"] for r in series]
    fig.add_bar(name="saved by the cache", x=x, y=[r["cost_saved"] for r in series], hovertemplate="$%{y:,.4f}")
    fig.add_scatter(name="hit rate", mode="lines+markers", x=x, y=[r["hit_rate"] for r in series],
                    yaxis="y2", hovertemplate="%{y:.1%}")
    return fig


def retries(series: list[dict]) -> go.Figure:
    """Retries per bucket (bars) and the total time spent waiting before them (line, right axis)."""
    fig = _figure("Retries", "Retries", not series, **_second_axis("Wait (s)", rangemode="tozero"))
    x = [r["bucket"] for r in series]
    fig.add_bar(name="retries", x=x, y=[r["retries"] for r in series])
    fig.add_scatter(name="total retry wait", mode="lines+markers", x=x, y=[r["retry_wait_s"] for r in series],
                    yaxis="y2", hovertemplate="%{y:,.1f} s")
    return fig


def _local(ts: float, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, zone).replace(tzinfo=None)


def breaker_timeline(events: list[dict], start: float, end: float, now_states: dict[str, str],
                     tz: str = "UTC") -> go.Figure:
    """Each breaker's state over the range as coloured bands, each transition a marker whose
    hover says old → new, when, and why (``events`` rows of kind 'breaker', oldest first)."""
    zone = ZoneInfo(tz)
    names = sorted({e["subject"] for e in events} | set(now_states))
    fig = _figure("Circuit breakers", "", not names, hovermode="closest")
    bands: dict[str, tuple[list, list]] = {}
    marks = ([], [], [], [])   # x, y, hover text, colour
    for name in names:
        mine = [e for e in events if e["subject"] == name]
        state = mine[0]["old"] if mine else now_states.get(name, "closed")
        since = start
        for e in mine:
            _band(bands, state, name, since, e["ts"], zone)
            when = _local(e["ts"], zone).strftime("%Y-%m-%d %H:%M:%S")
            marks[0].append(_local(e["ts"], zone))
            marks[1].append(name)
            marks[2].append(f"{name}<br>{e['old']} → {e['new']} at {when}<br>cause: {e['cause'] or '—'}")
            marks[3].append(STATE_COLORS.get(e["new"], "#555"))
            state, since = e["new"], e["ts"]
        _band(bands, state, name, since, end, zone)
    order = list(STATE_COLORS)
    for state in sorted(bands, key=lambda s: order.index(s) if s in order else len(order)):
        x, y = bands[state]
        fig.add_scatter(name=state, mode="lines", x=x, y=y, hoverinfo="skip",
                        line=dict(color=STATE_COLORS.get(state, "#9e9e9e"), width=14))
    if marks[0]:
        fig.add_scatter(name="transitions", mode="markers", x=marks[0], y=marks[1], hovertext=marks[2],
                        hoverinfo="text", marker=dict(size=12, symbol="diamond", color=marks[3],
                                                       line=dict(color="#000", width=1)))
    fig.update_layout(height=140 + 40 * len(names), yaxis=dict(type="category"))
    return fig


def _band(bands, state, name, since, until, zone) -> None:
    x, y = bands.setdefault(state, ([], []))
    x += [_local(since, zone), _local(until, zone), None]
    y += [name, name, None]


# -- files ------------------------------------------------------------------------------
def _cell(value):
    # Text from upstream (error messages) must not run as a spreadsheet formula when opened.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_text(rows: Iterable[dict], columns: Iterable[str] | None = None) -> str:
    """CSV with a header row; ``columns`` picks and orders them (default: the first row's)."""
    out = io.StringIO()
    writer = None
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(columns or row), extrasaction="ignore")
            writer.writeheader()
        writer.writerow({k: _cell(v) for k, v in row.items()})
    if writer is None and columns:
        csv.writer(out).writerow(list(columns))
    return out.getvalue()


def daily_table(rows: list[dict]) -> list[dict]:
    """The daily table (local day, model, requests, cost, saved) from ``daily_cost_by_model``."""
    return [{"day": r["bucket"], "model": r["model"], "requests": r["requests"], "cost": r["cost"],
             "cost_saved": r["cost_saved"]} for r in rows]
