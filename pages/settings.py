"""Settings: tune the resilience layer live, reset breakers, clear the cache, rehearse outages.

The settings forms are generated from ``core.settings.SETTINGS`` (one form per group, one
widget per setting chosen by its type); every change goes through ``core.admin`` or the
settings store, which audit it. Changes run in button callbacks, so the page redraws with
the stored values and the new settings version in the same run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import streamlit as st

from core import admin, display
from core.errors import GyroscopeError
from core.settings import GROUPS, Setting
from core.ui import get_gyro, provider_badge, show_error, viewer_zone

OPEN_TO_ALL = ("**Who can edit:** anyone who can reach this app; it listens on 127.0.0.1 only — "
               "set `GYROSCOPE_ADMIN_PASSWORD` before exposing it.")
SERVER_STATUSES = (500, 502, 503, 504)


# -- who is acting ---------------------------------------------------------------------------
def current_actor() -> str | None:
    """'admin' when signed in with the password, 'local' when none is set, None when locked."""
    if not get_gyro().config.admin_password:
        return "local"
    return "admin" if st.session_state.get("admin_signed_in") else None


def _sign_in() -> None:
    given = st.session_state.get("admin_password_input") or ""
    st.session_state["admin_password_input"] = ""  # never kept after the attempt
    expected = get_gyro().config.admin_password or ""
    # Paused per client address, not per session: ten tabs do not buy ten guesses.
    verdict = admin.sign_in(st.context.ip_address, given, expected)
    if verdict.ok:
        st.session_state["admin_signed_in"] = True
    else:
        st.session_state["sign_in_failed"] = verdict.message


def _sign_out() -> None:
    st.session_state["admin_signed_in"] = False


def admin_gate(password: str | None) -> None:
    """Sign-in form, signed-in notice with Log out, or who can edit when there is no password."""
    if not password:
        st.caption(OPEN_TO_ALL)
    elif st.session_state.get("admin_signed_in"):
        note, button = st.columns([5, 1], vertical_alignment="center")
        note.success("Signed in as admin for this browser session; changes are audited as 'admin'.",
                     icon=":material/lock_open:")
        button.button("Log out", key="logout", on_click=_sign_out)
    else:
        with st.form("sign_in"):
            st.markdown("Changing anything here needs the admin password. Until then the page "
                        "is read-only.")
            st.text_input("Admin password", type="password", key="admin_password_input")
            st.form_submit_button("Sign in", key="sign_in_button", on_click=_sign_in)
        failed = st.session_state.pop("sign_in_failed", None)
        if failed:
            st.error(failed, icon=":material/lock:")


# -- running a change ------------------------------------------------------------------------
def _act(slot: str, action: Callable[..., Any], *args: Any) -> None:
    """Button callback: run one change as the current actor, keep its outcome for ``slot``."""
    who = current_actor()
    if who is None:
        st.session_state[slot] = ("warning", "Sign in with the admin password first.")
        return
    try:
        outcome = action(get_gyro(), who, *args)
    except GyroscopeError as exc:
        outcome = exc
    st.session_state[slot] = ("success", outcome) if isinstance(outcome, str) else outcome


def show_outcome(slot: str) -> None:
    """What the last change in this panel did (or why it was refused)."""
    outcome = st.session_state.pop(slot, None)
    if isinstance(outcome, GyroscopeError):
        show_error(outcome)
    elif outcome:
        kind, message = outcome
        getattr(st, kind)(message)
        if kind == "success":     # seen wherever the page is scrolled to
            st.toast(message, icon=":material/check_circle:")


# -- settings, generated from the description ------------------------------------------------
def _key(name: str, version: int) -> str:
    # The version in the key makes every widget start from the stored value again after a
    # save or reset here or elsewhere; it is also what an out-of-range input falls back to.
    return f"setting:{name}@{version}"


def setting_widget(s: Setting, value: Any, version: int, disabled: bool) -> None:
    """The widget for one setting, chosen by its type, with its help, bounds and default."""
    key, label = _key(s.name, version), s.title
    if s.choices:
        st.selectbox(label, s.choices, index=s.choices.index(value) if value in s.choices else 0,
                     key=key, disabled=disabled)
    elif s.type is bool:
        st.toggle(label, value=bool(value), key=key, disabled=disabled)
    elif s.type in (int, float):
        low, high = (None if b is None else s.type(b) for b in (s.min, s.max))
        step = 1 if s.type is int else (0.1 if (s.max or 0) <= 10 else 1.0)
        st.number_input(label, min_value=low, max_value=high, value=s.type(value), step=step,
                        key=key, disabled=disabled)
    else:
        st.text_input(label, value=str(value), key=key, disabled=disabled)
    st.caption(f"`{s.name}` · {admin.describe(s)}")   # the key, small, for the CLI and API


def _save(gyro, who: str, group: str, version: int):
    values = {s.name: st.session_state.get(_key(s.name, version))
              for s in admin.group_settings(group)}
    changed = admin.changed_values(values, gyro.settings.snapshot())
    if not changed:
        return ("info", "Nothing to save: every value is already stored.")
    version = gyro.settings.set_many(changed, actor=who)
    return (f"Saved {', '.join(changed)}. Live from the very next request in every session "
            f"and process — settings version {version}.")


def _reset(gyro, who: str, group: str):
    names, version = admin.reset_group(gyro.settings, group, who)
    if not names:
        return ("info", f"{group} is already at its defaults.")
    return f"Reset {', '.join(names)} to defaults — settings version {version}."


@st.cache_data(ttl=60, show_spinner="Listing models…")
def _models(gyro_id: int, settings_version: int, _gyro) -> list[str]:
    return _gyro.models()


def provider_facts(gyro, version: int) -> None:
    """Provider, base URL, whether a key is set (never the key) and the models offered."""
    cfg = gyro.config
    base_url = admin.safe_url(getattr(gyro.provider, "base_url", None) or cfg.base_url)
    key = "set (hidden)" if cfg.has_api_key else "not set"
    st.markdown(f"Provider **{gyro.provider.name}** at `{base_url or 'its default URL'}` · "
                f"API key: **{key}**")
    st.caption("Models offered: " + ", ".join(_models(id(gyro), version, gyro)))
    if "redis" in gyro.backends():       # replicas: what is shared, or that Redis is down
        from core.storage.redis_backend import describe
        ok, line = describe(gyro.backends()["redis"])
        st.caption(line) if ok else st.warning(line, icon=":material/cloud_off:")


def settings_panel(gyro, editable: bool) -> None:
    snapshot = gyro.settings.snapshot()
    version = snapshot.version
    st.info(f"Saving applies to the very next request in every session and process — no "
            f"restart. Settings version **{version}**.", icon=":material/bolt:")
    for group in GROUPS:
        st.subheader(group)
        if group == "Provider":
            provider_facts(gyro, version)
        box = st.form(f"group:{group}") if editable else st.container(border=True)
        with box:
            for s in admin.group_settings(group):
                setting_widget(s, snapshot[s.name], version, disabled=not editable)
            if editable:
                save, reset = st.columns(2)
                slot = f"outcome:{group}"
                save.form_submit_button("Save", key=f"save:{group}", type="primary",
                                        on_click=_act, args=(slot, _save, group, version))
                reset.form_submit_button("Reset to defaults", key=f"reset:{group}",
                                         on_click=_act, args=(slot, _reset, group))
        show_outcome(f"outcome:{group}")


# -- breakers --------------------------------------------------------------------------------
def _breaker_reset(gyro, who: str):
    label = st.session_state["breaker_pick"]
    admin.reset_breaker(gyro, label, who)
    return f"{label} closed (failure count reset) by {who}."


def _breaker_open(gyro, who: str):
    label = st.session_state["breaker_pick"]
    admin.force_open_breaker(gyro, label, who)
    return f"{label} forced open by {who}; it probes again after breaker.reset_timeout_s."


def breaker_panel(gyro, editable: bool) -> None:
    zone = viewer_zone()
    rows = admin.breaker_rows(gyro, zone)
    st.dataframe(rows, hide_index=True)
    st.caption(f"Times in {display.zone_name(zone)}. One breaker per upstream and model; others "
               "appear on their first request. Watch them open and recover on the Metrics page.")
    if editable and rows:
        st.selectbox("Breaker", [r["breaker"] for r in rows], key="breaker_pick")
        close, force = st.columns(2)
        close.button("Reset (close)", key="breaker_reset", icon=":material/restart_alt:",
                     on_click=_act, args=("outcome:breaker", _breaker_reset))
        force.button("Force open", key="breaker_open", icon=":material/block:",
                     on_click=_act, args=("outcome:breaker", _breaker_open))
    show_outcome("outcome:breaker")


# -- cache -----------------------------------------------------------------------------------
def _clear_cache(gyro, who: str, older: bool):
    before = st.session_state["cache_before"] if older else None
    removed = admin.clear_cache(gyro, who, before, viewer_zone())
    scope = f"created before {before.isoformat()}" if before else "all"
    return f"Removed {removed} cached answer(s) ({scope})."


def cache_panel(gyro, editable: bool) -> None:
    stats = gyro.cache.stats()
    entries, size, rate = st.columns(3)
    entries.metric("Entries", f"{stats['entries']:,}")
    size.metric("Size", admin.human_bytes(stats["bytes"]))
    rate.metric("Hit rate", f"{stats['hit_rate']:.0%}",
                help=f"{stats['hits']:,} hits, {stats['misses']:,} misses")
    if editable:
        st.button("Clear all", key="cache_clear_all", icon=":material/delete_sweep:",
                  on_click=_act, args=("outcome:cache", _clear_cache, False))
        with st.form("cache_older"):
            st.date_input(f"Remove answers created before (start of day, "
                          f"{display.zone_name(viewer_zone())})", key="cache_before")
            st.form_submit_button("Clear older", key="cache_clear_older",
                                  on_click=_act, args=("outcome:cache", _clear_cache, True))
    show_outcome("outcome:cache")


# -- outage rehearsal (simulator only) -------------------------------------------------------
def _get(name: str) -> Any:
    return st.session_state.get(f"fault:{name}")


def _errors(gyro, who):
    admin.apply_faults(gyro, who, "error rate", error_rate=_get("error_rate"),
                       error_status=_get("error_status"))
    return f"{_get('error_rate'):.0%} of requests now fail with {_get('error_status')}."


def _storm(gyro, who):
    retry_after = _get("retry_after_s") or None
    admin.apply_faults(gyro, who, "429 storm", rate_limit_rate=_get("rate_limit_rate"),
                       retry_after_s=retry_after)
    header = f"Retry-After: {retry_after:g}" if retry_after else "no Retry-After"
    return f"{_get('rate_limit_rate'):.0%} of requests now get 429 ({header})."


def _outage(gyro, who):
    admin.apply_faults(gyro, who, "full outage", outage_s=_get("outage_s"))
    return f"Every request gets 503 for {_get('outage_s'):g} s."


def _loading(gyro, who):
    admin.apply_faults(gyro, who, "model loading", loading_model_s=_get("loading_model_s"))
    return f"Every request gets 503 \"Loading model\" for {_get('loading_model_s'):g} s."


def _thinking(gyro, who):
    admin.apply_faults(gyro, who, "reasoning model", reasoning_chunks=_get("reasoning_chunks"),
                       reasoning_pause_s=_get("reasoning_pause_s"))
    n = _get("reasoning_chunks")
    return f"Answers now start with {n} piece(s) of thinking." if n else "Answers no longer think first."


def _drops(gyro, who):
    admin.apply_faults(gyro, who, "mid-stream drops", drop_after_chunks=_get("drop_after_chunks"))
    k = _get("drop_after_chunks")
    return "Streams are no longer dropped." if k is None else f"Streams now drop after {k} chunk(s)."


def _slow(gyro, who):
    admin.apply_faults(gyro, who, "slow responses", slow_s=_get("slow_s"))
    admin.set_latency(gyro, who, _get("ttft_ms"), _get("tokens_per_s"))
    return "Response speed changed."


def _clear_faults(gyro, who):
    admin.clear_faults(gyro, who)
    return "All faults cleared; the simulator answers normally (latency unchanged)."


def _apply(label: str, action: Callable) -> None:
    st.form_submit_button(label, key=f"fault_apply:{label}", on_click=_act,
                          args=("outcome:faults", action))


def _num(name: str, label: str, **kw: Any) -> None:
    st.number_input(label, key=f"fault:{name}", **kw)


COUNTDOWNS = {"outage_remaining_s": ("Full outage", "every request gets 503"),
              "loading_remaining_s": ("Model loading", "every request gets 503 \"Loading model\"")}


@st.fragment(run_every=1)
def outage_countdown(gyro) -> None:
    """A running outage or model load, counting down every second."""
    faults, zone = gyro.provider.sim.faults(), viewer_zone()
    running = False
    for key, (what, effect) in COUNTDOWNS.items():
        left = faults.get(key) or 0
        if left > 0:
            running = True
            ends = display.clock_time(time.time() + left, zone)
            st.warning(f"**{what} running: {left:.0f} s left** (until {ends}, {display.zone_name(zone)}) — "
                       f"{effect} until then.", icon=":material/timer:")
    if not running:
        st.caption("No outage running — the simulator answers (apart from the faults below).")


def rehearsal_panel(gyro, editable: bool) -> None:
    if not gyro.is_simulated:
        st.caption("Outage rehearsal needs the built-in simulator as the provider.")
        return
    st.info("Inject faults into the built-in simulator, send requests from Generate, and watch "
            "the breaker open and recover on the Metrics page.", icon=":material/science:")
    outage_countdown(gyro)
    active = {k: v for k, v in admin.active_faults(gyro).items() if k not in COUNTDOWNS}
    latency = gyro.provider.sim.latency()
    st.markdown("**Other faults now:** " + (", ".join(f"`{k}` {admin.show(v)}" for k, v in active.items())
                                            or "none."))
    speed = latency["tokens_per_s"]
    st.caption(f"Latency: first token after {latency['ttft_ms']:g} ms, then "
               + (f"{speed:g} tokens/s." if speed else "the rest at once."))
    if not editable:
        return
    left, right = st.columns(2)
    with left.form("fault_errors"):
        st.markdown("**Error rate**")
        _num("error_rate", "Share of requests that fail (0-1)", min_value=0.0, max_value=1.0,
             value=0.5, step=0.05)
        st.selectbox("Status", SERVER_STATUSES, key="fault:error_status")
        _apply("Inject errors", _errors)
    with right.form("fault_storm"):
        st.markdown("**429 storm**")
        _num("rate_limit_rate", "Share of requests rate limited (0-1)", min_value=0.0,
             max_value=1.0, value=1.0, step=0.05)
        _num("retry_after_s", "Retry-After (s; 0 = no header)", min_value=0.0,
             max_value=3600.0, value=2.0, step=1.0)
        _apply("Start 429 storm", _storm)
    with left.form("fault_outage"):
        st.markdown("**Full outage**")
        _num("outage_s", "Every request gets 503 for (s)", min_value=1.0, max_value=86400.0,
             value=60.0, step=10.0)
        _apply("Start outage", _outage)
    with right.form("fault_drops"):
        st.markdown("**Mid-stream drops**")
        _num("drop_after_chunks", "Cut streams after K chunks (empty = never)", min_value=0,
             max_value=100_000, value=None, step=1, placeholder="never")
        _apply("Drop streams", _drops)
    with left.form("fault_slow"):
        st.markdown("**Slow responses**")
        _num("slow_s", "Extra wait before every answer (s)", min_value=0.0, max_value=600.0,
             value=0.0, step=1.0)
        _num("ttft_ms", "Time to first token (ms)", min_value=0.0, max_value=600_000.0,
             value=float(latency["ttft_ms"]), step=50.0)
        _num("tokens_per_s", "Streaming speed (tokens/s, 0 = instant)", min_value=0.0,
             max_value=100_000.0, value=float(latency["tokens_per_s"] or 0), step=10.0)
        _apply("Apply", _slow)
    with right.form("fault_loading"):
        st.markdown("**Model loading**")
        _num("loading_model_s", "Every request gets 503 \"Loading model\" for (s)", min_value=1.0,
             max_value=3600.0, value=30.0, step=10.0)
        _apply("Start loading", _loading)
    with left.form("fault_thinking"):
        st.markdown("**Reasoning model**")
        _num("reasoning_chunks", "Pieces of thinking before each answer (0 = none)", min_value=0,
             max_value=1000, value=5, step=1)
        _num("reasoning_pause_s", "Thinking time per piece (s)", min_value=0.0, max_value=60.0,
             value=0.5, step=0.1)
        _apply("Think first", _thinking)
    st.button("Clear all faults", key="fault_clear", type="primary", icon=":material/healing:",
              on_click=_act, args=("outcome:faults", _clear_faults))
    show_outcome("outcome:faults")


# -- audit trail -----------------------------------------------------------------------------
def audit_panel(gyro) -> None:
    zone = viewer_zone()
    rows = admin.audit_rows(gyro.settings, zone=zone)
    st.markdown(f"**Setting changes** (newest first; times in {display.zone_name(zone)})")
    if rows:
        st.dataframe(rows, hide_index=True)
    else:
        st.caption("No setting has been changed yet.")
    st.markdown("**Breaker, cache and fault changes**")
    other = admin.other_changes(gyro, zone=zone)
    if other:
        st.dataframe(other, hide_index=True)
    else:
        st.caption("None yet.")


# -- the page ----------------------------------------------------------------------------------
def panel(render: Callable, *args: Any) -> None:
    """Render one panel; a failure shows as a message there, never as a traceback."""
    try:
        render(*args)
    except GyroscopeError as exc:
        show_error(exc)


st.title("Settings")
try:
    gyro = get_gyro()
    if gyro.is_simulated:  # a real provider's URL is shown, without credentials, under Provider
        provider_badge(gyro)
    admin_gate(gyro.config.admin_password)
    editable = current_actor() is not None
    tabs = st.tabs(["Tuning", "Breakers", "Cache", "Outage rehearsal", "Audit trail"])
    with tabs[0]:
        panel(settings_panel, gyro, editable)
    with tabs[1]:
        panel(breaker_panel, gyro, editable)
    with tabs[2]:
        panel(cache_panel, gyro, editable)
    with tabs[3]:
        panel(rehearsal_panel, gyro, editable)
    with tabs[4]:
        panel(audit_panel, gyro)
except GyroscopeError as exc:
    show_error(exc)
