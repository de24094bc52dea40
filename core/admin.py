"""Maintainer actions behind the Settings page: each change audited as an event.

Importable without Streamlit, so the page stays thin and the CLI or API can reuse it:

    changed_values(values, snapshot)        only what differs from the stored values
    reset_group(store, group, actor)        back to defaults, only what is not already
    breaker_rows(gyro) / reset_breaker / force_open_breaker
    clear_cache(gyro, actor, before=None)   event kind='cache' with the entries removed
    apply_faults / clear_faults / set_latency / active_faults   (simulator only; kind='fault')
    sign_in(client, given, expected)        the admin password, paused per client (core.signin)
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Mapping

from .config import redact_url as safe_url  # noqa: F401 - the page's name for it
from .errors import ConfigError, InvalidParameter
from .settings import SETTINGS, Setting, SettingsStore, spec
from .signin import PasswordGate, Verdict

# A wrong admin password pauses its client about 1 s, to slow guessing. One gate per
# process, so every session of a client (and the CLI) shares the pause; tests swap in a
# gate with a fake clock.
PASSWORD_GATE = PasswordGate(delay_s=1.0)


def sign_in(client: str | None, given: str, expected: str) -> Verdict:
    """Check an admin password attempt from ``client`` (an IP address; None = local)."""
    # Anything but an address (None for localhost, a stand-in under AppTest) is 'local'.
    return PASSWORD_GATE.attempt(client if isinstance(client, str) and client else "local",
                                 given, expected)


# -- settings ------------------------------------------------------------------------------
def group_settings(group: str) -> list[Setting]:
    """The settings of one group, in description order."""
    return [s for s in SETTINGS if s.group == group]


def show(value: Any, unit: str = "") -> str:
    """A setting or fault value as a person reads it: on/off, 0.5, 30 s, 'text'."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return f"{_number(value)}{unit}"
    if isinstance(value, str):
        return repr(value) if value else "(empty)"
    return f"{value}{unit}"


def _number(value: float) -> str:
    # Whole numbers in full with separators (604,800 rather than 6.048e+05).
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"


def describe(setting: Setting) -> str:
    """Help line, bounds and default of one setting, in one line."""
    parts = [setting.help]
    low, high, unit = setting.min, setting.max, setting.unit
    if low is not None and high is not None:
        parts.append(f"{_number(low)} to {_number(high)}{unit}")
    elif low is not None:
        parts.append(f"at least {_number(low)}{unit}")
    elif high is not None:
        parts.append(f"at most {_number(high)}{unit}")
    if setting.choices:
        parts.append("one of " + ", ".join(setting.choices))
    parts.append(f"default {show(setting.default, setting.unit)}")
    return " · ".join(parts)


def changed_values(values: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that differ from ``current`` (invalid ones count as changed,
    so saving them reports why they are refused)."""
    out = {}
    for name, value in values.items():
        try:
            differs = spec(name).parse(value) != current[name]
        except InvalidParameter:
            differs = True
        if differs:
            out[name] = value
    return out


def reset_group(store: SettingsStore, group: str, actor: str | None) -> tuple[list[str], int | None]:
    """Put one group back to its defaults; returns (names changed, new version or None)."""
    snap = store.snapshot()
    names = [s.name for s in group_settings(group) if snap[s.name] != s.default]
    return names, (store.reset(names, actor) if names else None)


def audit_rows(store: SettingsStore, limit: int = 50, zone: dt.tzinfo | None = None) -> list[dict]:
    """The latest setting changes as rows for a table: when (in ``zone``), who, setting,
    old -> new."""
    return [{"when": when(r["ts"], zone), "who": r["actor"] or "?", "setting": r["name"],
             "change": f"{_json_show(r['old'])} → {_json_show(r['new'])}",
             "version": r["version"]} for r in store.audit(limit)]


def _json_show(raw: str | None) -> str:
    try:
        return show(json.loads(raw)) if raw is not None else "—"
    except (TypeError, ValueError):
        return str(raw)


def other_changes(gyro, limit: int = 50, zone: dt.tzinfo | None = None) -> list[dict]:
    """The latest breaker, cache and fault events, newest first (times in ``zone``)."""
    events = [e for kind in ("breaker", "cache", "fault") for e in gyro.history.events(kind, limit=limit)]
    events.sort(key=lambda e: (e["ts"], e["id"]), reverse=True)
    return [{"when": when(e["ts"], zone), "who": e["actor"] or _actor_in(e["cause"]), "kind": e["kind"],
             "subject": breaker_label(e["subject"]) if e["kind"] == "breaker" else e["subject"],
             "change": f"{e['old'] or '—'} → {e['new'] or '—'}",
             "cause": e["cause"] or ""} for e in events[:limit]]


def _actor_in(cause: str | None) -> str:
    # Breakers put a hand-made change's actor in the cause ("forced open by admin").
    match = re.search(r" by (\w+)$", cause or "")
    return match.group(1) if match else "automatic"


# -- display helpers -------------------------------------------------------------------------
def when(ts: float | None, zone: dt.tzinfo | None = None) -> str:
    """Unix seconds as date and time in ``zone`` (None: the server's)."""
    return "—" if ts is None else dt.datetime.fromtimestamp(ts, zone).strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB'."""
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KB"
    for bigger in ("MB", "GB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


# -- breakers ------------------------------------------------------------------------------
def breaker_state(info: dict, zone: dt.tzinfo | None = None) -> str:
    """'closed', 'open until HH:MM:SS' (in ``zone``) or 'half-open', in words a maintainer
    reads at once."""
    state = info.get("state")
    if state == "open":
        if not info.get("retry_in_s"):
            return "open — the next request probes"
        return "open until " + dt.datetime.fromtimestamp(info["next_probe_at"], zone).strftime("%H:%M:%S")
    return state or "unknown"


def breaker_label(name: str) -> str:
    """A breaker's name (upstream|model) with the upstream URL stripped of credentials."""
    upstream, sep, model = name.partition("|")
    return f"{safe_url(upstream)}{sep}{model}"


def breaker_rows(gyro, zone: dt.tzinfo | None = None) -> list[dict]:
    """Every breaker in the file: its label, state, failures and last transition (times in
    ``zone``)."""
    # The breaker for today's provider and default model always shows, so it can be forced
    # open before any traffic (a rehearsal); others appear on their first request.
    gyro.breakers.get(gyro.provider.upstream_id, gyro.settings.get("provider.default_model"))
    last = {e["subject"]: e for e in gyro.history.events("breaker")}
    rows = []
    for info in gyro.breakers.all_info():
        event = last.get(info["name"])
        rows.append({
            "breaker": breaker_label(info["name"]), "state": breaker_state(info, zone),
            # What the trip rule counts: failures in this process's window, or in a row.
            **({"failures": info["window_failures"],
                "counted over": f"last {info['window_calls'] + info['window_running']} attempts "
                                "sent (this process)"}
               if info.get("mode") == "rate" else
               {"failures": info.get("fail_counter", 0), "counted over": "in a row"}),
            "last change": (f"{when(event['ts'], zone)}: {event['old']} → {event['new']}"
                            if event else "—"),
            "cause": event["cause"] if event else "",
        })
    return rows


def _breaker(gyro, label: str):
    # Pages hold labels, not names: a name may carry credentials in its upstream URL.
    for row in gyro.db.query("SELECT name FROM breakers ORDER BY name"):
        upstream, sep, model = row["name"].partition("|")
        if sep and breaker_label(row["name"]) == label:
            return gyro.breakers.get(upstream, model)
    raise InvalidParameter(f"There is no breaker {label!r}; reload the page.")


def reset_breaker(gyro, label: str, actor: str) -> None:
    """Close a breaker (by its label) by hand; the breaker records the transition and actor."""
    _breaker(gyro, label).reset(actor)
    gyro.db.flush()


def force_open_breaker(gyro, label: str, actor: str) -> None:
    """Open a breaker (by its label) by hand; it still probes after breaker.reset_timeout_s."""
    _breaker(gyro, label).force_open(actor)
    gyro.db.flush()


# -- cache ---------------------------------------------------------------------------------
def clear_cache(gyro, actor: str, before: dt.date | None = None, zone: dt.tzinfo | None = None) -> int:
    """Remove every cached answer, or those created before the start of ``before`` (in
    ``zone``; None: the server's); records an event kind='cache' with how many were removed."""
    if before is None:
        removed, subject = gyro.cache.clear(), "clear all"
    else:
        cutoff = dt.datetime.combine(before, dt.time(), zone).timestamp()
        removed, subject = gyro.cache.clear(cutoff), f"clear created before {before.isoformat()}"
    gyro.history.event("cache", subject, None, f"{removed} removed",
                       f"{removed} entries removed", actor=actor)
    gyro.db.flush()
    return removed


# -- simulator faults ----------------------------------------------------------------------
def simulator(gyro):
    """The simulator behind the provider, or ConfigError when the provider is real."""
    if not gyro.is_simulated:
        raise ConfigError("Outage rehearsal needs the built-in simulator as the provider "
                          "(unset OPENAI_API_KEY and OPENAI_BASE_URL, or set GYROSCOPE_PROVIDER=simulator).")
    return gyro.provider.sim


def _fault_defaults() -> dict[str, Any]:
    from .simulator import Simulator
    return Simulator().faults()


def active_faults(gyro) -> dict[str, Any]:
    """Faults that differ from a healthy simulator, plus the seconds of outage (and of model
    loading) left."""
    current, defaults = simulator(gyro).faults(), _fault_defaults()
    timers = ("outage_remaining_s", "loading_remaining_s")
    active = {k: v for k, v in current.items() if k not in timers and v != defaults[k]}
    for name in timers:
        if current[name] > 0:
            active[name] = round(current[name], 1)
    return active


def _record(gyro, subject: str, old: Any, new: Any, actor: str, cause: str) -> None:
    gyro.history.event("fault", subject, show(old), new if isinstance(new, str) else show(new),
                       cause, actor=actor)


def apply_faults(gyro, actor: str, cause: str, **patch: Any) -> dict[str, Any]:
    """Change some simulator faults (``outage_s`` starts an outage, ``loading_model_s`` a
    model load); one event per change."""
    sim = simulator(gyro)
    before = sim.faults()
    try:
        after = sim.set_faults(**patch)
    except ValueError as exc:  # FaultError names the field and what is allowed
        raise InvalidParameter(f"{exc}.") from None
    for name, value in patch.items():
        if name in ("outage_s", "loading_model_s"):
            subject = "outage" if name == "outage_s" else "loading_model"
            _record(gyro, subject, None, show(float(value), " s"), actor, cause)
        elif before[name] != after[name]:
            _record(gyro, name, before[name], after[name], actor, cause)
    gyro.db.flush()
    return after


def set_latency(gyro, actor: str, ttft_ms: float, tokens_per_s: float | None) -> dict[str, Any]:
    """Change the simulator's time to first token and speed (0 or None = instant)."""
    sim = simulator(gyro)
    before = sim.latency()
    try:
        after = sim.set_latency(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s)
    except ValueError as exc:
        raise InvalidParameter(f"{exc}.") from None
    for name in ("ttft_ms", "tokens_per_s"):
        if before[name] != after[name]:
            _record(gyro, f"latency.{name}", before[name], after[name], actor, "slow responses")
    gyro.db.flush()
    return after


def clear_faults(gyro, actor: str) -> dict[str, Any]:
    """Remove every fault (latency stays); records what was active."""
    active = active_faults(gyro)
    simulator(gyro).clear_faults()
    summary = ", ".join(f"{k}={show(v)}" for k, v in active.items()) or "none"
    gyro.history.event("fault", "all", summary, "none", "cleared all faults", actor=actor)
    gyro.db.flush()
    return active
