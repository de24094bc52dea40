"""The Generate page under AppTest, on the app's own simulator over real HTTP."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

import core.service

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
from core.breaker import OPEN


@pytest.fixture
def app(app_env):
    gyro = core.service.default_service()
    gyro.settings.set_many({"retry.max_retries": 0}, actor="test")
    at = AppTest.from_file(str(ROOT / "pages" / "generate.py"), default_timeout=30)
    at.run()
    yield at, gyro


def generate(at, prompt="Write a welcome email for a yoga studio"):
    at.text_area(key="prompt").input(prompt).run()
    at.button(key="go").click().run()
    return at


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info]
    parts += [s.value for s in at.success]
    return "\n".join(str(p) for p in parts)


def test_simulator_banner_and_disabled_button_for_an_empty_prompt(app):
    at, _ = app
    assert "Simulated responses — set OPENAI_API_KEY" in texts(at)
    assert at.button(key="go").disabled
    assert not at.exception


def test_a_prompt_produces_the_simulators_text_and_a_history_row(app):
    at, gyro = app
    generate(at)
    assert not at.exception
    gyro.db.flush()
    [row] = gyro.db.query("SELECT * FROM requests")
    assert row["source"] == "page" and row["outcome"] == "ok"
    content = at.session_state["generations"][-1]["content"]
    assert "yoga studio" in content.lower() or "yoga" in content.lower()
    assert content in texts(at)
    assert f"{row['prompt_tokens']:,} + {row['completion_tokens']:,} tokens" in texts(at)


def test_second_identical_request_shows_the_cache_badge_and_regenerate_bypasses(app):
    at, gyro = app
    generate(at)
    at.button(key="go").click().run()
    assert "From cache — saved $" in texts(at)
    calls = gyro.provider.sim.stats()["chat_requests"]
    at.button(key="regen").click().run()
    assert gyro.provider.sim.stats()["chat_requests"] == calls + 1
    assert not at.exception


@pytest.mark.parametrize("faults,message", [
    ({"auth_error": True}, "API key was refused"),
    ({"quota_exhausted": True}, "run out of quota"),
    ({"fail_next": 1, "fail_status": 503}, "internal error"),
    ({"fail_next": 1, "fail_status": 429}, "rate limiting"),
    ({"fail_next": 1, "fail_status": 400}, "refused the request"),
])
def test_each_fault_shows_its_plain_message_and_no_exception(app, faults, message):
    at, gyro = app
    gyro.provider.sim.set_faults(**faults)
    generate(at)
    assert not at.exception
    assert message in texts(at)


def test_unknown_model_is_explained(app):
    at, gyro = app
    gyro.settings.set("provider.extra_models", "gpt-nope")
    at.run()
    at.selectbox(key="model").select("gpt-nope").run()
    generate(at)
    assert "'gpt-nope' was not found" in texts(at) and not at.exception


def test_open_breaker_shows_the_countdown_not_an_exception(app):
    at, gyro = app
    gyro.breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    generate(at)
    assert not at.exception
    assert "paused after repeated failures — next try in" in texts(at)
    assert gyro.breakers.get("simulator", "gpt-4o-mini").info()["state"] == OPEN


def test_a_too_long_prompt_is_refused_before_sending(app):
    at, gyro = app
    at.text_area(key="prompt").input("word " * 130_000).run()
    assert at.button(key="go").disabled
    assert "exceeds gpt-4o-mini's limit of 128,000" in texts(at)
    assert gyro.provider.sim.stats()["chat_requests"] == 0


def test_optimize_toggle_shows_the_saving(app):
    at, _ = app
    at.text_area(key="prompt").input(
        "Could you please kindly write a short   poem about the sea? Thank you so much in advance!").run()
    at.toggle(key="optimize").set_value(True).run()
    assert "Optimized prompt saves" in texts(at) and not at.exception


@pytest.mark.parametrize("env,message", [
    ({"OPENAI_BASE_URL": "localhost:8000"}, "OPENAI_BASE_URL='localhost:8000' is not a usable http(s) URL"),
    ({"GYROSCOPE_DB": "CORRUPT"}, "not a valid SQLite database"),
])
def test_bad_configuration_or_database_is_a_message_not_a_traceback(app_env, tmp_path, monkeypatch,
                                                                  env, message):
    for name, value in env.items():
        if value == "CORRUPT":
            bad = tmp_path / "bad.db"
            bad.write_bytes(b"garbage" * 1000)
            value = str(bad)
        monkeypatch.setenv(name, value)
    for page in ("generate.py", "metrics.py", "settings.py"):
        at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=30).run()
        assert not at.exception, page
        assert message in texts(at), page
