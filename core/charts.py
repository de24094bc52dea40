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
import math
from typing import Callable, Iterable, Iterator
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


def models_seen(daily_cost_by_model: list[dict]) -> set[str]:
    """Models with requests in the range (from the daily rows the page reads anyway)."""
    return {r["model"] for r in daily_cost_by_model if r["requests"]}


def with_event_breakers(infos: list[dict], events: list[dict]) -> list[dict]:
    """``infos`` plus a breaker that only its events in the range know of (another process's,
    or demo history), in the state its last event left it."""
    known = {i["name"] for i in infos}
    last = {e["subject"]: e["new"] for e in events}
    return infos + [{"name": name, "state": state} for name, state in sorted(last.items()) if name not in known]


def seen_breakers(infos: Iterable[dict], models: set[str]) -> list[dict]:
    """Breakers (``upstream|model``) of the models that had requests in the range."""
    return [i for i in infos if i["name"].partition("|")[2] in models]


# -- headline figures -------------------------------------------------------------------
def money(value: float, places: int = 4) -> str:
    """Dollars that fit a headline: cents from $1 up ($1,234.57), else ``places`` decimals
    ($0.0007)."""
    if abs(value) >= 1:
        return f"${value:,.2f}"
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


def breaker_name(name: str) -> str:
    """'simulator · gpt-4o' for the breaker 'simulator|gpt-4o'."""
    upstream, _, model = name.partition("|")
    return f"{upstream} · {model}" if model else upstream


def breaker_states(infos: Iterable[dict]) -> list[tuple[str, str]]:
    """(upstream · model, state now) for each breaker of ``Breakers.all_info()``."""
    out = []
    for info in infos:
        state = info["state"]
        if state == "open" and info.get("retry_in_s"):
            state = f"open ({info['retry_in_s']:.0f} s to probe)"
        out.append((breaker_name(info["name"]), state))
    return out


# -- figures ----------------------------------------------------------------------------
# Error kinds as a manager reads them (History's error_kind / outcome values).
ERROR_NAMES = {
    "server_error": "Server error", "rate_limited": "Rate limited", "timeout": "Timed out",
    "connection": "Connection failed", "circuit_open": "Not sent (breaker open)",
    "model_not_found": "Unknown model", "auth": "Key refused", "quota_exhausted": "Out of quota",
    "bad_request": "Refused request", "stream_interrupted": "Cut off mid-answer",
    "malformed_response": "Garbled answer", "model_loading": "Model loading", "conflict": "Conflict",
    "retry_later": "Asked to wait", "budget_exceeded": "Over budget", "cancelled": "Stopped",
    "rejected": "Not sent (bad input)", "invalid_parameter": "Not sent (bad input)",
    "prompt_too_long": "Prompt too long", "storage": "Not saved", "config": "Set-up problem",
}
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.12, xanchor="left", x=0)


def error_name(kind: str | None) -> str:
    """'Server error' for 'server_error'; unknown kinds in words too."""
    if not kind:
        return "Other error"
    return ERROR_NAMES.get(kind, kind.replace("_", " ").capitalize())


def legend_below(fig: go.Figure) -> go.Figure:
    """Put a figure's legend under the plot, where it covers no dates (any builder's)."""
    fig.update_layout(legend=LEGEND_BELOW, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def nice_step(top: float, steps: int = 4) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) so ``steps`` ticks reach ``top``."""
    if not top or top <= 0:
        return 1.0
    raw = top / steps
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _tidy_axis(values, steps: int = 4, whole: bool = False) -> dict:
    """Axis settings from 0 with ``steps`` round steps (the same count on both axes, so
    their grid lines meet)."""
    top = max([v for v in values if v is not None] or [0])
    step = nice_step(top, steps)
    if whole:
        step = max(1, math.ceil(step))
    return dict(range=[0, step * steps], dtick=step, tick0=0, rangemode="tozero")


def _figure(title: str, y_title: str, empty: bool, **layout) -> go.Figure:
    fig = go.Figure()
    layout = {"hovermode": "x unified", **layout}
    fig.update_layout(title=title, yaxis_title=y_title, legend=LEGEND_BELOW,
                      margin=dict(l=10, r=10, t=50, b=10), **layout)
    if empty:
        fig.add_annotation(text="No data in this range", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    return fig


def _second_axis(title: str, **kw) -> dict:
    return dict(yaxis2=dict(title=title, overlaying="y", side="right", showgrid=False, **kw))


def partial_buckets(start: float, end: float, unit: str, tz: str) -> dict[str, str]:
    """{bucket label: why} for the first and last bucket when the range covers only part of
    them (a 'Last 7 days' range starts mid-day), so a chart does not show them as dips."""
    zone = ZoneInfo(tz)
    size = dt.timedelta(days=1) if unit == "day" else dt.timedelta(hours=1)
    fmt = "%Y-%m-%d" if unit == "day" else "%Y-%m-%d %H:00"
    word = "day" if unit == "day" else "hour"
    out = {}
    for ts, edge in ((start, "first"), (end, "last")):
        local = dt.datetime.fromtimestamp(ts if edge == "first" else ts - 1e-6, zone)
        floor = local.replace(minute=0, second=0, microsecond=0)
        if unit == "day":
            floor = floor.replace(hour=0)
        bound = local if edge == "first" else dt.datetime.fromtimestamp(ts, zone)
        whole = bound == floor if edge == "first" else bound == floor + size
        if not whole:
            out[floor.strftime(fmt)] = f"partial {word}: the range covers only part of it"
    return out


def mark_partial(fig: go.Figure, partial: dict[str, str], unit: str) -> go.Figure:
    """Shade the partial first/last bucket and say so, on any time-series figure."""
    half = dt.timedelta(hours=12) if unit == "day" else dt.timedelta(minutes=30)
    for label in partial:
        centre = dt.datetime.fromisoformat(label if unit == "day" else label.replace(" ", "T"))
        fig.add_vrect(x0=centre - half, x1=centre + half, fillcolor="#9e9e9e", opacity=0.15,
                      line_width=0, annotation_text="partial", annotation_position="top left",
                      annotation_font_size=10, annotation_font_color="#616161")
    return fig


def cost_by_model(rows: list[dict]) -> go.Figure:
    """Stacked bars: cost per local day, one trace per model (from ``daily_cost_by_model``).
    A model that never cost anything (a mistyped name answered only by 404s) is left out."""
    paid = sorted({r["model"] for r in rows if (r["cost"] or 0) > 0}, key=str)
    fig = _figure("Cost per day by model", "Cost ($)", not paid, barmode="stack")
    for model in paid:
        mine = [r for r in rows if r["model"] == model]
        fig.add_bar(name=model or "(none)", x=[r["bucket"] for r in mine], y=[r["cost"] for r in mine],
                    customdata=[r["requests"] for r in mine],
                    hovertemplate="%{fullData.name}: $%{y:,.4f} (%{customdata:,} requests)<extra></extra>")
    return fig


def requests_and_errors(series: list[dict], errors: list[dict]) -> go.Figure:
    """Requests per bucket (line, left axis) and failed requests stacked by plain-named
    error kind (bars, their own right axis: a few errors beside hundreds of requests)."""
    per_bucket: dict[str, int] = {}
    for e in errors:
        per_bucket[e["bucket"]] = per_bucket.get(e["bucket"], 0) + e["n"]
    fig = _figure("Requests and errors", "Requests", not series, barmode="stack",
                  yaxis=_tidy_axis([r["requests"] for r in series], whole=True),
                  **_second_axis("Errors", **_tidy_axis(per_bucket.values(), whole=True)))
    for kind in sorted({e["kind"] for e in errors}, key=lambda k: error_name(k)):
        mine = [e for e in errors if e["kind"] == kind]
        fig.add_bar(name=error_name(kind), x=[e["bucket"] for e in mine], y=[e["n"] for e in mine],
                    yaxis="y2", opacity=0.8)
    fig.add_scatter(name="Requests", mode="lines+markers", x=[r["bucket"] for r in series],
                    y=[r["requests"] for r in series], line=dict(color="#1f4e79"))
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
    fig = _figure("Cache", "Saved ($)", not series, yaxis=_tidy_axis([r["cost_saved"] for r in series]),
                  **_second_axis("Hit rate", tickformat=".0%", range=[0, 1], dtick=0.25))
    x = [r["bucket"] for r in series]
    fig.add_bar(name="saved by the cache", x=x, y=[r["cost_saved"] for r in series], hovertemplate="$%{y:,.4f}")
    fig.add_scatter(name="hit rate", mode="lines+markers", x=x, y=[r["hit_rate"] for r in series],
                    yaxis="y2", hovertemplate="%{y:.1%}")
    return fig


def retries(series: list[dict]) -> go.Figure:
    """Retries per bucket (bars) and the total time spent waiting before them (line, right axis)."""
    fig = _figure("Retries", "Retries", not series, yaxis=_tidy_axis([r["retries"] for r in series], whole=True),
                  **_second_axis("Wait (s)", **_tidy_axis([r["retry_wait_s"] for r in series])))
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
            marks[2].append(f"{breaker_name(name)}<br>{e['old']} → {e['new']} at {when}<br>"
                            f"cause: {e['cause'] or '—'}")
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
    fig.update_layout(height=140 + 40 * len(names), yaxis=dict(
        type="category", tickmode="array", tickvals=names, ticktext=[breaker_name(n) for n in names]))
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


MONEY_PLACES = 6    # a millionth of a dollar: finer than any one request's price shows


def round_money(value: float | None) -> float | None:
    """Money without float noise: 0.05407120000000001 -> 0.054071."""
    return None if value is None else round(value + 0.0, MONEY_PLACES) + 0.0


def daily_table(rows: list[dict]) -> list[dict]:
    """The daily table (local day, model, requests, cost, saved) from ``daily_cost_by_model``,
    money rounded."""
    return [{"day": r["bucket"], "model": r["model"], "requests": r["requests"],
             "cost": round_money(r["cost"] or 0.0), "cost_saved": round_money(r["cost_saved"] or 0.0)}
            for r in rows]


def _money_text(value) -> str | None:
    # Fixed decimals, never 6e-05 or 0.05407120000000001, in a file a spreadsheet opens.
    if value is None:
        return None
    return f"{value:.{MONEY_PLACES}f}"


MONEY_COLUMNS = ("cost", "cost_saved", "optimizer_cost_saved")
TIME_COLUMNS = ("ts",)


def export_rows(rows: Iterable[dict], tz: str) -> Iterator[dict]:
    """History rows for the requests CSV: times as ISO 8601 with the offset of ``tz``
    (2026-11-24T23:30:00+14:00), money with fixed decimals, rounded."""
    zone = ZoneInfo(tz)
    for row in rows:
        out = dict(row)
        for col in TIME_COLUMNS:
            if out.get(col) is not None:
                out[col] = dt.datetime.fromtimestamp(out[col], zone).isoformat(timespec="milliseconds")
        for col in MONEY_COLUMNS:
            if col in out:
                out[col] = _money_text(round_money(out[col]))
        yield out


def daily_csv_rows(rows: list[dict]) -> Iterator[dict]:
    """The daily table for its CSV: money with fixed decimals."""
    for r in rows:
        yield {**r, "cost": _money_text(r["cost"]), "cost_saved": _money_text(r["cost_saved"])}
