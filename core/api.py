"""The HTTP API, mounted on Streamlit's server by `st.App` (see streamlit_app.py).

    GET  /api/health              liveness and the active provider
    POST /api/generate            JSON in, JSON out; {"stream": true} answers with SSE
                                  (events: retry, reasoning, delta, then done or error)
    GET  /api/stats               the totals `python -m core stats --json` prints
    GET  /api/metrics             Prometheus exposition (core/telemetry.py)

The guard (core/http/guard.py) wraps these routes at the edge: the API token, Host and
Origin checks, JSON-only bodies, size and nesting limits. ``asgi_app()`` is the API alone
behind the guard (for tests and benchmarks); streamlit_app.py puts the same guard around
the dashboard too.
"""

from __future__ import annotations

import asyncio
import json
import contextlib
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .config import load_config
from .errors import GyroscopeError, InvalidParameter, StorageError
from .history import Filters, parse_when
from .http import guard
from .models import GenerationRequest, check_json_type
from .portal import off_loop
from .service import current_service, default_service
from .telemetry import CONTENT_TYPE

_STATUS = {"rejected": 400, "invalid_parameter": 400, "prompt_too_long": 400, "config": 400,
           "circuit_open": 503, "rate_limited": 429, "quota_exhausted": 402, "retry_later": 503,
           "budget_exceeded": 402,
           "model_not_found": 404, "bad_request": 400, "auth": 502, "cancelled": 499,
           "storage": 503}


def _error(exc: GyroscopeError) -> JSONResponse:
    headers = {}
    if exc.retry_in_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_in_s)))
    return JSONResponse({"error": exc.as_dict()}, status_code=_STATUS.get(exc.kind, 502),
                        headers=headers)


STATS_TIMEOUT_S = 5.0      # /api/stats waits this long for the file, then answers 503
_starting: asyncio.Task | None = None


async def _service():
    """The process-wide service, built off the event loop the first time (opening the file
    and applying migrations wait for it, up to its busy timeout when another program
    locks it)."""
    return current_service() or await off_loop(default_service)


async def health(request: Request) -> JSONResponse:
    """What the process knows without touching the file, so it answers at once even while
    another program locks it."""
    global _starting
    gyro = current_service()
    if gyro is None:        # not built yet (or the file was locked): build it meanwhile
        if _starting is None or _starting.done():
            _starting = asyncio.create_task(_service())
            _starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            config = load_config()
        except GyroscopeError as exc:
            return _error(exc)
        return JSONResponse({"status": "starting", "provider": config.provider,
                             "simulated": config.provider == "simulator", "history_rows_lost": 0})
    # Rows waiting in the spill journal, refused requests or lost rows: say so (all from
    # memory; a replay it may start runs on the writer thread).
    recording = gyro.history.status()
    degraded = recording["history"] != "ok" or recording["history_rows_lost"]
    return JSONResponse({"status": "degraded" if degraded else "ok", "provider": gyro.provider.name,
                         "simulated": gyro.is_simulated, **recording})


async def generate(request: Request):
    try:
        gyro = await _service()
    except GyroscopeError as exc:
        return _error(exc)
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
    """The parsed body (already parsed by the guard when it runs), or InvalidParameter saying
    what is wrong with it."""
    if guard.PARSED_KEY in request.scope:
        return request.scope[guard.PARSED_KEY]
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
        gyro = await _service()
        filters = Filters(start=parse_when(q.get("since")), end=parse_when(q.get("until")), tz=q.get("tz", "UTC"),
                          models=tuple(q.getlist("model")), sources=tuple(q.getlist("source")))
        return JSONResponse(await gyro.astats(filters, timeout=STATS_TIMEOUT_S))
    except GyroscopeError as exc:
        return _error(exc)
    except TimeoutError:
        return _error(StorageError(
            f"The statistics could not be read within {STATS_TIMEOUT_S:g} s: the database file "
            "is busy (another program may hold a lock on it). Try again in a few seconds.",
            retry_in_s=5.0))


async def metrics(request: Request) -> Response:
    """Prometheus exposition (core/telemetry.py; docs/metrics.md says why not /metrics)."""
    try:
        gyro = await _service()
        body = await off_loop(gyro.prometheus.exposition, timeout=STATS_TIMEOUT_S)
    except GyroscopeError as exc:
        return _error(exc)
    except TimeoutError:
        return _error(StorageError("The metrics could not be read: the database file is busy. "
                                   "Try again in a few seconds.", retry_in_s=5.0))
    return Response(body, media_type=CONTENT_TYPE)


def routes() -> list[Route]:
    """The API's routes, for st.App; the last answers unknown /api and /v1 paths in JSON."""
    from .http import openai_compat     # imports this module: imported when routes are built
    api = [Route("/api/health", health), Route("/api/generate", generate, methods=["POST"]),
           Route("/api/stats", stats), Route("/api/metrics", metrics), *openai_compat.routes()]
    return [*api, guard.JsonForUnknown(api)]


def asgi_app(config: guard.GuardConfig | None = None) -> Starlette:
    """The API alone behind the guard, as streamlit_app.py serves it beside the dashboard
    (for tests and benchmarks; the caller closes the service)."""
    return Starlette(routes=routes(), middleware=guard.middleware(config))


@asynccontextmanager
async def lifespan(app):
    yield None
    from . import service
    if service._default is not None:
        service._default.close()
