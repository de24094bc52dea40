"""The conversation request and the drop-in OpenAI gateway (/v1), over real HTTP with the
real openai SDK against the simulator."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

import core.service

from core.cache import cache_key
from core.models import GenerationRequest
from tests.test_foundation import _post, _serve, api  # noqa: F401 - the API over real HTTP, as a fixture
from tests.test_pipeline import make_gyro
from tests.support import FakeClock


@pytest.fixture
def gyro(tmp_path, simulator):
    g = make_gyro(tmp_path, simulator, FakeClock())
    yield g
    g.close()


def rows(gyro) -> list[dict]:
    gyro.db.flush()
    return gyro.db.query("SELECT * FROM requests ORDER BY id")


TURNS = [{"role": "developer", "content": "Answer briefly."},
         {"role": "user", "content": [{"type": "text", "text": "Name a river"}]},
         {"role": "assistant", "content": "The Danube."},
         {"role": "user", "content": "Write a tagline for a lighthouse museum"}]


# -- the conversation through the one pipeline ----------------------------------------------
def test_a_conversation_is_the_request_and_prompt_plus_system_builds_one(gyro):
    convo = gyro.generate(GenerationRequest(messages=TURNS, max_tokens=40, source="test"))
    assert convo.outcome == "ok" and "lighthouse" in convo.content.lower()
    # The shortcut is the same request as its two messages.
    short = gyro.generate(GenerationRequest(prompt="Name a lake", system="Be brief.", max_tokens=20,
                                            source="test", cache=False))
    built = gyro.generate(GenerationRequest(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a lake"}],
        max_tokens=20, source="test", cache=False))
    assert short.content == built.content and short.usage == built.usage
    # Token counts cover every message, text parts included (the server agrees).
    assert convo.usage.prompt_tokens > built.usage.prompt_tokens and not convo.tokens_estimated
    assert len(rows(gyro)) == 3


def test_unknown_and_known_chat_parameters_are_forwarded_and_keyed(gyro):
    ask = dict(messages=TURNS, max_tokens=30, source="test")
    first = gyro.generate(GenerationRequest(**ask, extra={"presence_penalty": 0.5, "my_server_knob": 1}))
    assert first.outcome == "ok" and not first.from_cache
    again = gyro.generate(GenerationRequest(**ask, extra={"presence_penalty": 0.5, "my_server_knob": 1,
                                                          "user": "u-42", "metadata": {"a": "b"}}))
    assert again.from_cache    # who asks does not change the answer
    other = gyro.generate(GenerationRequest(**ask, extra={"presence_penalty": 0.6, "my_server_knob": 1}))
    assert not other.from_cache


def test_the_cache_key_covers_every_forwarded_parameter():
    base = dict(provider="p", base_url="u", model="m", messages=TURNS)
    assert cache_key(**base) == cache_key(**base, extra={})   # older keys stay valid
    keys = {cache_key(**base, extra=extra) for extra in (
        None, {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "none"},
        {"n": 2}, {"response_format": {"type": "json_object"}}, {"logit_bias": {"1": 5}})}
    assert len(keys) == 6


def test_max_completion_tokens_is_the_limit_and_keeps_its_name(gyro, simulator):
    result = gyro.generate(GenerationRequest(messages=TURNS, extra={"max_completion_tokens": 5},
                                             source="test"))
    assert result.finish_reason == "length" and result.usage.completion_tokens <= 5
    bad = GenerationRequest(messages=TURNS, extra={"max_completion_tokens": 0}, source="test")
    with pytest.raises(Exception, match="max_completion_tokens must be"):
        gyro.generate(bad)


def test_the_optimizer_rewrites_only_the_last_user_message(gyro):
    turns = [{"role": "system", "content": "Could you please be brief? Thanks in advance!"},
             {"role": "user", "content": "Could you please name a river? Thanks in advance!"},
             {"role": "assistant", "content": "The Danube."},
             {"role": "user", "content": "I would like you to write a poem about cats."}]
    result = gyro.generate(GenerationRequest(messages=turns, max_tokens=20, optimize=True, source="test"))
    assert result.prompt_sent == "Write a poem about cats." and result.optimizer["tokens_saved"] > 0
    assert turns[3]["content"].startswith("I would like")     # the caller's list is not changed
    plain = gyro.generate(GenerationRequest(messages=turns, max_tokens=20, optimize=False, source="test"))
    assert plain.prompt_sent == turns[3]["content"] and plain.optimizer is None


# -- the simulator learns tool calls, n and stop ---------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Lisbon today?"}]


def _raw(simulator):
    return openai.OpenAI(base_url=simulator.base_url, api_key="x", max_retries=0)


def test_simulator_answers_with_a_tool_call_then_with_text_after_the_result(simulator):
    client = _raw(simulator)
    first = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER, CLOCK])
    choice = first.choices[0]
    call = choice.message.tool_calls[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Lisbon", "unit": "celsius"}
    named = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER, CLOCK],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    none = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.tool_calls is None
    turns = [*ASK, choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    after = client.chat.completions.create(model="gpt-4o-mini", messages=turns, tools=[WEATHER])
    assert after.choices[0].finish_reason == "stop" and "18 C and sunny" in after.choices[0].message.content


def test_simulator_streams_tool_call_deltas(simulator):
    stream = _raw(simulator).chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER],
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather" and len(pieces) > 2
    assert json.loads("".join(p.function.arguments for p in pieces))["unit"] == "celsius"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"] and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_simulator_honours_n_and_stop(simulator):
    client = _raw(simulator)
    many = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, n=3, max_tokens=30, seed=1)
    one = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=30, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in many.choices}) == 3
    streamed = list(client.chat.completions.create(model="gpt-4o-mini", messages=ASK, n=2, max_tokens=20,
                                                   seed=1, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in range(2)]
    assert texts[0] == client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=20,
                                                      seed=1).choices[0].message.content
    assert texts[1] and texts[1] != texts[0]
    stopped = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stop=["."], seed=1)
    full = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, seed=1).choices[0].message.content
    assert stopped.choices[0].message.content == full[:full.index(".")] and stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tool_choice="auto")


def test_a_tools_round_trip_through_the_pipeline_plain_and_streamed(gyro):
    ask = dict(messages=ASK, extra={"tools": [WEATHER]}, max_tokens=40, source="test")
    plain = gyro.generate(GenerationRequest(**ask))
    assert plain.finish_reason == "tool_calls" and plain.tool_calls[0]["function"]["name"] == "get_weather"

    async def streamed():
        stream = gyro.astream(GenerationRequest(**ask), deltas=True)
        return [d async for d in stream], stream.result
    deltas, result = asyncio.run(streamed())
    assert any(d.tool_calls for d in deltas) and deltas[-1].finish_reason == "tool_calls"
    assert result.tool_calls == plain.tool_calls and result.finish_reason == "tool_calls"
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": plain.tool_calls},
             {"role": "tool", "tool_call_id": plain.tool_calls[0]["id"], "content": "18 C and sunny"}]
    answer = gyro.generate(GenerationRequest(**{**ask, "messages": turns}))
    assert answer.finish_reason == "length" and "18 C and sunny" in answer.content and answer.tool_calls is None
    again = gyro.generate(GenerationRequest(**ask))
    assert not again.from_cache          # tool calls are never stored, so never a hit
    assert [r["outcome"] for r in rows(gyro)] == ["ok"] * 4


# -- /v1 over real HTTP with the official SDK -------------------------------------------------
@pytest.fixture
def gateway(api):
    """Gyroscope's routes on a free port (test_foundation's ``api``), the app's own simulator behind them."""
    return api


def _sdk(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def _rows(gyro):
    gyro.db.flush()
    return gyro.db.query("SELECT source, outcome, from_cache, error_kind FROM requests ORDER BY id")


def test_sdk_plain_and_streamed_with_the_usage_chunk_and_answer_headers(gateway):
    url, gyro = gateway
    client = _sdk(url)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ASK, max_tokens=20)
    plain = raw.parse()
    assert plain.object == "chat.completion" and plain.choices[0].message.content
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert (raw.headers["x-gyroscope-cache"], raw.headers["x-gyroscope-attempts"]) == ("miss", "1")
    assert float(raw.headers["x-gyroscope-cost"]) > 0 and float(raw.headers["x-gyroscope-overhead-ms"]) >= 0
    again = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ASK, max_tokens=20)
    assert again.headers["x-gyroscope-cache"] == "hit" and again.headers["x-gyroscope-cost"] == "0.00000000"
    assert again.parse().choices[0].message.content == plain.choices[0].message.content
    off = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=ASK, max_tokens=20, extra_headers={"x-gyroscope-cache": "off"})
    assert off.headers["x-gyroscope-cache"] == "off"
    fresh = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=ASK, max_tokens=20, extra_headers={"x-gyroscope-cache": "refresh"})
    assert fresh.headers["x-gyroscope-cache"] == "miss"

    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=ASK, max_tokens=25, stream=True, seed=7,
            stream_options={"include_usage": True}) as response:
        assert response.headers["x-gyroscope-cache"] == "miss"
        chunks = list(response.parse())
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    no_usage = list(client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=25, stream=True,
                                                   seed=7))
    assert no_usage[-1].choices and all(c.usage is None for c in no_usage)
    assert text == "".join(c.choices[0].delta.content or "" for c in no_usage)   # the second one was a hit
    assert _rows(gyro) == [{"source": "v1", "outcome": "ok", "from_cache": hit, "error_kind": None}
                           for hit in (0, 1, 0, 0, 0, 1)]


def test_async_sdk_multi_turn_and_tools_round_trip(gateway):
    url, gyro = gateway

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        convo = await client.chat.completions.create(model="gpt-4o-mini", messages=TURNS, max_tokens=30)
        assert "lighthouse" in convo.choices[0].message.content.lower()
        called = await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER])
        call = called.choices[0].message.tool_calls[0]
        assert called.choices[0].finish_reason == "tool_calls" and called.choices[0].message.content is None
        pieces, finish = [], None
        async for chunk in await client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER],
                                                                stream=True):
            pieces += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and pieces[0].id == call.id and pieces[0].function.name == "get_weather"
        assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
        turns = [*ASK, called.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
        text = ""
        async for chunk in await client.chat.completions.create(model="gpt-4o-mini", messages=turns,
                                                                tools=[WEATHER], max_tokens=30, stream=True):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        assert "18 C and sunny" in text
        listed = [m.id async for m in client.models.list()]
        assert "gpt-4o-mini" in listed and (await client.models.retrieve("gpt-4o")).id == "gpt-4o"
        await client.close()
    asyncio.run(main())
    assert [r["outcome"] for r in _rows(gyro)] == ["ok"] * 4


def test_errors_are_the_sdks_own_classes_and_bad_input_leaves_no_row(gateway):
    url, gyro = gateway
    client = _sdk(url)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, temperature="hot")
    assert bad.value.body["param"] == "temperature" and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": 5}])
    assert bad.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="gpt-4o-mini", messages=[*ASK, {"role": "tool", "content": "18 C"}])
    with pytest.raises(openai.BadRequestError, match="user message needs content"):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user"}])
    with pytest.raises(openai.BadRequestError, match="x-gyroscope-cache"):
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"x-gyroscope-cache": "no"})
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5-imaginary", messages=ASK)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5-imaginary")
    for body in (b"{nope", b"[1, 2]", b'{"model": "gpt-4o-mini"}', b"\xff\xfe"):
        status, answer = _post(url + "/v1/chat/completions", body)
        error = json.loads(answer)["error"]
        assert status == 400 and set(error) == {"message", "type", "param", "code"}
    assert _rows(gyro) == []            # no bad input wrote a row

    gyro.settings.set_many({"retry.max_retries": 0}, actor="test")
    gyro.provider.sim.set_faults(fail_next=1, fail_status=429, retry_after_s=30)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"x-gyroscope-cache": "off"})
    assert limited.value.response.headers["retry-after"] == "30" and limited.value.code == "rate_limit_exceeded"
    gyro.provider.sim.set_faults(quota_exhausted=True, fail_next=1, fail_status=429)
    with pytest.raises(openai.RateLimitError) as quota:
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, extra_headers={"x-gyroscope-cache": "off"})
    assert quota.value.code == "insufficient_quota" and quota.value.response.headers["x-should-retry"] == "false"
    gyro.provider.sim.clear_faults()
    gyro.breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    with pytest.raises(openai.APIStatusError) as circuit:
        client.chat.completions.create(model="gpt-4o-mini", messages=ASK, stream=True)
    assert circuit.value.status_code == 503 and int(circuit.value.response.headers["retry-after"]) >= 1
    assert [(r["outcome"], r["error_kind"]) for r in _rows(gyro)] == [
        ("error", "rate_limited"), ("error", "quota_exhausted"), ("circuit_open", "circuit_open")]


def test_the_sdk_api_key_is_the_gateway_token(app_env, monkeypatch):
    monkeypatch.setenv("GYROSCOPE_API_TOKEN", "t0ken-123")
    from core.api import asgi_app
    core.service.default_service()
    url, server = _serve(asgi_app())
    try:
        with pytest.raises(openai.AuthenticationError):
            _sdk(url, api_key="wrong").chat.completions.create(model="gpt-4o-mini", messages=ASK)
        with pytest.raises(openai.AuthenticationError):
            _sdk(url, api_key="wrong").models.list()
        ok = _sdk(url, api_key="t0ken-123").chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=5)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        server.should_exit = True


def test_langchain_chat_openai_works_unchanged(gateway):
    """LangChain's ChatOpenAI (the optional `langchain` extra): plain, streamed and a tool call."""
    langchain_openai = pytest.importorskip("langchain_openai")
    url, gyro = gateway
    llm = langchain_openai.ChatOpenAI(base_url=url + "/v1", api_key="unused", model="gpt-4o-mini",
                                      max_tokens=20, max_retries=0)
    answer = llm.invoke("Write a tagline for a lighthouse museum")
    assert answer.content and answer.usage_metadata["total_tokens"] > 0
    streamed = "".join(chunk.content for chunk in llm.stream("Name a river"))
    assert streamed
    called = llm.bind_tools([WEATHER]).invoke("What is the weather in Lisbon today?")
    assert called.tool_calls[0]["name"] == "get_weather" and called.tool_calls[0]["args"]["unit"] == "celsius"
    assert [r["source"] for r in _rows(gyro)] == ["v1"] * 3


def test_n_choices_stop_and_a_stream_that_breaks(gateway):
    url, gyro = gateway
    client = _sdk(url)
    many = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, n=2, max_tokens=15, seed=3,
                                          stop="zzz", extra_body={"my_server_knob": True})
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].message.content != many.choices[1].message.content
    streamed = list(client.chat.completions.create(model="gpt-4o-mini", messages=ASK, n=2, max_tokens=15, seed=3,
                                                   stop="zzz", stream=True))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == many.choices[i].message.content
    gyro.provider.sim.set_faults(drop_after_chunks=3)
    with pytest.raises(openai.APIError, match="cut off"):
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=TURNS, stream=True):
            pass
    gyro.provider.sim.clear_faults()
    assert [(r["outcome"], r["error_kind"]) for r in _rows(gyro)] == [
        ("ok", None), ("ok", None), ("error", "stream_interrupted")]


def test_a_client_that_goes_away_mid_stream_is_a_stop_and_optimize_is_a_header(gateway):
    url, gyro = gateway
    gyro.provider.sim.set_latency(ttft_ms=0, tokens_per_s=30)
    with _sdk(url).chat.completions.create(model="gpt-4o-mini", messages=TURNS, stream=True,
                                           extra_headers={"x-gyroscope-cache": "off"}) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break           # leaving the with block closes the connection
    deadline = time.time() + 5
    while time.time() < deadline and not _rows(gyro):
        time.sleep(0.05)
    assert _rows(gyro)[0]["outcome"] == "cancelled"
    deadline = time.time() + 3
    while gyro.provider.sim.stats()["streams_disconnected"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert gyro.provider.sim.stats()["streams_disconnected"] == 1
    gyro.provider.sim.set_latency(ttft_ms=0, tokens_per_s=0)
    wordy = [{"role": "user", "content": "I would like you to write a poem about cats."}]
    client = _sdk(url)
    on = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=wordy, max_tokens=10, extra_headers={"x-gyroscope-optimize": "on"})
    off = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=wordy, max_tokens=10, extra_headers={"x-gyroscope-optimize": "off"})
    assert on.parse().usage.prompt_tokens < off.parse().usage.prompt_tokens
    assert off.headers["x-gyroscope-cache"] == "miss"     # a different prompt went upstream


def test_logprobs_pass_through_plain_and_streamed(gateway):
    url, gyro = gateway
    client = _sdk(url)
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=8, seed=2,
                                           logprobs=True, top_logprobs=2)
    entries = plain.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == plain.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.logprob < 0 for e in entries)
    streamed = [c for c in client.chat.completions.create(model="gpt-4o-mini", messages=ASK, max_tokens=8, seed=2,
                                                          logprobs=True, top_logprobs=2, stream=True) if c.choices]
    tokens = [e.token for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in entries]
    again = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ASK, max_tokens=8,
                                                             seed=2, logprobs=True, top_logprobs=2)
    assert again.headers["x-gyroscope-cache"] == "miss"       # answers with logprobs are not stored


def test_the_estimate_covers_a_whole_conversation(gyro):
    short = gyro.estimate("Write a tagline for a lighthouse museum", None, "gpt-4o-mini", 100)
    whole = gyro.estimate(None, None, "gpt-4o-mini", 100, messages=TURNS)
    answer = gyro.generate(GenerationRequest(messages=TURNS, max_tokens=5, source="test"))
    assert whole["prompt_tokens"] == answer.usage.prompt_tokens > short["prompt_tokens"]
    assert whole["max_cost"] > short["max_cost"]
