"""Upstream oddities seen against LiteLLM's proxy, llama.cpp's server and reasoning models:
the simulator sends each one over real HTTP to the real openai client, time is a FakeClock."""

from __future__ import annotations

import json
import math
import threading

import pytest

import core.service
from core import errors, tokens
from core.models import Thinking
from core.retry import MAX_RETRY_AFTER_S, parse_retry_after
from core.simulator import Simulator, start_in_background
from core.simulator.textgen import thinking
from tests.support import FakeClock, wait_for
from tests.test_foundation import api  # noqa: F401 - the API over real HTTP, as a fixture
from tests.test_pipeline import make_gyro, req, rows


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def gyro(tmp_path, simulator, clock):
    # The consecutive rule, so a test can see one failure counted (the rate rule's window
    # is asserted in tests/test_breaker.py).
    g = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive"})
    yield g
    g.close()


def breaker_info(gyro) -> dict:
    return gyro.breakers.get("simulator", "gpt-4o-mini").info()


def strict_json(text: str):
    """json.loads that refuses Infinity and NaN, as every other JSON parser does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# -- a malformed body or SSE line -------------------------------------------------------------
def test_a_malformed_body_is_retried_and_counted_by_the_breaker(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 2})
    simulator.sim.set_faults(malformed_next=1)
    result = gyro.generate(req(cache=False))          # the sync (blocking) client
    assert (result.outcome, result.attempts, clock.slept) == ("ok", 2, [1])
    gyro.settings.set_many({"retry.max_retries": 0}, actor="test")
    simulator.sim.set_faults(malformed_next=2)
    for _ in range(2):
        with pytest.raises(errors.MalformedResponse) as info:
            gyro.generate(req(cache=False))
        assert "garbled answer" in info.value.user_message
        assert "unexpected" not in info.value.user_message
    assert breaker_info(gyro)["state"] == "open"       # two failures in a row at fail_max 2
    kinds = [r["error_kind"] for r in rows(gyro)]
    assert kinds == [None, "malformed_response", "malformed_response"]
    gyro.close()


def test_a_malformed_sse_line_is_retried_before_the_first_token_and_cuts_the_stream_after(gyro, simulator,
                                                                                        clock):
    simulator.sim.set_faults(malformed_next=1, malformed_after_chunks=0)
    stream = gyro.stream(req(cache=False))             # the async client, streaming
    text = "".join(stream)
    assert text and stream.result.attempts == 2 and clock.slept == [1]
    simulator.sim.set_faults(malformed_next=1, malformed_after_chunks=3)
    stream = gyro.stream(req(cache=False))
    got = []
    with pytest.raises(errors.StreamInterrupted):
        for piece in stream:
            got.append(piece)
    assert len(got) == 3 and stream.result.content == "".join(got)
    last = rows(gyro)[-1]
    assert (last["outcome"], last["error_kind"], last["attempts"]) == ("error", "stream_interrupted", 1)
    assert breaker_info(gyro)["fail_counter"] == 1     # the cut counts against the upstream


# -- Retry-After as LiteLLM forwards it, and odd values ------------------------------------------
@pytest.mark.parametrize("faults,expected", [
    ({"retry_after_s": 3}, 3.0),
    ({"retry_after_ms": 1500}, 1.5),
])
def test_retry_after_forwarded_by_litellm_sets_the_wait(gyro, simulator, clock, faults, expected):
    simulator.sim.set_faults(fail_next=1, fail_status=429, retry_after_forwarded=True, **faults)
    result = gyro.generate(req())
    assert result.attempts == 2 and clock.slept == [expected]


@pytest.mark.parametrize("raw,slept", [
    ("-5", [1]), ("soon", [1]), ("nan", [1]),    # not a wait: our own backoff (1 s)
    ("2.5", [2.5]),
])
def test_odd_retry_after_values_are_ignored(gyro, simulator, clock, raw, slept):
    simulator.sim.set_faults(fail_next=1, fail_status=503, retry_after_raw=raw)
    assert gyro.generate(req()).attempts == 2 and clock.slept == slept


@pytest.mark.parametrize("raw", ["inf", "1e400", "Infinity", "99999999"])
def test_huge_retry_after_values_are_cut_to_an_hour(gyro, simulator, clock, raw):
    simulator.sim.set_faults(fail_next=1, fail_status=429, retry_after_raw=raw)
    with pytest.raises(errors.RetryLater) as info:
        gyro.generate(req())
    assert info.value.retry_in_s == MAX_RETRY_AFTER_S and clock.slept == []
    assert strict_json(json.dumps(info.value.as_dict()))["retry_in_s"] == MAX_RETRY_AFTER_S


def test_no_wait_is_ever_infinite_or_negative():
    for value in ("inf", "1e400", "-inf", "nan", "-1", "Thu, 01 Jan 1970 00:00:00 GMT", "x"):
        for name in ("retry-after", "retry-after-ms", "llm_provider-retry-after",
                     "llm_provider-retry-after-ms"):
            wait = parse_retry_after({name: value})
            assert wait is None or (math.isfinite(wait) and 0 <= wait <= MAX_RETRY_AFTER_S)
    assert errors.RetryLater(retry_in_s=float("inf")).as_dict()["retry_in_s"] is None
    assert parse_retry_after({"retry-after": "soon", "llm_provider-retry-after": "4"}) == 4.0


def test_an_infinite_retry_after_through_the_api_is_valid_json(api):
    url, gyro = api
    gyro.settings.set_many({"retry.max_retries": 1}, actor="test")
    gyro.provider.sim.set_faults(error_rate=1.0, error_status=503, retry_after_raw="inf")
    status, headers, body = _post(url + "/api/generate", {"prompt": "Hi", "cache": False})
    error = strict_json(body)["error"]
    assert status == 503 and error["kind"] == "retry_later" and error["retry_in_s"] == MAX_RETRY_AFTER_S
    assert headers["Retry-After"] == str(int(MAX_RETRY_AFTER_S))
    status, _, body = _post(url + "/api/generate", {"prompt": "Hi", "cache": False, "stream": True})
    events = [block for block in body.decode().split("\n\n") if block.strip()]
    assert status == 200 and events[-1].startswith("event: error")
    for event in events:
        strict_json(event.split("data: ", 1)[1])


# -- Stop closes the upstream before any token counting -----------------------------------------
def test_stop_closes_the_upstream_connection_before_counting_tokens(gyro, simulator, monkeypatch):
    simulator.sim.set_latency(ttft_ms=0, tokens_per_s=50)
    seen: list[bool] = []

    def closed_yet() -> bool:
        # The simulator notices a closed connection on its own thread, soon (slowly on a
        # loaded machine: 2 s was once not enough). Were the connection still open while we
        # count, it would never see one: the answer streams on to its end.
        return wait_for(lambda: simulator.sim.stats()["streams_disconnected"] > 0)

    def watching(count):
        def counted(*args, **kwargs):
            # The simulator counts tokens too (to pace its stream), on its own thread.
            ours = not threading.current_thread().name.startswith("simulator:")
            with lock:
                if ours and stopping.is_set() and not seen:
                    seen.append(closed_yet())
            return count(*args, **kwargs)
        return counted

    stopping, lock = threading.Event(), threading.RLock()
    monkeypatch.setattr(tokens, "count_text", watching(tokens.count_text))
    monkeypatch.setattr(tokens, "count_messages", watching(tokens.count_messages))
    stream = gyro.stream(req(cache=False))
    got = [next(stream), next(stream)]
    stopping.set()
    stream.close()
    assert seen == [True]          # tokens were counted, and only after the connection closed
    [row] = rows(gyro)
    assert row["outcome"] == "cancelled" and row["completion_tokens"] >= 1
    assert stream.result.content == "".join(got)


# -- reasoning models ---------------------------------------------------------------------------
def test_thinking_is_not_silence_and_stays_apart_from_the_answer(tmp_path, simulator, clock):
    # The whole thinking (4 x 0.3 s) outlasts the request's deadline (1 s): it must not be
    # cut, because a thought ends the "nothing came back" phase.
    gyro = make_gyro(tmp_path, simulator, clock, **{"retry.deadline_s": 1, "timeout.read_s": 0.8})
    simulator.sim.set_faults(reasoning_chunks=4, reasoning_pause_s=0.3)
    stream = gyro.stream(req(), events=True)
    events = [e for e in stream if e is not None]
    thoughts = [e.text for e in events if isinstance(e, Thinking)]
    text = [e for e in events if isinstance(e, str)]
    assert thoughts == thinking(4)
    assert isinstance(events[0], Thinking) and isinstance(events[-1], str)   # thinking came first
    result = stream.result
    assert (result.outcome, result.attempts, clock.slept) == ("ok", 1, [])
    assert result.reasoning == "".join(thinking(4)) and result.content == "".join(text)
    assert not any(t in result.content for t in thinking(4))
    assert result.as_dict()["reasoning"] == result.reasoning
    again = gyro.generate(req())              # the cache keeps the answer, never the thinking
    assert again.from_cache and again.content == result.content and again.reasoning == ""
    gyro.close()


def test_thinking_under_the_reasoning_field_in_a_plain_answer(gyro, simulator):
    simulator.sim.set_faults(reasoning_chunks=2, reasoning_field="reasoning")
    result = gyro.generate(req(cache=False))
    assert result.reasoning == "".join(thinking(2))
    assert result.content and thinking(2)[0] not in result.content


def test_thinking_reaches_the_api_as_its_own_events(api):
    url, gyro = api
    gyro.provider.sim.set_faults(reasoning_chunks=3)
    status, _, body = _post(url + "/api/generate", {"prompt": "Hi", "stream": True, "cache": False})
    events = [block.split("\n", 1) for block in body.decode().split("\n\n") if block.strip()]
    kinds = [head.removeprefix("event: ") for head, _ in events]
    data = [strict_json(rest.removeprefix("data: ")) for _, rest in events]
    assert kinds[:3] == ["reasoning"] * 3 and "delta" in kinds and kinds[-1] == "done"
    assert "".join(d["text"] for k, d in zip(kinds, data) if k == "reasoning") == "".join(thinking(3))
    done = data[-1]
    assert done["reasoning"] == "".join(thinking(3))
    assert done["content"] == "".join(d["text"] for k, d in zip(kinds, data) if k == "delta")


def test_the_generate_page_shows_the_thinking_apart(app_env):
    from streamlit.testing.v1 import AppTest
    from tests.test_generate_page import ROOT
    gyro = core.service.default_service()
    gyro.provider.sim.set_faults(reasoning_chunks=3)
    at = AppTest.from_file(str(ROOT / "pages" / "generate.py"), default_timeout=30).run()
    at.text_area(key="prompt").input("Write a welcome email for a yoga studio").run()
    at.button(key="go").click().run()
    assert not at.exception
    entry = at.session_state["generations"][-1]
    assert entry["reasoning"] == "".join(thinking(3)) and entry["content"]
    [box] = [e for e in at.expander if e.label.startswith("Thinking")]
    assert "".join(thinking(3)).strip() in [m.value for m in box.markdown]
    assert thinking(3)[0] not in entry["content"]


def test_the_settings_page_rehearses_a_loading_model_and_a_reasoning_model(app_env):
    from tests.test_settings_page import page, run, messages
    gyro = core.service.default_service()
    gyro.settings.set_many({"retry.max_retries": 0}, actor="test")    # no real backoff waits
    at = page()
    at.number_input(key="fault:loading_model_s").set_value(30.0)
    at = run(at.button(key="fault_apply:Start loading").click())
    assert any("Model loading running" in m for m in messages(at, "warning"))
    with pytest.raises(errors.ModelLoading):
        gyro.generate(req(cache=False))
    gyro.provider.sim.clear_faults()
    at.number_input(key="fault:reasoning_chunks").set_value(2)
    at.number_input(key="fault:reasoning_pause_s").set_value(0.0)
    at = run(at.button(key="fault_apply:Think first").click())
    assert any("`reasoning_chunks` 2" in m for m in messages(at, "markdown"))
    assert gyro.generate(req(cache=False)).reasoning == "".join(thinking(2))


# -- 503 "Loading model" ------------------------------------------------------------------------
@pytest.fixture
def loading(tmp_path, clock):
    running = start_in_background(Simulator(clock=clock.monotonic))
    gyro = make_gyro(tmp_path, running, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 2})
    yield running.sim, gyro
    gyro.close()
    running.stop()


def test_a_loading_model_is_waited_for_with_backoff(loading, clock):
    sim, gyro = loading
    sim.loading_model_for(3)
    result = gyro.generate(req(cache=False))
    assert (result.outcome, result.attempts, clock.slept) == ("ok", 3, [1, 2])
    assert breaker_info(gyro)["state"] == "closed"


def test_retry_notices_name_the_oddity(loading, clock):
    sim, gyro = loading
    sim.loading_model_for(1)
    sim.set_faults(malformed_next=1)          # drawn only once the model has loaded
    notices = []
    assert gyro.generate(req(cache=False), on_retry=notices.append).attempts == 3
    assert [n.message.split(" — ")[0] for n in notices] == ["The model is still loading", "Garbled answer"]


def test_odd_fault_settings_are_refused_with_the_field_named(simulator):
    for patch, field in (({"retry_after_raw": "3\r\nX-Evil: 1"}, "retry_after_raw"),
                         ({"reasoning_field": "thoughts"}, "reasoning_field"),
                         ({"malformed_next": -1}, "malformed_next"),
                         ({"loading_model_s": "soon"}, "loading_model_s")):
        with pytest.raises(ValueError, match=field) as info:
            simulator.sim.set_faults(**patch)
        assert info.value.field == field
    assert simulator.sim.faults()["retry_after_raw"] is None


def test_a_long_model_load_does_not_open_the_breaker(loading, clock):
    sim, gyro = loading
    gyro.settings.set_many({"retry.max_retries": 1}, actor="test")
    sim.loading_model_for(60)
    for _ in range(4):      # eight 503s, four times the breaker's limit
        with pytest.raises(errors.ModelLoading, match="still loading the model"):
            gyro.generate(req(cache=False))
    info = breaker_info(gyro)
    assert (info["state"], info["fail_counter"]) == ("closed", 0)
    assert {r["error_kind"] for r in rows(gyro)} == {"model_loading"}
    clock.advance(60)
    assert gyro.generate(req(cache=False)).attempts == 1


# -- the HTTP API, served over real HTTP -------------------------------------------------------------
def _post(url: str, body: dict) -> tuple[int, object, bytes]:
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_the_command_line_prints_thinking_apart_from_the_answer(app_env, capsys):
    from core.cli import main as cli_main
    from core.providers.simulator_provider import shared_simulator
    shared_simulator().sim.set_faults(reasoning_chunks=3)
    assert cli_main(["generate", "Name a colour", "--no-cache", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("[thinking] " + "".join(thinking(3))) and "[answer]" in err
    assert out.strip() and thinking(3)[0] not in out        # the answer alone on stdout


def test_settings_list_shows_each_settings_choices_and_default(app_env, capsys):
    from core.cli import main as cli_main
    assert cli_main(["settings", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("breaker.mode "))
    assert "one of rate, consecutive" in line and "default 'rate'" in line
