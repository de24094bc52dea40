"""The `simulator` provider: the built-in OpenAI-compatible server, started in-process."""

from __future__ import annotations

import os
import threading
import weakref

from .openai_provider import OpenAIProvider

_lock = threading.Lock()
_running = None


def shared_simulator():
    """The process's simulator server, started on a free loopback port on first use."""
    global _running
    with _lock:
        if _running is None:
            from ..simulator import Simulator, start_in_background
            ttft = float(os.environ.get("GYROSCOPE_SIM_TTFT_MS", 150))
            tps = float(os.environ.get("GYROSCOPE_SIM_TOKENS_PER_S", 60))
            _running = start_in_background(Simulator(ttft_ms=ttft, tokens_per_s=tps))
        return _running


class SimulatorProvider(OpenAIProvider):
    """The real openai SDK talking to the built-in simulator over loopback HTTP.

    The server starts on first use, so commands that never generate never start it.
    """

    name = "simulator"

    def __init__(self, running=None) -> None:  # noqa: D107 - no super().__init__: base_url is lazy
        self._running = running
        self._api_key = "sk-simulator"
        self._clients = weakref.WeakKeyDictionary()
        self._sync_client = None

    @property
    def running(self):
        if self._running is None:
            self._running = shared_simulator()
        return self._running

    @property
    def base_url(self) -> str:
        return self.running.base_url

    @property
    def _url(self) -> str:
        return self.running.base_url

    @property
    def upstream_id(self) -> str:
        # The port changes per process; the breaker is shared by name across processes.
        return "simulator"

    @property
    def sim(self):
        """The simulator's fault-injection and latency controls."""
        return self.running.sim

    def context_window(self, model: str) -> int | None:
        from ..simulator import MODELS
        return MODELS.get(model)
