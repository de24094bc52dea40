"""What the provider puts on the wire: it posts through the SDK's client without the SDK's
body walk (see core/providers/openai_provider.py), so check that the key, the body and the
client's own headers still arrive as the SDK's ``create`` sends them, on every path."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core import errors
from core.providers.base import Timeouts
from core.providers.openai_provider import OpenAIProvider

ANSWER = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
CHUNKS = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
          {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}]


@pytest.fixture
def peer():
    """A plain HTTP server that records each request and answers like OpenAI."""
    seen: list[dict] = []
    answers: list[tuple[bytes, str]] = []      # (body, content type) to send next, else ANSWER

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            if answers:
                out, kind = answers.pop(0)
            elif body.get("stream"):
                out = "".join(f"data: {json.dumps(c)}\n\n" for c in CHUNKS) + "data: [DONE]\n\n"
                kind = "text/event-stream"
            else:
                out, kind = json.dumps(ANSWER), "application/json"
            data = out.encode() if isinstance(out, str) else out
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen, answers
    server.shutdown()
    server.server_close()


PARAMS = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}


def test_plain_blocking_and_streamed_calls_send_key_body_and_sdk_headers(peer):
    base, seen, _ = peer
    provider = OpenAIProvider("sk-wire-secret", base)
    t = Timeouts(connect=5, read=5)

    async def both():
        plain = await provider.complete(dict(PARAMS), t)
        stream = await provider.stream(dict(PARAMS), t)
        deltas = [d async for d in stream]
        await provider.aclose()
        return plain, deltas

    plain, deltas = asyncio.run(both())
    blocking = provider.complete_blocking(dict(PARAMS), t)

    assert plain.content == blocking.content == "hi"
    assert plain.usage.prompt_tokens == 3
    assert "".join(d.text for d in deltas) == "hi"
    assert [d.usage.completion_tokens for d in deltas if d.usage] == [1]
    assert [r["path"] for r in seen] == ["/v1/chat/completions"] * 3
    for r in seen:
        assert r["headers"]["authorization"] == "Bearer sk-wire-secret"
        assert r["headers"]["content-type"] == "application/json"
        assert "OpenAI/Python" in r["headers"]["user-agent"]
    assert seen[0]["body"] == PARAMS
    assert seen[1]["body"] == {**PARAMS, "stream": True, "stream_options": {"include_usage": True}}
    assert seen[2]["body"] == PARAMS


FULL = {"id": "c2", "object": "chat.completion", "created": 1, "model": "m-2024", "x_vendor": 1,
        "choices": [{"index": 0, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": None, "reasoning_content": "hmm",
                                 "tool_calls": [{"id": "t1", "type": "function", "x_extra": True,
                                                 "function": {"name": "f", "arguments": "{}"}}]},
                     "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": [97],
                                               "top_logprobs": []}]}},
                    {"index": 1, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "two"}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39,
                  "prompt_tokens_details": {"cached_tokens": 20},
                  "completion_tokens_details": {"reasoning_tokens": 4}}}


def test_an_answer_is_read_from_its_json_as_sent(peer):
    """Tool calls, logprobs and every choice of n > 1 are handed on as the server sent them
    (what the SDK's model_dump(exclude_unset=True) gave), usage details included."""
    base, _, answers = peer
    provider = OpenAIProvider("sk-wire", base)
    t = Timeouts(connect=5, read=5)
    answers.append((json.dumps(FULL), "application/json"))
    got = asyncio.run(provider.complete(dict(PARAMS), t))
    message = FULL["choices"][0]["message"]
    assert (got.content, got.model, got.finish_reason, got.reasoning) == ("", "m-2024", "tool_calls", "hmm")
    assert got.tool_calls == message["tool_calls"]
    assert got.logprobs == FULL["choices"][0]["logprobs"]
    assert got.choices == FULL["choices"]
    u = got.usage
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens) == (30, 9, 20, 4)
    answers.append((json.dumps(ANSWER), "text/plain"))      # JSON under the wrong label: still read
    assert provider.complete_blocking(dict(PARAMS), t).content == "hi"


@pytest.mark.parametrize("body,kind,error", [
    ("<html>gateway</html>", "text/html", errors.MalformedResponse),
    ('{"choices": [{"message"', "application/json", errors.MalformedResponse),
    ("[1, 2]", "application/json", errors.MalformedResponse),
    ('{"id": "c3", "choices": []}', "application/json", errors.ServerError),
    ('{"id": "c3", "choices": [{"index": 0, "message": null}]}', "application/json", errors.ServerError),
])
def test_an_answer_that_is_not_a_chat_completion_is_a_clear_error(peer, body, kind, error):
    base, _, answers = peer
    provider = OpenAIProvider("sk-wire", base)
    t = Timeouts(connect=5, read=5)
    answers.extend([(body, kind), (body, kind)])
    with pytest.raises(error):
        asyncio.run(provider.complete(dict(PARAMS), t))
    with pytest.raises(error):
        provider.complete_blocking(dict(PARAMS), t)
