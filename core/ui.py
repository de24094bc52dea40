"""The only module that imports both Streamlit and the core: shared page glue."""

from __future__ import annotations

import streamlit as st

from .errors import CircuitOpen, GyroscopeError
from .service import Gyroscope, default_service

SIMULATOR_BANNER = "Simulated responses — set OPENAI_API_KEY for real content."


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


def show_error(exc: GyroscopeError) -> None:
    """An error in plain words with what to do — never a traceback."""
    if isinstance(exc, CircuitOpen):
        st.warning(exc.user_message, icon=":material/pause_circle:")
    elif exc.kind in ("invalid_parameter", "prompt_too_long", "rejected", "config"):
        st.warning(exc.user_message, icon=":material/edit:")
    else:
        st.error(exc.user_message, icon=":material/error:")


def show_thinking(where, reasoning: str, live: bool = False) -> None:
    """A reasoning model's thinking in its own expander (open while it thinks), never mixed
    into the answer. ``where`` is ``st`` or a container; nothing is drawn without thinking."""
    if not reasoning:
        return
    label = "Thinking…" if live else "Thinking"
    where.expander(label, expanded=live, icon=":material/psychology:").markdown(reasoning)
