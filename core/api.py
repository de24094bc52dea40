"""The HTTP API, mounted on Streamlit's server by `st.App` (see streamlit_app.py).

    GET  /api/health              liveness and the active provider
    POST /api/generate            JSON in, JSON out; {"stream": true} answers with SSE
                                  (events: retry, reasoning, delta, then done or error)
    GET  /api/stats               the totals `python -m core stats --json` prints

When GYROSCOPE_API_TOKEN is set, every route but /api/health needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import contextlib
from contextlib import asynccontextmanager

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .errors import GyroscopeError, InvalidParameter
from .history import Filters, parse_when
from .models import GenerationRequest, check_json_type
from .service import default_service

_STATUS = {"rejected": 400, "invalid_parameter": 400, "prompt_too_long": 400, "config": 400,
           "circuit_open": 503, "rate_limited": 429, "quota_exhausted": 402, "retry_later": 503,
           "model_not_found": 404, "bad_request": 400, "auth": 502, "cancelled": 499}


def _error(exc: GyroscopeError) -> JSONResponse:
    headers = {}
    if exc.retry_in_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_in_s)))
    return JSONResponse({"error": exc.as_dict()}, status_code=_STATUS.get(exc.kind, 502),
                        headers=headers)


def _authorised(request: Request, gyro) -> bool:
    token = gyro.config.api_token
    if not token:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def _unauthorised() -> JSONResponse:
    return JSONResponse({"error": {"kind": "auth", "message": "Send Authorization: Bearer "
                                   "<GYROSCOPE_API_TOKEN>.", "retry_in_s": None}}, status_code=401)


async def health(request: Request) -> JSONResponse:
    try:
        gyro = default_service()
    except GyroscopeError as exc:
        return _error(exc)
    # Rows waiting in the spill journal, refused requests or lost rows: say so.
    recording = gyro.history.status()
    degraded = recording["history"] != "ok" or recording["history_rows_lost"]
    return JSONResponse({"status": "degraded" if degraded else "ok", "provider": gyro.provider.name,
                         "simulated": gyro.is_simulated, **recording})


async def generate(request: Request):
    try:
        gyro = default_service()
    except GyroscopeError as exc:
        return _error(exc)
    if not _authorised(request, gyro):
        return _unauthorised()
    try:
        body = await _json_body(request)
        wants_stream = body.pop("stream", False) if isinstance(body, dict) else False
        check_json_type("stream", wants_stream, "bool")
        req = GenerationRequest.from_dict(body, source="api")
    except GyroscopeError as exc:
        return _error(exc)
    if not wants_stream:
        try:
            return JSONResponse((await gyro.agenerate(req)).as_dict())
        except GyroscopeError as exc:
            return _error(exc)
    return StreamingResponse(_sse(gyro, req), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _json_body(request: Request):
    """The parsed body, or InvalidParameter saying what is wrong with it."""
    try:
        return await request.json()
    except RecursionError:
        raise InvalidParameter("The JSON body is nested too deeply. Send a flat object, e.g. "
                               "{\"prompt\": \"Hello\"}.") from None
    except UnicodeDecodeError:
        raise InvalidParameter("The body must be UTF-8 JSON, e.g. {\"prompt\": \"Hello\"}.") from None
    except json.JSONDecodeError:
        raise InvalidParameter("The body must be JSON, e.g. {\"prompt\": \"Hello\"}.") from None
    except ValueError:   # Python refuses to read integers of more than 4,300 digits
        raise InvalidParameter("A number in the JSON body has too many digits. Send numbers "
                               "in their usual range, e.g. \"max_tokens\": 256.") from None


def _event(name: str, data) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _sse(gyro, req: GenerationRequest):
    """Text, retry notices (as they happen, even before the first token) and the end."""
    events: asyncio.Queue = asyncio.Queue()
    stream = gyro.astream(req, on_retry=lambda n: events.put_nowait(("retry", n)),
                          on_reasoning=lambda text: events.put_nowait(("reasoning", text)))

    async def pump() -> None:
        try:
            async for piece in stream:
                events.put_nowait(("delta", piece))
            events.put_nowait(("done", stream.result))
        except GyroscopeError as exc:
            events.put_nowait(("error", exc))

    task = asyncio.create_task(pump())
    try:
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield _event("delta", {"text": value})
            elif kind == "reasoning":       # a reasoning model's thinking, apart from the text
                yield _event("reasoning", {"text": value})
            elif kind == "retry":
                yield _event("retry", {"kind": value.kind, "attempt": value.attempt,
                                       "max_attempts": value.max_attempts, "wait_s": value.wait_s,
                                       "message": value.message})
            else:
                yield _event(kind, value.as_dict())
                return
    finally:
        # A client that went away is a Stop: cancel the read, which closes the upstream
        # connection and records the request as cancelled.
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await stream.aclose()


async def stats(request: Request) -> JSONResponse:
    q = request.query_params
    try:
        if not _authorised(request, default_service()):
            return _unauthorised()
        filters = Filters(start=parse_when(q.get("since")), end=parse_when(q.get("until")), tz=q.get("tz", "UTC"),
                          models=tuple(q.getlist("model")), sources=tuple(q.getlist("source")))
        return JSONResponse(default_service().stats(filters))
    except GyroscopeError as exc:
        return _error(exc)


def routes() -> list[Route]:
    """The API's routes, for st.App."""
    return [Route("/api/health", health), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/stats", stats)]


@asynccontextmanager
async def lifespan(app):
    yield None
    from . import service
    if service._default is not None:
        service._default.close()
