"""The conversation request and the drop-in OpenAI gateway (/v1), over real HTTP with the
real openai SDK against the simulator."""

from __future__ import annotations

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
