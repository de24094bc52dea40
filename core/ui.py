"""The only module that imports both Streamlit and the core: shared page glue."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from .display import safe_markdown, viewer_zone as _zone
from .errors import CircuitOpen, GyroscopeError
from .service import Gyroscope, default_service

SIMULATOR_BANNER = "Simulated responses — set OPENAI_API_KEY for real content."

# A component with no look: its script waits until every other element on the page has been
# drawn (no loading skeleton left; 5 s at most), lets the browser paint that, and then sends
# one trigger, "drawn". Streamlit loads each element's component on its own, and a heavy one
# (Plotly's) sent with the rest made the rest wait; this lets a page send it afterwards.
_WHEN_DRAWN_JS = """
export default function ({ setTriggerValue }) {
  const started = performance.now();
  let stopped = false, timer = 0;
  const loading = () => document.querySelector(
    '[data-testid="stSkeleton"], [data-testid="stSkeletonElement"], [data-testid="stAppSkeleton"]');
  const fire = () => { if (!stopped) { stopped = true; setTriggerValue("drawn", true); } };
  const check = () => {
    if (stopped) return;
    if (loading() && performance.now() - started < 5000) { timer = setTimeout(check, 50); return; }
    requestAnimationFrame(() => requestAnimationFrame(() => { timer = setTimeout(fire, 0); }));
  };
  check();
  return () => { stopped = true; clearTimeout(timer); };
}
"""
_when_drawn = st.components.v2.component("gyroscope_when_drawn", js=_WHEN_DRAWN_JS)


def when_drawn(key: str, on_drawn) -> None:
    """Call ``on_drawn`` (then rerun, as a widget does) once the browser has drawn and painted
    everything else on the page."""
    _when_drawn(key=key, on_drawn_change=on_drawn)


def get_gyro() -> Gyroscope:
    """The process's Gyroscope service (one per process, shared by every session and the API).

    A configuration or database problem stops the page with its message, never a traceback.
    """
    try:
        return default_service()
    except GyroscopeError as exc:
        show_error(exc)
        st.stop()


def provider_badge(gyro: Gyroscope) -> None:
    """Say which provider is active; on the simulator, say so loudly."""
    if gyro.is_simulated:
        st.info(SIMULATOR_BANNER, icon=":material/science:")
    else:
        st.caption(f"Provider: **{gyro.provider.name}** at `{gyro.provider.base_url}`")


def viewer_zone() -> dt.tzinfo:
    """The browser's time zone (its IANA name, else its UTC offset; UTC when unknown)."""
    try:
        return _zone(st.context.timezone, st.context.timezone_offset)
    except Exception:  # noqa: BLE001 - no browser context (a bare script run): UTC
        return dt.timezone.utc


def show_error(exc: GyroscopeError, where=st) -> None:
    """An error in plain words with what to do, times in the viewer's zone — never a traceback."""
    message = exc.message_in(viewer_zone())
    if isinstance(exc, CircuitOpen):
        where.warning(message, icon=":material/pause_circle:")
    elif exc.kind in ("invalid_parameter", "prompt_too_long", "rejected", "config"):
        where.warning(message, icon=":material/edit:")
    else:
        where.error(message, icon=":material/error:")


def show_answer(where, text: str) -> None:
    """An answer as Markdown: maths off, remote images as links, code blocks with a copy button."""
    where.markdown(safe_markdown(text) if text else "_(nothing arrived)_")


def show_thinking(where, reasoning: str, live: bool = False) -> None:
    """A reasoning model's thinking in its own expander (open while it thinks), never mixed
    into the answer. ``where`` is ``st`` or a container; nothing is drawn without thinking."""
    if not reasoning:
        return
    label = "Thinking…" if live else "Thinking"
    where.expander(label, expanded=live, icon=":material/psychology:").markdown(safe_markdown(reasoning))
