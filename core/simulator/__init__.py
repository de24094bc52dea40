"""An OpenAI-compatible chat completions server with deterministic text, latency and fault injection."""

from core.simulator.faults import ApiError, FaultError, Simulator
from core.simulator.server import MODELS, RunningServer, build_app, serve, start_in_background

__all__ = ["MODELS", "ApiError", "FaultError", "RunningServer", "Simulator", "build_app", "serve",
           "start_in_background"]
