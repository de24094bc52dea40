"""The conversation request and the drop-in OpenAI gateway (/v1), over real HTTP with the
real openai SDK against the simulator."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from core.cache import cache_key
from core.models import GenerationRequest
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
    assert json.loads(call.function.arguments) == {"city": "weather", "unit": "celsius"}
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
