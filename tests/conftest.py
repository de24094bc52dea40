"""Shared pytest fixtures."""

import pytest

from core.simulator import start_in_background


@pytest.fixture(scope="session")
def sim_server():
    """One background OpenAI simulator for the whole test session."""
    running = start_in_background()
    yield running
    running.stop()


@pytest.fixture
def simulator(sim_server):
    """The session's simulator with no faults, no latency and zeroed counters."""
    sim_server.sim.clear_faults()
    sim_server.sim.set_latency(0, 0)
    sim_server.sim.reset_stats()
    yield sim_server
