"""Spend limits that hold under load: reserve each request's most possible cost before it is
sent, settle to its real cost after.

Limits (settings ``budget.*``): daily and monthly, global (``budget.daily_usd``,
``budget.monthly_usd``) and per model or source (``budget.limits``, JSON). Days and months
are those of ``budget.timezone``.

The ledger (table ``budget_ledger``, migration m008) holds, per scope and period, what was
``spent`` and what is ``reserved`` by requests in flight. ``reserve`` checks every scope a
request falls in and adds its hold in one short write transaction on the shared SQLite file,
so the sum ``spent + reserved`` never passes a limit, whatever the concurrency, in one
process or many. ``settle`` takes the hold back and adds the real cost. With
``GYROSCOPE_DATABASE_URL`` the ledger is in PostgreSQL instead (core/storage/pg_budgets.py):
the same checks, shared by every replica.

Worst case (docs/metrics.md): a request's real cost exceeds its hold only when the upstream
counts more prompt tokens than tiktoken does here (a chat template, another tokenizer), so
the overshoot is at most the sum, over requests in flight when the limit is reached, of
(reported - estimated prompt tokens) x input rate. Completions are capped by max_tokens.
Unknown prices are refused while a budget applies (``budget.unknown_price`` = refuse) or let
through uncounted (allow: then the overshoot is unbounded, and the docs say so).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable
from zoneinfo import ZoneInfo

from . import errors
from .errors import BudgetExceeded, InvalidParameter
from .settings import json_object

_log = logging.getLogger(__name__)
SOURCES = ("page", "api", "v1", "batch", "cli")
PERIODS = ("day", "month")


def iso(ts: float) -> str:
    """A viewer-neutral time: ISO 8601 in UTC."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


# -- the settings ---------------------------------------------------------------------------
def parse_limits(text: str) -> dict[str, dict[str, float]]:
    """``budget.limits`` as {scope: {period: USD}}; scopes 'model:NAME' or 'source:NAME'."""
    if not text.strip():
        return {}
    example = '{"model:gpt-4o": {"day": 5, "month": 100}, "source:batch": {"day": 2}}'
    data = json_object("budget.limits", text, f"e.g. {example}")
    out = {}
    for scope, limits in data.items():
        kind, _, name = scope.partition(":")
        if kind not in ("model", "source") or not name:
            raise InvalidParameter(f"budget.limits key {scope!r} must be 'model:NAME' or "
                                   f"'source:NAME' (sources: {', '.join(SOURCES)}), e.g. {example}.")
        if kind == "source" and name not in SOURCES:   # a typo would never apply: say so
            raise InvalidParameter(f"budget.limits key {scope!r}: the sources are "
                                   f"{', '.join(SOURCES)}.")
        if not isinstance(limits, dict) or not limits or set(limits) - set(PERIODS):
            raise InvalidParameter(f"budget.limits[{scope!r}] must give 'day' and/or 'month' in "
                                   f"USD, e.g. {{\"day\": 5, \"month\": 100}}.")
        for period, usd in limits.items():
            if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 < usd < 1e9:
                raise InvalidParameter(f"budget.limits[{scope!r}][{period!r}] must be a positive "
                                       "number of USD (remove the entry for no limit).")
        out[scope] = {p: float(v) for p, v in limits.items()}
    return out


def check_limits(text: str) -> None:
    parse_limits(text)


def check_zone(name: str) -> None:
    try:
        ZoneInfo(name)
    except Exception:
        raise InvalidParameter(f"budget.timezone {name!r} is not a time zone; use a name like "
                               "UTC or Europe/Berlin.") from None


@dataclass(frozen=True)
class Limit:
    scope: str         # 'all', 'model:NAME', 'source:NAME'
    period: str        # 'day' or 'month'
    usd: float


@dataclass(frozen=True)
class Plan:
    """The limits of one settings snapshot."""

    limits: tuple[Limit, ...]
    tz: str
    warn: float         # share of a limit that warns (0.8)
    refuse_unknown: bool

    def applying(self, model: str, source: str) -> list[Limit]:
        wanted = ("all", f"model:{model}", f"source:{source}")
        return [lim for lim in self.limits if lim.scope in wanted]


_plans: dict[tuple, Plan] = {}


def plan_of(s) -> Plan:
    """The Plan of a settings snapshot (worked out once per distinct value)."""
    key = (s["budget.daily_usd"], s["budget.monthly_usd"], s["budget.limits"], s["budget.timezone"],
           s["budget.warn_percent"], s["budget.unknown_price"])
    plan = _plans.get(key)
    if plan is None:
        limits = [Limit("all", "day", key[0]), Limit("all", "month", key[1])]
        for scope, periods in parse_limits(key[2]).items():
            limits += [Limit(scope, p, usd) for p, usd in periods.items()]
        plan = _plans[key] = Plan(tuple(lim for lim in limits if lim.usd > 0), key[3], key[4] / 100.0,
                                  key[5] == "refuse")
    return plan


# -- periods ----------------------------------------------------------------------------------
_bounds: dict[tuple[str, str], tuple[str, float, float]] = {}


def period_bounds(period: str, ts: float, tz: str) -> tuple[str, float, float]:
    """(ledger key, start, end) of the day or month holding ``ts`` in zone ``tz``."""
    # Every reservation asks this for each limit; the zone arithmetic is ~6 us a call, a
    # fifth of a reservation, and its answer holds until the period ends.
    last = _bounds.get((period, tz))
    if last is not None and last[1] <= ts < last[2]:
        return last
    found = _bounds[(period, tz)] = _period_bounds(period, ts, tz)
    return found


def _period_bounds(period: str, ts: float, tz: str) -> tuple[str, float, float]:
    zone = ZoneInfo(tz)
    local = dt.datetime.fromtimestamp(ts, zone)
    if period == "day":
        first = local.date()
        nxt = first + dt.timedelta(days=1)
        key = f"d:{first.isoformat()}"
    else:
        first = local.date().replace(day=1)
        nxt = (first + dt.timedelta(days=32)).replace(day=1)
        key = f"m:{first.isoformat()[:7]}"
    start = dt.datetime.combine(first, dt.time(), zone).timestamp()
    return key, start, dt.datetime.combine(nxt, dt.time(), zone).timestamp()


@dataclass
class Hold:
    """What one request reserved: (scope, period key) rows and the amount on each."""

    rows: tuple[tuple[str, str], ...]
    amount: float
    id: int | None = None        # its row in budget_holds
    settled: bool = False


class Budgets:
    """Reserve and settle against the ledger on the SQLite file (shared by every process on
    it); core/storage/pg_budgets.py keeps it in PostgreSQL (shared by every replica)."""

    BUSY_S = 0.05      # on the event loop: wait at most this long for the file, then refuse
    # A hold not settled within this (its process died) is given back by the next
    # reservation: a crash blocks money for an hour, not for the rest of the month.
    HOLD_TTL_S = 3600.0
    SWEEP_EVERY_S = 60.0    # how often a reservation looks for expired holds (per process)

    def __init__(self, db, history=None, clock: Callable[[], float] | None = None) -> None:
        import time
        self.db = db
        self.history = history
        self.clock = clock or time.time
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.refused = 0
        self._sweep_at = float("-inf")

    def reserve(self, plan: Plan, model: str, source: str, amount: float | None) -> Hold | None:
        """Hold ``amount`` USD on every limit the request falls in; None when no limit applies.
        Raises BudgetExceeded (nothing is held) when a limit would be passed."""
        limits = plan.applying(model, source)
        if not limits:
            return None
        now = self.clock()
        if amount is None:
            if not plan.refuse_unknown:
                return None
            key, _, end = period_bounds(limits[0].period, now, plan.tz)
            raise BudgetExceeded(
                f"{model} has no known price here, so it cannot be held against the budget "
                f"({_name(limits[0])}). Set its price in prices.upstreams, or set "
                "budget.unknown_price to allow.", resets_at=end, retry_in_s=max(0.0, end - now))
        bounds = [(lim, *period_bounds(lim.period, now, plan.tz)) for lim in limits]
        sweep = now >= self._sweep_at
        if sweep:
            self._sweep_at = now + self.SWEEP_EVERY_S
        over, held = self._hold(bounds, amount, now, sweep)
        if over is not None:
            lim, spent, held, end = over
            self.refused += 1
            raise BudgetExceeded(
                f"The {_name(lim)} of ${lim.usd:,.2f} would be passed (${spent:,.4f} spent, "
                f"${held:,.4f} held by requests in flight, this one needs up to ${amount:,.4f}). "
                f"Nothing was sent. It resets at {iso(end)} (in {max(0, end - now):,.0f} s); "
                "or raise the limit in Settings.", resets_at=end, retry_in_s=max(0.0, end - now))
        used, hold_id = held
        for (lim, key, _, _), total in zip(bounds, used):
            if total >= plan.warn * lim.usd:
                self._warn(lim, key, total, plan.warn)
        return Hold(tuple((lim.scope, key) for lim, key, _, _ in bounds), amount, hold_id)

    def _hold(self, bounds: list, amount: float, now: float, sweep: bool):
        """Check every (limit, period key, start, end) and hold ``amount`` on each, in one
        transaction: ((limit, spent, held, end) of the first passed, None) or (None,
        (spent + held after, per limit; the hold's id)). The backends differ only here,
        in ``settle`` and in ``_read``."""
        keys = [v for lim, key, _, _ in bounds for v in (lim.scope, key)]
        read = ("SELECT scope, period, spent, reserved FROM budget_ledger WHERE (scope, period) IN "
                f"(VALUES {', '.join('(?, ?)' for _ in bounds)})")

        def run(conn):
            if sweep:
                _sweep(conn, now)
            have = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(read, keys)}
            used = []
            for lim, key, _, end in bounds:
                spent, held = have.get((lim.scope, key), (0.0, 0.0))
                if spent + held + amount > lim.usd + 1e-12:
                    return (lim, spent, held, end), None
                used.append(spent + held + amount)
            conn.executemany("INSERT INTO budget_ledger (scope, period, spent, reserved) VALUES "
                             "(?, ?, 0, ?) ON CONFLICT (scope, period) DO UPDATE SET reserved = "
                             "reserved + excluded.reserved",
                             [(lim.scope, key, amount) for lim, key, _, _ in bounds])
            hold_id = conn.execute("INSERT INTO budget_holds (rows, amount, expires_at) VALUES (?, ?, ?)",
                                   (json.dumps(keys), amount, now + self.HOLD_TTL_S)).lastrowid
            return None, (used, hold_id)

        try:
            return self.db.write_now(run, busy_timeout_s=self.BUSY_S)
        except errors.StorageError as exc:
            raise errors.StorageError(
                "The budget could not be checked: the database file is busy. Nothing was sent; "
                "try again in a moment.", retry_in_s=1.0, detail=exc.detail) from exc

    def settle(self, hold: Hold | None, cost: float) -> None:
        """Give the hold back and count the real cost (queued to the writer: never waits)."""
        if hold is None or hold.settled:
            return
        hold.settled = True

        def write(conn) -> None:
            # A hold swept as expired was given back already: only its cost is added.
            held = conn.execute("DELETE FROM budget_holds WHERE id = ?", (hold.id,)).rowcount
            conn.executemany("UPDATE budget_ledger SET spent = spent + ?, reserved = max(0, reserved - ?) "
                             "WHERE scope = ? AND period = ?",
                             [(cost, hold.amount if held else 0.0, scope, key) for scope, key in hold.rows])
        self.db.submit(write)

    def _warn(self, lim: Limit, key: str, used: float, share: float) -> None:
        """Log and record (once per limit and period in this process) a limit past its share."""
        with self._lock:
            if (lim.scope, key) in self._warned:
                return
            self._warned.add((lim.scope, key))
        _log.warning("Budget %s: %.0f%% of $%.2f spent or held", _name(lim), 100 * used / lim.usd, lim.usd)
        if self.history is not None:
            self.history.event("budget_warning", f"{lim.scope}|{key}", None, f"{used:.6f}",
                               f"{share:.0%} of ${lim.usd:,.2f}")

    def status(self, plan: Plan, now: float | None = None) -> list[dict]:
        """Every limit now: spent, held, left, share used, when it resets (for the Metrics page
        and Prometheus)."""
        now = self.clock() if now is None else now
        out = []
        for lim in plan.limits:
            key, start, end = period_bounds(lim.period, now, plan.tz)
            spent, held = self._read(lim.scope, key)
            out.append({"scope": lim.scope, "period": lim.period, "limit_usd": lim.usd,
                        "spent_usd": spent, "held_usd": held,
                        "left_usd": max(0.0, lim.usd - spent - held),
                        "used": (spent + held) / lim.usd, "warn": (spent + held) >= plan.warn * lim.usd,
                        "starts_at": start, "resets_at": end, "name": _name(lim)})
        return out

    def _read(self, scope: str, key: str) -> tuple[float, float]:
        """(spent, held) of one scope and period."""
        row = self.db.query_one("SELECT spent, reserved FROM budget_ledger WHERE scope = ? AND "
                                "period = ?", (scope, key))
        return (row["spent"], row["reserved"]) if row else (0.0, 0.0)

    def flush(self, timeout: float = 30) -> None:
        """Wait until the settlements queued so far are written."""
        self.db.flush(timeout)

    def health(self) -> dict:
        """What /api/health adds about budgets (the file's ledger: nothing of its own)."""
        return {}

    def close(self) -> None:
        """Nothing of its own to release here (the database is the service's)."""


def _sweep(conn, now: float) -> None:
    """Give back the holds of requests that never settled (their process died)."""
    expired = conn.execute("SELECT id, rows, amount FROM budget_holds WHERE expires_at < ? LIMIT 1000",
                           (now,)).fetchall()
    if not expired:
        return
    back = []
    for _, rows, amount in expired:
        flat = json.loads(rows)
        back += [(amount, flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    conn.executemany("UPDATE budget_ledger SET reserved = max(0, reserved - ?) WHERE scope = ? AND "
                     "period = ?", back)
    conn.executemany("DELETE FROM budget_holds WHERE id = ?", [(r[0],) for r in expired])
    _log.warning("Gave back %d budget hold(s) never settled (a process stopped mid-request?)", len(expired))


def _name(lim: Limit) -> str:
    what = {"day": "daily", "month": "monthly"}[lim.period]
    if lim.scope == "all":
        return f"{what} budget"
    kind, _, name = lim.scope.partition(":")
    return f"{what} budget of {kind} {name}"
