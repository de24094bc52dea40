"""The OpenAI simulator, exercised over real HTTP with the real openai SDK."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import threading
import time

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import tokens
from core.simulator import MODELS, Simulator, start_in_background, textgen
from tests.support import wait_for

PROMPT = [{"role": "user", "content": "Write onboarding emails for a fitness app."}]
TOPICS = ["gardening", "volcanoes", "bookkeeping", "sailing", "origami", "beekeeping", "chess", "pottery"]


def client_for(running, timeout: float = 10.0) -> openai.OpenAI:
    return _client(running.base_url, timeout)


@functools.lru_cache(maxsize=None)
def _client(base_url: str, timeout: float) -> openai.OpenAI:
    # Building a client costs ~0.1 s (TLS context); reusing one keeps the file fast.
    return openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=timeout)


@functools.lru_cache(maxsize=None)
def http() -> httpx2.Client:
    return httpx2.Client(timeout=10)


def chat(running, **kwargs):
    kwargs.setdefault("model", "gpt-4o-mini")
    kwargs.setdefault("messages", PROMPT)
    return client_for(running).chat.completions.create(**kwargs)


def raw_post(running, path: str, content: bytes | str) -> httpx2.Response:
    return http().post(running.url + path, content=content, headers={"content-type": "application/json"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ----- completions


def test_plain_completion_has_openai_shape_and_real_token_counts(simulator):
    resp = chat(simulator)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-4o-mini"
    assert isinstance(resp.created, int)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    content = choice.message.content
    assert resp.usage.prompt_tokens == tokens.count_messages(PROMPT, "gpt-4o-mini")
    assert resp.usage.completion_tokens == tokens.count_text(content, "gpt-4o-mini")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert 40 <= resp.usage.completion_tokens <= 300
    assert "lorem" not in content.lower()
    assert simulator.sim.stats()["chat_requests"] == 1


def test_stream_matches_plain_response_and_ends_with_usage_chunk(simulator):
    plain = chat(simulator, seed=7)
    chunks = list(chat(simulator, seed=7, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, finish, usage_chunk = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == plain.choices[0].message.content
    assert finish.choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == plain.usage.model_dump()
    # Roughly one token per chunk.
    assert len(content_chunks) >= plain.usage.completion_tokens * 0.5
    stats = simulator.sim.stats()
    assert (stats["streams_started"], stats["streams_completed"], stats["streams_disconnected"]) == (1, 1, 0)


def test_stream_wire_format(simulator):
    body = {"model": "gpt-4o", "messages": PROMPT, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 5}
    resp = raw_post(simulator, "/v1/chat/completions", json.dumps(body))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


def test_stream_without_include_usage_sends_no_usage(simulator):
    resp = raw_post(simulator, "/v1/chat/completions", json.dumps({"messages": PROMPT, "stream": True}))
    chunks = [json.loads(e.removeprefix("data: ")) for e in resp.text.split("\n\n") if e and "[DONE]" not in e]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)
    assert resp.text.endswith("data: [DONE]\n\n")


def test_same_request_gives_same_text_and_seeds_vary_it(simulator):
    def text(**kw):
        return chat(simulator, temperature=0.7, **kw).choices[0].message.content

    assert text(seed=1) == text(seed=1)
    assert text() == text()
    assert len({text(seed=s) for s in range(5)}) > 1


def test_max_tokens_cuts_at_word_boundary_with_length_finish(simulator):
    full = chat(simulator, seed=3).choices[0].message.content
    for params in ({"max_tokens": 12}, {"max_completion_tokens": 12}):
        resp = chat(simulator, seed=3, **params)
        content = resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.completion_tokens <= 12
        assert full.startswith(content) and full[len(content)] == " "
    streamed = chat(simulator, seed=3, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content


def test_reply_reuses_topic_words_of_last_user_message(simulator):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me about chess openings."},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": [{"type": "text", "text": "Explain sourdough bread fermentation, please."}]},
    ]
    content = chat(simulator, messages=messages).choices[0].message.content.lower()
    assert sum(word in content for word in ("sourdough", "bread", "fermentation")) >= 2
    assert "chess" not in content


@settings(max_examples=40, deadline=None)
@given(max_tokens=st.integers(min_value=1, max_value=300), seed=st.integers(0, 10**6))
def test_truncate_keeps_a_word_prefix_within_budget(max_tokens, seed):
    text = textgen.generate("gpt-4o-mini", PROMPT, seed=seed)
    cut, was_cut = textgen.truncate(text, max_tokens, "gpt-4o-mini")
    assert text.startswith(cut) and "".join(textgen.pieces(text)) == text
    assert tokens.count_text(cut, "gpt-4o-mini") <= max_tokens
    assert was_cut == (tokens.count_text(text, "gpt-4o-mini") > max_tokens)


def test_models_route_lists_served_models(simulator):
    client = client_for(simulator)
    assert [m.id for m in client.models.list()] == list(MODELS)
    assert MODELS == {"gpt-4o-mini": 128000, "gpt-4o": 128000, "gpt-4.1-mini": 1047576, "gpt-4.1-nano": 1047576,
                      "o4-mini": 200000, "gpt-oss-20b": 131072}
    assert client.models.retrieve("gpt-4.1-nano").id == "gpt-4.1-nano"


def test_unknown_model_is_404_model_not_found(simulator):
    with pytest.raises(openai.NotFoundError) as info:
        chat(simulator, model="gpt-9")
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert info.value.body["message"] == "The model `gpt-9` does not exist or you do not have access to it."
    assert info.value.type == "invalid_request_error"


def test_prompt_over_context_window_is_400(simulator):
    huge = [{"role": "user", "content": "fitness " * 130_000}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(simulator, messages=huge)
    assert info.value.code == "context_length_exceeded"
    assert chat(simulator, model="gpt-4.1-nano", messages=huge, max_tokens=5).choices[0].finish_reason == "length"


# ----- bad input


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"messages": PROMPT, "max_tokens": "10"}, "max_tokens"),
        ({"messages": PROMPT, "max_tokens": 2.5}, "max_tokens"),
        ({"messages": PROMPT, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"messages": PROMPT, "temperature": 3}, "temperature"),
        ({"messages": PROMPT, "temperature": "hot"}, "temperature"),
        ({"messages": PROMPT, "top_p": 1.5}, "top_p"),
        ({"messages": PROMPT, "seed": "x"}, "seed"),
        ({"messages": PROMPT, "stream": "yes"}, "stream"),
        ({"messages": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": PROMPT, "model": 4}, "model"),
    ],
)
def test_bad_input_is_400_invalid_request_and_server_keeps_serving(simulator, body, param):
    resp = raw_post(simulator, "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert chat(simulator).choices[0].finish_reason == "stop"


def test_sdk_raises_bad_request_for_invalid_temperature(simulator):
    with pytest.raises(openai.BadRequestError) as info:
        chat(simulator, temperature=2.5)
    assert info.value.param == "temperature" and info.value.code == "decimal_above_max_value"


def test_unknown_route_gets_openai_error_body(simulator):
    resp = http().get(simulator.url + "/v1/nope")
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"


# ----- faults


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_error_rate_raises_internal_server_error_with_status(simulator, status):
    simulator.sim.set_faults(error_rate=1.0, error_status=status)
    with pytest.raises(openai.InternalServerError) as info:
        chat(simulator)
    assert info.value.status_code == status and info.value.type == "server_error"


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_fail_next_fails_exactly_n_requests(simulator, status, exc_type):
    simulator.sim.set_faults(fail_next=2, fail_status=status)
    for _ in range(2):
        with pytest.raises(exc_type) as info:
            chat(simulator)
        assert info.value.status_code == status
    assert chat(simulator).choices[0].finish_reason == "stop"
    assert simulator.sim.faults()["fail_next"] == 0
    assert simulator.sim.stats()["chat_requests"] == 3


def test_rate_limit_sends_retry_after_in_all_three_forms(simulator):
    sim = simulator.sim
    sim.set_faults(rate_limit_rate=1.0, retry_after_s=7)
    with pytest.raises(openai.RateLimitError) as info:
        chat(simulator)
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"
    assert info.value.response.headers["retry-after"] == "7"

    sim.set_faults(retry_after_s=None, retry_after_ms=1500)
    with pytest.raises(openai.RateLimitError) as info:
        chat(simulator)
    assert info.value.response.headers["retry-after-ms"] == "1500"
    assert "retry-after" not in info.value.response.headers

    sim.set_faults(retry_after_ms=None, retry_after_s=120, retry_after_http_date=True)
    with pytest.raises(openai.RateLimitError) as info:
        chat(simulator)
    when = email.utils.parsedate_to_datetime(info.value.response.headers["retry-after"])
    assert 100 <= when.timestamp() - time.time() <= 125


def test_quota_exhausted_is_429_insufficient_quota(simulator):
    simulator.sim.set_faults(quota_exhausted=True)
    with pytest.raises(openai.RateLimitError) as info:
        chat(simulator)
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers


def test_auth_error_is_401_invalid_api_key(simulator):
    simulator.sim.set_faults(auth_error=True)
    with pytest.raises(openai.AuthenticationError) as info:
        chat(simulator)
    assert info.value.code == "invalid_api_key"


def test_error_rate_fails_a_fraction_of_requests(simulator):
    simulator.sim.set_faults(error_rate=0.5, error_status=502)
    outcomes = []
    for _ in range(40):
        try:
            chat(simulator, max_tokens=1)
            outcomes.append("ok")
        except openai.InternalServerError as exc:
            outcomes.append(exc.status_code)
    assert 5 <= outcomes.count(502) <= 35 and outcomes.count("ok") == 40 - outcomes.count(502)


def test_concurrent_streams_each_get_their_own_complete_reply(simulator):
    simulator.sim.set_latency(ttft_ms=20, tokens_per_s=1000)

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=simulator.base_url, api_key="sk-test", max_retries=0)
        async with client:
            async def one(topic: str) -> str:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"Explain {topic}."}], stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return await asyncio.gather(*(one(t) for t in TOPICS))

    replies = asyncio.run(run())
    assert all(topic in reply.lower() for topic, reply in zip(TOPICS, replies))
    stats = simulator.sim.stats()
    assert stats["streams_completed"] == len(TOPICS) and stats["in_flight"] == 0


def test_slow_response_times_out_the_client_and_server_notices(simulator):
    simulator.sim.set_faults(slow_s=30)
    client = client_for(simulator, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert time.monotonic() - started < 2
    assert wait_for(lambda: simulator.sim.stats()["in_flight"] == 0)
    assert simulator.sim.stats()["disconnected"] == 1


def test_drop_after_chunks_cuts_the_stream_mid_way(simulator):
    simulator.sim.set_faults(drop_after_chunks=3)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in chat(simulator, stream=True, stream_options={"include_usage": True}):
            received.append(chunk)
    assert [c.choices[0].delta.role for c in received[:1]] == ["assistant"]
    assert len([c for c in received if c.choices and c.choices[0].delta.content]) == 3
    assert all(c.choices[0].finish_reason is None for c in received)
    stats = simulator.sim.stats()
    assert (stats["streams_dropped"], stats["streams_completed"]) == (1, 0)
    assert chat(simulator).choices[0].finish_reason == "stop"


def test_outage_follows_the_injected_clock():
    clock = FakeClock()
    with start_in_background(Simulator(clock=clock)) as running:
        running.sim.outage_for(30)
        with pytest.raises(openai.InternalServerError) as info:
            chat(running)
        assert info.value.status_code == 503
        clock.now += 29
        assert running.sim.faults()["outage_remaining_s"] == pytest.approx(1)
        with pytest.raises(openai.InternalServerError):
            chat(running)
        clock.now += 2
        assert chat(running).choices[0].finish_reason == "stop"

        assert http().post(running.url + "/_sim/faults", json={"outage_s": 10}).status_code == 200
        with pytest.raises(openai.InternalServerError):
            chat(running)
        clock.now += 10
        assert chat(running).choices[0].finish_reason == "stop"


def test_client_closing_a_stream_early_counts_as_disconnected(simulator):
    simulator.sim.set_latency(tokens_per_s=20)
    stream = chat(simulator, stream=True)
    for _ in range(2):
        next(stream)
    stream.close()
    assert wait_for(lambda: simulator.sim.stats()["streams_disconnected"] == 1)
    stats = simulator.sim.stats()
    assert (stats["streams_started"], stats["streams_completed"]) == (1, 0)
    assert wait_for(lambda: simulator.sim.stats()["in_flight"] == 0)


def test_latency_delays_first_token_and_paces_tokens(simulator):
    simulator.sim.set_latency(ttft_ms=150, tokens_per_s=400)
    started = time.monotonic()
    stream = chat(simulator, stream=True, max_tokens=40)
    next(stream)
    first = time.monotonic() - started
    rest = list(stream)
    total = time.monotonic() - started
    assert 0.14 <= first < 1.0
    assert total - first >= 0.05 and len(rest) > 10
    started = time.monotonic()
    chat(simulator, max_tokens=5)
    assert time.monotonic() - started >= 0.15


def test_stop_interrupts_a_slow_request():
    running = start_in_background()
    running.sim.set_faults(slow_s=60)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_attempt(running)))
    worker.start()
    assert wait_for(lambda: running.sim.stats()["in_flight"] == 1)
    started = time.monotonic()
    running.stop()
    worker.join(5)
    assert time.monotonic() - started < 3 and outcome and outcome[0] != "ok"


def _attempt(running) -> str:
    try:
        chat(running)
        return "ok"
    except openai.APIError as exc:
        return type(exc).__name__


# ----- control


def test_http_control_routes(simulator):
    base = simulator.url
    patched = http().post(base + "/_sim/faults", json={"fail_next": 1, "fail_status": 502}).json()
    assert patched["fail_next"] == 1 and patched["fail_status"] == 502
    assert http().get(base + "/_sim/faults").json()["fail_next"] == 1
    with pytest.raises(openai.InternalServerError) as info:
        chat(simulator)
    assert info.value.status_code == 502

    for bad in ({"bogus": 1}, {"error_rate": 2}, {"error_status": 418}, {"quota_exhausted": "yes"}):
        resp = http().post(base + "/_sim/faults", json=bad)
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == next(iter(bad))
    assert http().post(base + "/_sim/faults", content=b"{oops").status_code == 400

    http().post(base + "/_sim/faults", json={"auth_error": True})
    assert http().delete(base + "/_sim/faults").json()["auth_error"] is False
    assert chat(simulator).choices[0].finish_reason == "stop"

    latency = http().post(base + "/_sim/latency", json={"ttft_ms": 5, "tokens_per_s": 1000}).json()
    assert latency == {"ttft_ms": 5, "tokens_per_s": 1000} == simulator.sim.latency()
    assert http().post(base + "/_sim/latency", json={"ttft": 5}).status_code == 400

    stats = http().get(base + "/_sim/stats").json()
    assert stats["chat_requests"] == 2 and stats["errors"] == 1 and stats["in_flight"] == 0
    assert {"streams_started", "streams_completed", "streams_disconnected"} <= set(stats)


def test_python_api_validates_fault_settings():
    sim = Simulator()
    with pytest.raises(ValueError, match="unknown"):
        sim.set_faults(eror_rate=0.5)
    with pytest.raises(ValueError, match="error_rate"):
        sim.set_faults(error_rate=1.5)
    with pytest.raises(ValueError, match="retry_after_s"):
        sim.set_faults(retry_after_http_date=True)
    with pytest.raises(ValueError, match="fail_status"):
        sim.set_faults(fail_status=200)
    with pytest.raises(ValueError, match="tokens_per_s"):
        sim.set_latency(tokens_per_s=-1)
    sim.set_faults(fail_next=2)
    sim.set_faults(slow_s=0.5)
    assert sim.faults()["fail_next"] == 2  # patch semantics: earlier fields stay
    sim.clear_faults()
    assert sim.faults()["fail_next"] == 0 and sim.faults()["slow_s"] == 0


def test_reply_text_answers_verbatim_streamed_or_not_and_is_cut_at_max_tokens(simulator):
    reply = "Plans cost $5 or $10.\n\n![chart](http://127.0.0.1:9/x.png)\n\n```\necho $HOME\n```"
    simulator.sim.set_faults(reply_text=reply)
    client = client_for(simulator)
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert plain.choices[0].message.content == reply
    chunks = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    short = client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.startswith(short.choices[0].message.content) and short.choices[0].finish_reason == "length"
    with pytest.raises(ValueError, match="reply_text must be text"):
        simulator.sim.set_faults(reply_text=42)
    simulator.sim.clear_faults()
    assert simulator.sim.faults()["reply_text"] is None


def test_the_rate_limit_counts_what_each_window_let_through_and_refused():
    clock = FakeClock()
    with start_in_background(Simulator(clock=clock)) as running:
        running.sim.set_faults(rate_limit_requests=2, rate_limit_window_s=10)
        for _ in range(2):
            chat(running)
        with pytest.raises(openai.RateLimitError):
            chat(running)
        clock.now += 10                              # the next window
        chat(running)
        windows = http().get(running.url + "/_sim/rate_limit").json()["windows"]
        assert windows == [{"start": 1000.0, "requests": 2, "refused": 1},
                           {"start": 1010.0, "requests": 1, "refused": 0}]
        running.sim.reset_stats()                    # the window running keeps its count
        assert running.sim.rate_limit_windows() == [{"start": 1010.0, "requests": 1, "refused": 0}]
