"""The only module that imports both Streamlit and the core: shared page glue."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from .display import safe_markdown, viewer_zone as _zone
from .errors import CircuitOpen, GyroscopeError
from .http.shell import held_shortcut_script
from .service import Gyroscope, default_service

SIMULATOR_BANNER = "Simulated responses — set OPENAI_API_KEY for real content."

# Once the browser has drawn a page, press a hidden button on it. Its script waits until every
# other element has been drawn (no loading skeleton left; 5 s at most), lets the browser paint
# that, and then clicks the button, which reruns the page with the button's callback run
# first. Streamlit loads each element's script on its own, and a heavy one (Plotly's) sent
# with the rest made the rest wait; this lets a page send it afterwards. (A button and an
# st.html script, rather than a custom component: a v2 component's script brings Arrow's
# ~190 KB with it, which a cold browser parsed before it could draw the first pass.)
_WHEN_DRAWN_HTML = """<script>
(() => {
  const started = performance.now();
  const button = () => document.querySelector(".st-key-%(key)s button");
  const loading = () => document.querySelector(
    '[data-testid="stSkeleton"], [data-testid="stSkeletonElement"], [data-testid="stAppSkeleton"]');
  const press = () => { const b = button(); if (b && !b.dataset.pressed) { b.dataset.pressed = "1"; b.click(); } };
  const check = () => {
    if ((loading() || !button()) && performance.now() - started < 5000) { setTimeout(check, 50); return; }
    requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(press, 0)));
  };
  check();
})();
</script>"""


def _hidden(box: str, script: str):
    """A script in a container that takes no room on the page; its other elements go in it."""
    container = st.container(key=box)
    container.html(f"<style>.st-key-{box} {{ display: none; }}</style>{script}", unsafe_allow_javascript=True)
    return container


def when_drawn(key: str, on_drawn) -> None:
    """Call ``on_drawn`` (then rerun, as a button does) once the browser has drawn and painted
    everything else on the page. Nothing of it shows."""
    with _hidden(f"{key}_box", _WHEN_DRAWN_HTML % {"key": key}):
        st.button("Draw the rest", key=key, on_click=on_drawn)


def hold_shortcut(button_key: str, field_key: str) -> None:
    """Keep a Ctrl+Enter (⌘+Enter) pressed in the widget ``field_key`` before the button
    ``button_key`` is drawn, and press the button once it is (core/http/shell.py). The page
    shell installs this before any element is drawn; drawn here too (call it above the
    widget), it covers a page served without the shell, and is idle where the shell's runs."""
    _hidden(f"{button_key}_held", held_shortcut_script(button_key, field_key))


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
