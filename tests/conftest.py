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


APP_ENV_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_PROVIDER", "GYROSCOPE_ADMIN_PASSWORD",
                "GYROSCOPE_API_TOKEN")


def drop_service() -> None:
    """Close and forget the process-wide service, so the next page run builds a fresh one."""
    import core.service
    if core.service._default is not None:
        core.service._default.close()
    core.service._default = None


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    """What a page or the API sees: no key (so the app's own simulator), a fresh database,
    no developer secrets file, and the shared simulator without faults or latency."""
    from core.providers.simulator_provider import shared_simulator
    for name in APP_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GYROSCOPE_DB", str(tmp_path / "app.db"))
    monkeypatch.chdir(tmp_path)  # a developer's .streamlit/secrets.toml must not leak in
    running = shared_simulator()
    running.sim.clear_faults()
    running.sim.set_latency(ttft_ms=0, tokens_per_s=0)
    running.sim.reset_stats()
    drop_service()
    yield tmp_path
    drop_service()
    running.sim.clear_faults()
