"""The drop-in OpenAI gateway: ``/v1/chat/completions`` (plain and SSE) and ``/v1/models``
in OpenAI's wire format, over the one pipeline (retries, breaker, cache, history, cost).

    POST /v1/chat/completions   OpenAI's body; every chat parameter is forwarded
    GET  /v1/models             the upstream's models (plus provider.extra_models)
    GET  /v1/models/{model}     one of them

Per-request switches (headers): ``x-gyroscope-cache: off|refresh``,
``x-gyroscope-optimize: on|off``. Answer headers: ``x-gyroscope-cache: hit|miss|off``,
``x-gyroscope-attempts``, ``x-gyroscope-cost`` (USD or ``unknown``; plain answers only: a
stream's cost is known after its headers left) and ``x-gyroscope-overhead-ms`` (the
gateway's own time: the handler's time less the upstream's and retry waits; for a stream,
up to its first piece). Errors come in OpenAI's shape with its status codes, so the SDK
raises its own classes (BadRequestError, NotFoundError, RateLimitError...). History rows
of /v1 requests have source ``v1``, so /v1 traffic can be told apart from ``/api``.
The routes and their OpenAPI entries are in core/api.py's ``ENDPOINTS`` table.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from typing import Any, AsyncIterator

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import errors
from .answers import service as _service
from . import guard
from ..models import GenerationRequest, GenerationResult
from .openai_schemas import ChatCompletionRequest, first_error

SOURCE = "v1"
MODELS_TTL_S = 60.0
# The fields the request carries itself; everything else in the body is forwarded as is.
_OWN = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "temperature",
                  "top_p", "seed", "stop"})
_BAD_JSON = ("We could not parse the JSON body of your request. Send a JSON object, e.g. "
             '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}.')
_SWITCHES = {"x-gyroscope-cache": ("off", "refresh"), "x-gyroscope-optimize": ("on", "off")}

# kind -> (status, OpenAI error type, code)
_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "invalid_parameter": (400, "invalid_request_error", None),
    "rejected": (400, "invalid_request_error", None),
    "prompt_too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "bad_request": (400, "invalid_request_error", None),
    "config": (500, "server_error", None),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "rate_limited": (429, "requests", "rate_limit_exceeded"),
    "quota_exhausted": (429, "insufficient_quota", "insufficient_quota"),
    "budget_exceeded": (402, "insufficient_quota", "budget_exceeded"),     # core/budgets.py
    "circuit_open": (503, "service_unavailable", "circuit_open"),
    "retry_later": (503, "service_unavailable", "retry_later"),
    "storage": (503, "service_unavailable", "storage"),
    "model_loading": (503, "service_unavailable", "model_loading"),
    "auth": (502, "upstream_error", "upstream_auth_failed"),
    "timeout": (504, "upstream_error", "timeout"),
    "cancelled": (499, "invalid_request_error", "cancelled"),
}


# -- errors in OpenAI's shape ----------------------------------------------------------------
def openai_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error body ``{"error": {message, type, param, code}}`` with its status."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _error_body(exc: errors.GyroscopeError) -> tuple[int, dict, dict]:
    status, type_, code = _ERRORS.get(exc.kind, (502, "upstream_error", exc.kind))
    headers = {}
    if status in (429, 503):        # the SDK waits this long before its own retry
        headers["Retry-After"] = str(max(1, round(exc.retry_in_s or 1)))
    if exc.kind in ("quota_exhausted", "budget_exceeded"):
        headers["x-should-retry"] = "false"     # waiting does not bring quota back
    if exc.kind == "budget_exceeded":           # ...except a budget, at its reset
        headers["Retry-After"] = str(max(1, round(exc.retry_in_s or 1)))
    body = {"error": {"message": exc.user_message, "type": type_,
                      "param": "model" if exc.kind == "model_not_found" else None, "code": code}}
    return status, body, headers


def _gyro_error(exc: errors.GyroscopeError) -> JSONResponse:
    status, body, headers = _error_body(exc)
    return JSONResponse(body, status_code=status, headers=headers)


# -- models ----------------------------------------------------------------------------------
MODELS_RECHECK_S = 5.0      # an unknown name re-reads the list at most this often
_models: "weakref.WeakKeyDictionary[Any, tuple[float, list[str]]]" = weakref.WeakKeyDictionary()
_reading: "weakref.WeakKeyDictionary[Any, asyncio.Task]" = weakref.WeakKeyDictionary()


async def _listed(gyro, max_age_s: float = MODELS_TTL_S) -> list[str]:
    """The upstream's models plus the configured extras, read at most every ``max_age_s``;
    concurrent callers share one read (1000 requests arriving at once ask upstream once)."""
    known = _models.get(gyro)
    if known is not None and time.monotonic() - known[0] < max_age_s:
        return known[1]
    task = _reading.get(gyro)
    if task is None or task.done():
        task = _reading[gyro] = asyncio.ensure_future(_read_models(gyro))
    return await asyncio.shield(task)     # a caller that goes away does not cancel the others' read


async def _read_models(gyro) -> list[str]:
    listed = await gyro.provider.models()
    extra = [m.strip() for m in gyro.settings.get("provider.extra_models").split(",") if m.strip()]
    names = list(dict.fromkeys([*listed, *extra]))
    _models[gyro] = (time.monotonic(), names)
    return names


async def _unknown_model(gyro, model: str) -> bool:
    """True only when the upstream's list is known and lacks ``model`` (a list that cannot
    be read refuses nothing: the upstream then answers for itself)."""
    try:
        if model in await _listed(gyro):
            return False
        # A model added since the last look (re-read at most every few seconds, so a
        # stream of made-up names does not become a stream of upstream calls).
        names = await _listed(gyro, MODELS_RECHECK_S)
    except errors.GyroscopeError:
        return False
    return model not in names and model != gyro.settings.get("provider.default_model")


def _model_json(name: str, owner: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


async def list_models(request: Request) -> Response:
    gyro = await _checked(request)
    if isinstance(gyro, Response):
        return gyro
    try:
        names = await _listed(gyro)
    except errors.GyroscopeError as exc:
        return _gyro_error(exc)
    return JSONResponse({"object": "list", "data": [_model_json(n, gyro.provider.name) for n in names]})


async def get_model(request: Request) -> Response:
    gyro = await _checked(request)
    if isinstance(gyro, Response):
        return gyro
    name = request.path_params["model"]
    try:
        names = await _listed(gyro)
    except errors.GyroscopeError as exc:
        return _gyro_error(exc)
    if name not in names:
        return openai_error(404, f"The model `{name}` does not exist or you do not have access to it.",
                            param="model", code="model_not_found")
    return JSONResponse(_model_json(name, gyro.provider.name))


async def _checked(request: Request):
    """The service, or the error that says why there is none (the guard at the edge has
    checked the token, Host, Origin, content type and size before this runs)."""
    try:
        return await _service()
    except errors.GyroscopeError as exc:
        return _gyro_error(exc)


# -- chat completions ------------------------------------------------------------------------
async def _parse(request: Request) -> tuple[dict | None, JSONResponse | None]:
    """The validated body as sent (forwarded verbatim), or the 400 that says what is wrong."""
    try:
        if guard.PARSED_KEY in request.scope:      # the guard parsed it within its limits
            data = request.scope[guard.PARSED_KEY]
        else:
            data = json.loads(await request.body())
    except (ValueError, RecursionError):   # not JSON, not UTF-8, too deep, a 5,000-digit number
        return None, openai_error(400, _BAD_JSON)
    if not isinstance(data, dict):
        return None, openai_error(400, "The request body must be a JSON object. " + _BAD_JSON.split(". ", 1)[1],
                                  param="body")
    try:
        ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        param, message = first_error(exc)
        return None, openai_error(400, message, param=param, code="invalid_value")
    except RecursionError:
        return None, openai_error(400, "The JSON body is nested too deeply.")
    return data, None


def _request(data: dict, headers) -> GenerationRequest | JSONResponse:
    for name, allowed in _SWITCHES.items():
        value = headers.get(name)
        if value is not None and value.lower() not in allowed:
            return openai_error(400, f"Header {name} must be {' or '.join(allowed)} (got {value[:40]!r}).",
                                param=name, code="invalid_value")
    cache = (headers.get("x-gyroscope-cache") or "").lower()
    optimize = (headers.get("x-gyroscope-optimize") or "").lower()
    stop = data.get("stop")
    return GenerationRequest(
        messages=data["messages"], model=data["model"], temperature=data.get("temperature"),
        max_tokens=data.get("max_tokens"), top_p=data.get("top_p"), seed=data.get("seed"),
        stop=[stop] if isinstance(stop, str) else stop, cache=cache != "off", refresh=cache == "refresh",
        optimize={"on": True, "off": False}.get(optimize), source=SOURCE,
        extra={k: v for k, v in data.items() if k not in _OWN})


async def chat_completions(request: Request) -> Response:
    t0 = time.perf_counter()
    gyro = await _checked(request)
    if isinstance(gyro, Response):
        return gyro
    data, refused = await _parse(request)
    if refused is not None:
        return refused
    req = _request(data, request.headers)
    if isinstance(req, Response):
        return req
    if await _unknown_model(gyro, req.model):
        return openai_error(404, f"The model `{req.model}` does not exist or you do not have access to it. "
                                 "GET /v1/models lists the models.", param="model", code="model_not_found")
    try:
        req.check_text()
    except errors.GyroscopeError as exc:
        return _gyro_error(exc)
    cache_state = "off" if not req.cache or not gyro.settings.get("cache.enabled") else None
    if not data.get("stream"):
        try:
            result = await gyro.agenerate(req)
        except errors.GyroscopeError as exc:
            return _gyro_error(exc)
        return JSONResponse(completion_json(result, data),
                            headers=_answer_headers(result, t0, cache_state, with_cost=True))
    stream = gyro.astream(req, deltas=True)
    try:       # retries happen before the first piece: an error then is a plain HTTP error
        first = await anext(stream.__aiter__(), None)
    except errors.GyroscopeError as exc:
        return _gyro_error(exc)
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(_sse(stream, first, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **_answer_headers(stream.result, t0, cache_state, with_cost=False)})


def _answer_headers(result: GenerationResult, t0: float, cache_state: str | None, with_cost: bool) -> dict:
    own_ms = (time.perf_counter() - t0) * 1000.0 - result.upstream_ms - result.retry_wait_s * 1000.0
    headers = {"x-gyroscope-cache": cache_state or ("hit" if result.from_cache else "miss"),
               "x-gyroscope-attempts": str(result.attempts),
               "x-gyroscope-overhead-ms": f"{max(0.0, own_ms):.2f}"}
    if with_cost:
        headers["x-gyroscope-cost"] = "unknown" if result.cost is None else f"{result.cost:.8f}"
    return headers


def _envelope(result: GenerationResult, kind: str) -> dict:
    return {"id": f"chatcmpl-{result.request_id}", "object": kind, "created": int(time.time()),
            "model": result.model, "system_fingerprint": None}


def _usage(result: GenerationResult) -> dict | None:
    u = result.usage
    if u is None:
        return None
    prompt_details = {"cached_tokens": u.cached_tokens}
    if u.cache_write_tokens:
        prompt_details["cache_write_tokens"] = u.cache_write_tokens
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def completion_json(result: GenerationResult, data: dict) -> dict:
    """The chat.completion object of a finished run."""
    if result.choices is not None:           # n > 1: every choice as the upstream sent it
        choices = result.choices
    else:
        message: dict[str, Any] = {"role": "assistant", "refusal": None,
                                   "content": None if result.tool_calls and not result.content else result.content}
        if result.tool_calls:
            message["tool_calls"] = result.tool_calls
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        choices = [{"index": 0, "message": message, "logprobs": result.logprobs,
                    "finish_reason": result.finish_reason}]
    return {**_envelope(result, "chat.completion"), "choices": choices, "usage": _usage(result)}


def _data(payload: dict | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _sse(stream, first, include_usage: bool) -> AsyncIterator[str]:
    """chat.completion.chunk events, the usage chunk when asked for, then ``[DONE]``. A
    failure after the first piece ends the stream with an error event (the SDK raises it);
    a client that goes away is a Stop (the pipeline records it as cancelled)."""
    result: GenerationResult = stream.result
    envelope = _envelope(result, "chat.completion.chunk")
    if include_usage:          # OpenAI sends "usage": null on every chunk but the last
        envelope["usage"] = None
    started: set[int] = set()

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> str:
        if index not in started:
            started.add(index)
            delta = {"role": "assistant", **delta}
        return _data({**envelope, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": finish_reason}]})

    try:
        delta = first    # OpenAI's first chunk says the role (content null before a tool call)
        yield chunk(0, {"content": None if first is not None and first.tool_calls else ""})
        iterator = stream.__aiter__()
        while delta is not None:
            piece: dict[str, Any] = {}
            if delta.reasoning:
                piece["reasoning_content"] = delta.reasoning
            if delta.text:
                piece["content"] = delta.text
            if delta.tool_calls:
                piece["tool_calls"] = delta.tool_calls
            if piece or delta.finish_reason or delta.logprobs:
                yield chunk(delta.index, piece, delta.finish_reason, delta.logprobs)
            delta = await anext(iterator, None)
        if include_usage:
            yield _data({**envelope, "choices": [], "usage": _usage(result)})
        yield _data("[DONE]")
    except errors.GyroscopeError as exc:
        _, body, _ = _error_body(exc)
        yield _data(body)
    finally:
        await stream.aclose()
