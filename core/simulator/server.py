"""The simulator's HTTP side: OpenAI-compatible routes, control routes and ways to run them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import socket
import string
import threading
import time
from dataclasses import dataclass
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

MODELS: dict[str, int] = {
    "gpt-4o-mini": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
}
DEFAULT_MODEL = "gpt-4o-mini"
ROLES = ("system", "assistant", "user", "function", "tool", "developer")
_MODEL_CREATED = 1_715_367_049  # model objects carry a fixed creation time, as OpenAI's do
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)


# ----- request validation


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return "an array" if isinstance(value, list) else "an object"


def _bad_type(param: str, expected: str, value: Any) -> ApiError:
    message = f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead."
    return ApiError(400, message, param=param, code="invalid_type")


def _missing(param: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def _number(body: dict, key: str, low: float, high: float, param: str | None = None) -> float | None:
    param, value = param or key, body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(param, "a decimal", value)
    if value < low or value > high:
        side, word, bound = ("below", "min", f">= {low}") if value < low else ("above", "max", f"<= {high}")
        message = f"Invalid '{param}': decimal {side} {word}imum value. Expected a value {bound}, but got {value}."
        raise ApiError(400, message, param=param, code=f"decimal_{side}_{word}_value")
    return float(value)


def _integer(body: dict, key: str, low: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(key, "an integer", value)
    if low is not None and value < low:
        message = f"Invalid '{key}': integer below minimum value. Expected a value >= {low}, but got {value} instead."
        raise ApiError(400, message, param=key, code="integer_below_min_value")
    return value


def _flag(body: dict, key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad_type(param or key, "a boolean", value)
    return bool(value)


def _content(value: Any, param: str, role: str) -> str:
    """Message content as plain text (text parts joined; images and audio do not count as text)."""
    if value is None:
        if role in ("assistant", "function"):  # assistant turns that only call tools have no content
            return ""
        raise _missing(param)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad_type(param, "one of a string or array", value)
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise _bad_type(f"{param}[{i}]", "an object", part)
        if part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise _bad_type(f"{param}[{i}].text", "a string", part.get("text"))
            texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array", messages)
    if not messages:
        message = "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array."
        raise ApiError(400, message, param="messages", code="empty_array")
    normalized = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"{where}.role")
        if role not in ROLES:
            allowed = ", ".join(f"'{r}'" for r in ROLES[:-1]) + f", and '{ROLES[-1]}'"
            raise ApiError(400, f"Invalid value: '{role}'. Supported values are: {allowed}.",
                           param=f"{where}.role", code="invalid_value")
        item = {"role": role, "content": _content(message.get("content"), f"{where}.content", role)}
        if message.get("name") is not None:
            if not isinstance(message["name"], str):
                raise _bad_type(f"{where}.name", "a string", message["name"])
            item["name"] = message["name"]
        normalized.append(item)
    return normalized


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: list[dict]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a request body the way OpenAI does; raises ApiError (400 or 404)."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, _BAD_JSON) from None
    if not isinstance(body, dict):
        raise _bad_type("body", "an object", body)
    model = DEFAULT_MODEL if body.get("model") is None else body["model"]
    if not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    messages = _messages(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad_type("stream_options", "an object", options)
        if not stream:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            raise ApiError(400, message, param="stream_options")
    include_usage = _flag(options or {}, "include_usage", "stream_options.include_usage")
    legacy_max = _integer(body, "max_tokens", 1)
    max_completion = _integer(body, "max_completion_tokens", 1)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    seed = _integer(body, "seed", None)
    if model not in MODELS:
        message = f"The model `{model}` does not exist or you do not have access to it."
        raise ApiError(404, message, param="model", code="model_not_found")
    max_tokens = max_completion if max_completion is not None else legacy_max
    return ChatRequest(model, messages, stream, include_usage, max_tokens, temperature, top_p, seed)


# ----- completions


@dataclass
class Completion:
    """One generated reply, with what the wire format needs around it."""

    id: str
    created: int
    model: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def pieces(self) -> list[str]:
        return textgen.pieces(self.content)

    def _envelope(self, kind: str) -> dict[str, Any]:
        fingerprint = "fp_" + hashlib.sha256(self.model.encode()).hexdigest()[:10]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "service_tier": "default", "system_fingerprint": fingerprint}

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def as_json(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": self.content, "refusal": None, "annotations": []}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict, finish_reason: str | None = None, with_usage: bool = False) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        if with_usage:  # with include_usage, OpenAI sends "usage": null on every chunk but the last
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()}


def complete(request: ChatRequest) -> Completion:
    """Generate the reply for a validated request; raises ApiError when the prompt does not fit."""
    window = MODELS[request.model]
    prompt = tokens.count_messages(request.messages, request.model)
    wanted = prompt + (request.max_tokens or 0)
    if wanted > window:
        detail = (f"your messages resulted in {prompt} tokens. Please reduce the length of the messages."
                  if prompt > window else
                  f"you requested {wanted} tokens ({prompt} in the messages, {request.max_tokens} in the "
                  "completion). Please reduce the length of the messages or completion.")
        message = f"This model's maximum context length is {window} tokens. However, {detail}"
        raise ApiError(400, message, param="messages", code="context_length_exceeded")
    text = textgen.generate(request.model, request.messages, seed=request.seed,
                            temperature=request.temperature, top_p=request.top_p)
    content, cut = textgen.truncate(text, request.max_tokens, request.model)
    alphabet = string.ascii_letters + string.digits
    return Completion(
        id="chatcmpl-" + "".join(secrets.choice(alphabet) for _ in range(29)),
        created=int(time.time()),
        model=request.model,
        content=content,
        finish_reason="length" if cut else "stop",
        prompt_tokens=prompt,
        completion_tokens=tokens.count_text(content, request.model),
    )


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


def _prepare(raw: bytes) -> tuple[ChatRequest, Completion]:
    request = parse_chat_request(raw)
    return request, complete(request)


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
                request, completion = await asyncio.to_thread(_prepare, raw)
            except ApiError as exc:
                error = exc
        if faults["slow_s"] and not await link.pause(faults["slow_s"]):
            return self._gone(link)
        if error is not None:
            sim.count(errors=1)
            return await link.send_json(error.status, error.body(), error.headers)
        if request.stream:
            return await self._stream(request, completion, latency, faults["drop_after_chunks"], link)
        speed = latency["tokens_per_s"]
        delay = latency["ttft_ms"] / 1000 + (completion.completion_tokens / speed if speed else 0)
        if not await link.pause(delay):
            return self._gone(link)
        sim.count(completions=1)
        await link.send_json(200, completion.as_json())

    def _gone(self, link: _Link, streaming: bool = False) -> None:
        if link.shutting_down:
            raise _CutConnection()
        self.sim.count(disconnected=1, streams_disconnected=int(streaming))

    async def _stream(self, request: ChatRequest, c: Completion, latency: dict, drop_after: int | None,
                      link: _Link) -> None:
        sim, usage = self.sim, request.include_usage
        sim.count(streams_started=1)
        await link.start(200, {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"})
        try:
            if not await link.pause(latency["ttft_ms"] / 1000):
                return self._gone(link, streaming=True)
            await link.write(_sse(c.chunk({"role": "assistant", "content": "", "refusal": None}, with_usage=usage)))
            speed, sent_tokens = latency["tokens_per_s"], 0
            started = asyncio.get_running_loop().time()
            for i, piece in enumerate(c.pieces):
                if drop_after is not None and i >= drop_after:
                    break
                # Pace by tokens sent so far rather than per chunk, so sleep overhead does not add up.
                due = started + sent_tokens / speed - asyncio.get_running_loop().time() if speed else 0
                if not await link.pause(due):
                    return self._gone(link, streaming=True)
                await link.write(_sse(c.chunk({"content": piece}, with_usage=usage)))
                sent_tokens += tokens.count_text(piece, c.model)
            if drop_after is not None:
                sim.count(streams_dropped=1)
                raise _CutConnection()
            await link.write(_sse(c.chunk({}, c.finish_reason, with_usage=usage)))
            if usage:
                await link.write(_sse(c.usage_chunk()))
            sim.count(streams_completed=1)  # before the send, so a client that saw [DONE] sees the count
            await link.finish(_sse("[DONE]"))
        except OSError:  # a send to a closed socket, on servers speaking ASGI spec 2.4+
            sim.count(disconnected=1, streams_disconnected=1)
        except asyncio.CancelledError:  # uvicorn gave up waiting for us at shutdown
            sim.count(disconnected=1, streams_disconnected=1)
            raise


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

    return [
        Route("/_sim/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_sim/latency", latency, methods=["GET", "POST"]),
        Route("/_sim/stats", stats, methods=["GET", "DELETE"]),
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
                            timeout_graceful_shutdown=1)
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
                timeout_graceful_shutdown=1)
