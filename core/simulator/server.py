"""The simulator's HTTP side: OpenAI-compatible routes, control routes and ways to run them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core import tokens
from core.simulator import textgen
from core.simulator.faults import ApiError, FaultError, Simulator
from core.simulator.protocol import (_BAD_JSON, MODELS, ChatRequest, Completion, _bad_type, _messages,
                                     _missing, DEFAULT_MODEL,
                                     complete, parse_chat_request)
from core.simulator.usage import message_token_ids, prompt_token_ids

_MODEL_CREATED = 1_715_367_049  # model objects carry a fixed creation time, as OpenAI's do
# Idle connections are kept longer than clients keep them (httpx: 5 s), as real servers do
# (nginx: 75 s). With uvicorn's 5 s both ends expire an idle connection at the same moment,
# and a request sent on it in that instant fails with a reset the upstream never caused.
KEEP_ALIVE_S = 75


# ----- the chat route


class _CutConnection(Exception):
    """Raised so uvicorn closes the socket mid-response, like a dropped upstream connection."""


class _QuietCuts(logging.Filter):
    """Keeps uvicorn from logging a traceback for connections the simulator cuts on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _CutConnection))


logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
_log = logging.getLogger(__name__)


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class _Link:
    """One chat request's connection: sends the response and notices when the client leaves."""

    def __init__(self, receive, send, shutdown: asyncio.Event) -> None:
        self._receive, self._send, self._shutdown = receive, send, shutdown
        self.left = asyncio.Event()
        self.started = self.finished = False
        self.request_id = "req_" + secrets.token_hex(16)
        self._watcher: asyncio.Task | None = None

    def watch(self) -> None:
        """Start listening for the client's disconnect (call once the body has been read)."""
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        # uvicorn also reports "disconnect" once the response is complete; that is not the client leaving.
        if not self.finished:
            self.left.set()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    @property
    def wanted(self) -> bool:
        return not (self.left.is_set() or self._shutdown.is_set())

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def pause(self, seconds: float) -> bool:
        """Wait, waking early if the client leaves or the server stops; True if still worth answering."""
        if seconds <= 0 or not self.wanted:
            await asyncio.sleep(0)  # still yield, so other requests and the watcher get to run
            return self.wanted
        waiters = [asyncio.ensure_future(self.left.wait()), asyncio.ensure_future(self._shutdown.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.wanted

    async def start(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
        headers = {**headers, "x-request-id": self.request_id}
        await self._send({"type": "http.response.start", "status": status, "headers": _header_list(headers)})

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, data: bytes = b"") -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        await self.start(status, {"content-type": "application/json", "content-length": str(len(body)),
                                  **(headers or {})})
        await self.finish(body)


def _prepare(raw: bytes, sim: Simulator, faults: dict) -> tuple[ChatRequest, Completion]:
    request = parse_chat_request(raw)
    completion = complete(request, faults["reply_text"])
    completion.prompt_tokens += faults["prompt_tokens_extra"]
    least = faults["prompt_cache_min_tokens"]
    if least and completion.prompt_tokens >= least:   # short prompts are never cached: skip the work
        ids = prompt_token_ids(request.messages, request.model)
        cached, written = sim.prompt_cache.lookup_and_store(request.model, ids, least, faults["prompt_cache_step"])
        completion.cached_tokens = min(cached, completion.prompt_tokens)
        if faults["report_cache_writes"]:   # as OpenRouter and Anthropic-style servers report them
            completion.cache_write_tokens = min(written, completion.prompt_tokens - completion.cached_tokens)
    return request, completion


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _api_key(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return value.decode("latin-1").removeprefix("Bearer ").strip()
    return None


class _ChatEndpoint:
    """POST /v1/chat/completions as a raw ASGI app, so it can watch for disconnects and cut sockets."""

    def __init__(self, sim: Simulator, shutdown: asyncio.Event) -> None:
        self.sim, self.shutdown = sim, shutdown

    async def __call__(self, scope, receive, send) -> None:
        self.sim.count(chat_requests=1, in_flight=1)
        link = _Link(receive, send, self.shutdown)
        try:
            raw = await Request(scope, receive).body()
            link.watch()
            await self._respond(scope, raw, link)
        except ClientDisconnect:  # left while still sending the body
            self.sim.count(disconnected=1)
        except _CutConnection:
            raise
        except Exception:
            if link.started:
                raise
            # A simulator bug must still look like an OpenAI 500, so clients exercise their real error path.
            _log.exception("simulator failed to answer a chat request")
            await link.send_json(500, ApiError(500, "The simulator failed to answer.", type="server_error").body())
        finally:
            await link.close()
            self.sim.count(in_flight=-1)

    async def _respond(self, scope, raw: bytes, link: _Link) -> None:
        sim = self.sim
        faults, latency = sim.faults(), sim.latency()  # one snapshot, so a request sees consistent settings
        error = sim.draw_fault(_api_key(scope))
        if error is None:
            try:
                # Off the event loop: counting a huge prompt's tokens would stall every other stream.
                request, completion = await asyncio.to_thread(_prepare, raw, sim, faults)
            except ApiError as exc:
                error = exc
        limits: dict[str, str] = {}
        if error is None:
            error, limits = sim.take_rate_limit(completion.prompt_tokens + completion.completion_tokens)
        if faults["slow_s"] and not await link.pause(faults["slow_s"]):
            return self._gone(link)
        if error is not None:
            sim.count(errors=1)
            return await link.send_json(error.status, error.body(), error.headers)
        malformed = sim.draw_malformed()
        thinking = textgen.thinking(faults["reasoning_chunks"])
        if thinking:    # visible thinking is billed as completion (reasoning) tokens too
            thought = tokens.count_text("".join(thinking), completion.model)
            completion.reasoning_tokens += thought
            completion.completion_tokens += thought
        if request.stream:
            return await self._stream(request, completion, latency, faults, link, thinking, malformed,
                                      limits)
        speed = latency["tokens_per_s"]
        delay = latency["ttft_ms"] / 1000 + (completion.completion_tokens / speed if speed else 0)
        delay += faults["reasoning_pause_s"] * len(thinking)
        if not await link.pause(delay):
            return self._gone(link)
        sim.count(completions=1)
        if malformed:   # a proxy or server that cut its own JSON short, status 200 all the same
            body = json.dumps(completion.as_json()).encode()
            await link.start(200, {"content-type": "application/json", "content-length": str(len(body) // 2)})
            return await link.finish(body[:len(body) // 2])
        reasoning = {faults["reasoning_field"]: "".join(thinking)} if thinking else None
        await link.send_json(200, completion.as_json(reasoning), limits)

    def _gone(self, link: _Link, streaming: bool = False) -> None:
        if link.shutting_down:
            raise _CutConnection()
        self.sim.count(disconnected=1, streams_disconnected=int(streaming))

    async def _stream(self, request: ChatRequest, c: Completion, latency: dict, faults: dict, link: _Link,
                      thinking: list[str], malformed: bool, limits: dict[str, str]) -> None:
        sim, drop_after = self.sim, faults["drop_after_chunks"]
        usage = request.include_usage and not faults["ignore_include_usage"]   # llama.cpp ignores it
        garble_at = faults["malformed_after_chunks"] if malformed else None
        sim.count(streams_started=1)
        await link.start(200, {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                               **limits})
        try:
            if not await link.pause(latency["ttft_ms"] / 1000):
                return self._gone(link, streaming=True)
            for index, choice in enumerate(c.choices):
                first = {"role": "assistant", "content": "" if choice.tool_calls is None else None, "refusal": None}
                await link.write(_sse(c.chunk(first, with_usage=usage, index=index)))
            for thought in thinking:   # a reasoning model thinks aloud before it answers
                if not await link.pause(faults["reasoning_pause_s"]):
                    return self._gone(link, streaming=True)
                await link.write(_sse(c.chunk({faults["reasoning_field"]: thought}, with_usage=usage)))
            speed, sent_tokens = latency["tokens_per_s"], 0
            started = asyncio.get_running_loop().time()
            for i, (index, delta, text) in enumerate(_deltas(c)):
                if i == garble_at:
                    # One event cut in the middle of its JSON, as a broken proxy sends it.
                    line = _sse(c.chunk(delta, with_usage=usage, index=index))
                    await link.write(line[:len(line) // 2] + b"\n\n")
                if drop_after is not None and i >= drop_after:
                    break
                # Pace by tokens sent so far rather than per chunk, so sleep overhead does not add up.
                due = started + sent_tokens / speed - asyncio.get_running_loop().time() if speed else 0
                if not await link.pause(due):
                    return self._gone(link, streaming=True)
                await link.write(_sse(c.chunk(delta, with_usage=usage, index=index)))
                sent_tokens += tokens.count_text(text, c.model)
            if drop_after is not None:
                sim.count(streams_dropped=1)
                raise _CutConnection()
            for index, choice in enumerate(c.choices):
                await link.write(_sse(c.chunk({}, choice.finish_reason, with_usage=usage, index=index)))
            if usage:
                await link.write(_sse(c.usage_chunk()))
            sim.count(streams_completed=1)  # before the send, so a client that saw [DONE] sees the count
            await link.finish(_sse("[DONE]"))
        except OSError:  # a send to a closed socket, on servers speaking ASGI spec 2.4+
            sim.count(disconnected=1, streams_disconnected=1)
        except asyncio.CancelledError:  # uvicorn gave up waiting for us at shutdown
            sim.count(disconnected=1, streams_disconnected=1)
            raise


ARGUMENT_PIECE_CHARS = 8


def _deltas(c: Completion):
    """(choice index, delta, its text) in the order sent: choices take turns, as n > 1
    streams interleave them; a tool call comes as its name, then its arguments in pieces."""
    per_choice = []
    for choice in c.choices:
        events = [({"content": piece}, piece) for piece in choice.pieces] if choice.tool_calls is None else []
        for k, call in enumerate(choice.tool_calls or ()):
            head = {"index": k, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            events.append(({"tool_calls": [head]}, call["function"]["name"]))
            args = call["function"]["arguments"]
            for j in range(0, len(args), ARGUMENT_PIECE_CHARS):
                part = args[j:j + ARGUMENT_PIECE_CHARS]
                events.append(({"tool_calls": [{"index": k, "function": {"arguments": part}}]}, part))
        per_choice.append(events)
    for step in range(max(map(len, per_choice), default=0)):
        for index, events in enumerate(per_choice):
            if step < len(events):
                yield (index, *events[step])


# ----- models and control routes


def _model_json(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _MODEL_CREATED, "owned_by": "system",
            "context_window": MODELS[name]}


async def _list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_json(name) for name in MODELS]})


async def _get_model(request: Request) -> JSONResponse:
    name = request.path_params["model"]
    if name not in MODELS:
        message = f"The model `{name}` does not exist or you do not have access to it."
        raise ApiError(404, message, param="model", code="model_not_found")
    return JSONResponse(_model_json(name))


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise ApiError(400, _BAD_JSON) from None
    if not isinstance(body, dict):
        raise _bad_type("body", "an object", body)
    return body


def _tokenize_routes(sim: Simulator) -> list[Route]:
    """POST /tokenize as vLLM serves it ({"model", "messages"} -> {"count", "tokens",
    "max_model_len"}, the count a chat answer reports as prompt_tokens; {"prompt"} -> the same
    for a text), or with the ``tokenize_style`` fault "llama.cpp" as llama.cpp's server does:
    {"content"} -> {"tokens"} only (other fields ignored), and POST /apply-template
    {"messages"} -> {"prompt"}: the chat template applied, whose tokens are the prompt's."""
    async def tokenize(request: Request) -> JSONResponse:
        faults = sim.faults()
        if not faults["tokenize_route"]:
            raise HTTPException(404)
        sim.count(tokenize_requests=1)
        body = await _json_object(request)
        model = body.get("model") or DEFAULT_MODEL
        if not isinstance(model, str) or model not in MODELS:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if faults["tokenize_style"] == "llama.cpp":
            content = body.get("content", "")
            if not isinstance(content, str):
                raise _bad_type("content", "a string", content)
            return JSONResponse({"tokens": _template_ids(content, model, faults)})
        if "messages" in body:   # the server's own count: its chat template's tokens too
            ids = message_token_ids(_messages(body), model) + [0] * faults["prompt_tokens_extra"]
        else:
            text = body.get("prompt", body.get("content"))
            if not isinstance(text, str):
                raise _missing("prompt")
            ids = tokens.encoding_for(model).encode(text, disallowed_special=())
        return JSONResponse({"count": len(ids), "max_model_len": MODELS[model], "tokens": ids})

    async def apply_template(request: Request) -> JSONResponse:
        faults = sim.faults()
        if not faults["tokenize_route"] or faults["tokenize_style"] != "llama.cpp":
            raise HTTPException(404)
        return JSONResponse({"prompt": _TEMPLATE + json.dumps(_messages(await _json_object(request)))})

    return [Route("/tokenize", tokenize, methods=["POST"]),
            Route("/apply-template", apply_template, methods=["POST"])]


_TEMPLATE = "<|chat|>"     # marks a templated prompt, so /tokenize counts it as the chat prompt


def _template_ids(content: str, model: str, faults: dict) -> list[int]:
    """llama.cpp's /tokenize: a templated chat prompt counts as the answer's prompt_tokens."""
    if content.startswith(_TEMPLATE):
        messages = json.loads(content[len(_TEMPLATE):])
        return message_token_ids(messages, model) + [0] * faults["prompt_tokens_extra"]
    return tokens.encoding_for(model).encode(content, disallowed_special=())


def _control_routes(sim: Simulator) -> list[Route]:
    async def faults(request: Request) -> JSONResponse:
        if request.method == "DELETE":
            sim.clear_faults()
        elif request.method == "POST":
            patch = await _json_object(request)
            try:
                sim.set_faults(**patch)
            except FaultError as exc:
                raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from None
        return JSONResponse(sim.faults())

    async def latency(request: Request) -> JSONResponse:
        if request.method == "POST":
            patch = await _json_object(request)
            unknown = sorted(set(patch) - {"ttft_ms", "tokens_per_s"})
            if unknown:
                raise ApiError(400, f"unknown latency field(s) {unknown}; expected ttft_ms and/or tokens_per_s",
                               param=unknown[0], code="invalid_value")
            try:
                sim.set_latency(**patch)
            except FaultError as exc:
                raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from None
        return JSONResponse(sim.latency())

    async def stats(request: Request) -> JSONResponse:
        if request.method == "DELETE":
            sim.reset_stats()
        return JSONResponse(sim.stats())

    async def rate_limit(request: Request) -> JSONResponse:
        return JSONResponse({"windows": sim.rate_limit_windows()})

    return [
        Route("/_sim/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sim/latency", latency, methods=["GET", "POST"]),
        Route("/_sim/stats", stats, methods=["GET", "DELETE"]),
        Route("/_sim/rate_limit", rate_limit, methods=["GET"]),
    ]


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # OpenAI answers unknown routes with its usual error body, not a plain-text page.
    message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else exc.detail
    return JSONResponse(ApiError(exc.status_code, message).body(), exc.status_code, headers=exc.headers)


def build_app(sim: Simulator) -> Starlette:
    """A Starlette app serving ``sim``; ``app.state.shutdown`` wakes requests that are waiting."""
    shutdown = asyncio.Event()  # binds to the serving loop on first use
    routes = [
        Route("/v1/chat/completions", _ChatEndpoint(sim, shutdown), methods=["POST"]),
        Route("/v1/models", _list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", _get_model, methods=["GET"]),
        *_tokenize_routes(sim),
        *_control_routes(sim),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    app.state.shutdown = shutdown
    app.state.sim = sim
    return app


# ----- running it


class RunningServer:
    """A simulator served by uvicorn on a daemon thread."""

    def __init__(self, sim: Simulator, host: str, port: int, server: uvicorn.Server, thread: threading.Thread,
                 loop: asyncio.AbstractEventLoop, shutdown: asyncio.Event) -> None:
        self.sim, self.host, self.port = sim, host, port
        self._server, self._thread, self._loop, self._shutdown = server, thread, loop, shutdown

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving; requests still waiting (slow_s, slow streams) are cut instead of awaited."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_in_background(sim: Simulator | None = None, host: str = "127.0.0.1", port: int = 0,
                        timeout_s: float = 10.0) -> RunningServer:
    """Serve ``sim`` (a new Simulator by default) on a daemon thread; returns once it accepts connections."""
    sim = sim if sim is not None else Simulator()
    app = sim.asgi_app()
    # Bind here so port=0 yields a known free port before uvicorn starts. The explicit IPPROTO_TCP matters:
    # asyncio only sets TCP_NODELAY on sockets that say so, and without it every response waits ~40 ms on
    # Nagle's algorithm versus delayed ACKs.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="off",
                            timeout_graceful_shutdown=1, timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])  # uvicorn installs no signal handlers off the main thread

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=f"simulator:{sock.getsockname()[1]}",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"simulator server did not start on {host}:{port}")
        time.sleep(0.005)
    return RunningServer(sim, host, sock.getsockname()[1], server, thread, loops[0], app.state.shutdown)


def serve(host: str = "127.0.0.1", port: int = 9100, ttft_ms: float = 250, tokens_per_s: float | None = 40,
          sim: Simulator | None = None) -> None:
    """Serve in the foreground until interrupted (for `python -m core simulator`)."""
    sim = sim if sim is not None else Simulator(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s)
    print(f"OpenAI simulator on http://{host}:{port}/v1 (ttft {ttft_ms} ms, {tokens_per_s} tokens/s)", flush=True)
    uvicorn.run(sim.asgi_app(), host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=1, timeout_keep_alive=KEEP_ALIVE_S)
