"""The Metrics page's cost figures without Streamlit: the provider's prompt-cache hit rate
(and a warning when it drops from one day to the next), the budget line and its month-end
forecast. Rows in (from History and Budgets), plotly figures or plain text out.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import plotly.graph_objects as go

from .history import Filters

# A day-to-day drop worth a warning: the rate fell to less than half of the day before, and
# by at least 10 points (a 4 % -> 1 % wobble on little traffic is not news).
DROP_RATIO, DROP_POINTS = 0.5, 0.10
MIN_PROMPT_TOKENS = 1000     # days with fewer upstream prompt tokens say too little to compare


def prompt_cache(series: list[dict]) -> go.Figure:
    """The provider's prompt-cache hit rate per bucket: cached / prompt tokens it answered."""
    fig = go.Figure()
    rows = [r for r in series if r.get("prompt_cache_hit_rate") is not None]
    fig.add_scatter(name="prompt-cache hit rate", mode="lines+markers", x=[r["bucket"] for r in rows],
                    y=[r["prompt_cache_hit_rate"] for r in rows], hovertemplate="%{y:.1%}")
    fig.add_bar(name="cached prompt tokens", x=[r["bucket"] for r in rows],
                y=[r["cached_tokens"] for r in rows], yaxis="y2", opacity=0.35)
    fig.update_layout(title="Provider prompt cache", yaxis=dict(title="Hit rate", tickformat=".0%",
                      rangemode="tozero"), yaxis2=dict(title="Cached tokens", overlaying="y",
                      side="right", rangemode="tozero"), legend_orientation="h")
    if not rows:
        fig.add_annotation(text="No answered requests in this range", showarrow=False)
    return fig


def prompt_cache_drop(days: list[dict]) -> str | None:
    """A warning when the last day's prompt-cache hit rate fell sharply from the day before
    (``days``: History.series rows by day, oldest first), else None."""
    usable = [d for d in days if (d.get("upstream_prompt_tokens") or 0) >= MIN_PROMPT_TOKENS]
    if len(usable) < 2:
        return None
    before, last = usable[-2], usable[-1]
    was, now = before["prompt_cache_hit_rate"], last["prompt_cache_hit_rate"]
    if now < was * DROP_RATIO and was - now >= DROP_POINTS:
        return (f"The provider's prompt-cache hit rate fell from {was:.0%} on {before['bucket']} to "
                f"{now:.0%} on {last['bucket']}: prompts may have stopped sharing their start "
                "(a changed system prompt or a timestamp at the top?), so input costs more.")
    return None


def prompt_cache_warning(history, tz: str, now: float) -> str | None:
    """``prompt_cache_drop`` over yesterday and today (local days of ``tz``)."""
    zone = ZoneInfo(tz)
    today = dt.datetime.fromtimestamp(now, zone).date()
    start = dt.datetime.combine(today - dt.timedelta(days=1), dt.time(), zone).timestamp()
    end = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), zone).timestamp()
    return prompt_cache_drop(history.series(Filters(start, end, tz=tz), "day", by_model=False))


# -- budgets ----------------------------------------------------------------------------------
def month_end_forecast(spent: float, start: float, end: float, now: float) -> float:
    """The month's spend at its end if it goes on at the rate so far (linear)."""
    elapsed = min(max(now - start, 0.0), end - start)
    if elapsed <= 0:
        return spent
    return spent * (end - start) / elapsed


def budget_rows(history, plan, now: float) -> tuple[list[dict], float, float]:
    """Cost per local day of this budget month (budget.timezone), and the month's bounds."""
    from .budgets import period_bounds
    _, start, end = period_bounds("month", now, plan.tz)
    days = history.series(Filters(start, min(end, max(now, start + 1)), tz=plan.tz), "day", by_model=False)
    return days, start, end


def budget(days: list[dict], limit: float | None, start: float, end: float, now: float,
           tz: str = "UTC") -> go.Figure:
    """Spend this month so far (cumulative, per day), the monthly limit as a line and the
    month-end forecast as a dashed line from today to the month's last day."""
    fig = go.Figure()
    x, total, cumulative = [], 0.0, []
    for d in days:
        total += d["cost"] or 0.0
        x.append(d["bucket"])
        cumulative.append(total)
    fig.add_scatter(name="spent this month", mode="lines+markers", x=x, y=cumulative,
                    hovertemplate="$%{y:,.4f}")
    zone = ZoneInfo(tz)
    first = dt.datetime.fromtimestamp(start, zone).date().isoformat()
    last = (dt.datetime.fromtimestamp(end, zone) - dt.timedelta(days=1)).date().isoformat()
    forecast = month_end_forecast(total, start, end, now)
    today = dt.datetime.fromtimestamp(now, zone).date().isoformat()
    fig.add_scatter(name=f"forecast ${forecast:,.2f}", mode="lines", line=dict(dash="dash"),
                    x=[today, last], y=[total, forecast], hovertemplate="$%{y:,.4f}")
    if limit:
        fig.add_scatter(name=f"monthly limit ${limit:,.2f}", mode="lines", x=[first, last],
                        y=[limit, limit], line=dict(color="#c62828"))
    fig.update_layout(title="Budget this month", yaxis_title="USD", legend_orientation="h",
                      xaxis=dict(range=[first, last]))
    return fig


def budget_warnings(status: list[dict]) -> list[str]:
    """One line per limit past its warning share, for the page."""
    out = []
    for s in status:
        if s["warn"]:
            out.append(f"The {s['name']} is {s['used']:.0%} used (${s['spent_usd']:,.4f} spent, "
                       f"${s['held_usd']:,.4f} held, limit ${s['limit_usd']:,.2f}); it resets at "
                       f"{dt.datetime.fromtimestamp(s['resets_at'], dt.timezone.utc).isoformat()}.")
    return out
