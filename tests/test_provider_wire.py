"""What the provider puts on the wire: it posts through the SDK's client without the SDK's
body walk (see core/providers/openai_provider.py), so check that the key, the body and the
client's own headers still arrive as the SDK's ``create`` sends them, on every path."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            if body.get("stream"):
                out = "".join(f"data: {json.dumps(c)}\n\n" for c in CHUNKS) + "data: [DONE]\n\n"
                kind = "text/event-stream"
            else:
                out, kind = json.dumps(ANSWER), "application/json"
            data = out.encode()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen
    server.shutdown()
    server.server_close()


PARAMS = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}


def test_plain_blocking_and_streamed_calls_send_key_body_and_sdk_headers(peer):
    base, seen = peer
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
