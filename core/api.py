"""The HTTP API, mounted on Streamlit's server by `st.App` (see streamlit_app.py).

    GET   /api/health              liveness and the active provider
    POST  /api/generate            JSON in, JSON out; {"stream": true} answers with SSE
                                   (events: retry, reasoning, delta, then done or error)
    POST  /api/generate/stream     the same, always SSE
    GET   /api/generate/metrics    the seed's figures (as `python -m core stats --json`) and
                                   every breaker's state and figures
    GET   /api/stats               the totals `python -m core stats --json` prints
    POST  /api/cache/clear, POST /api/breaker/reset, GET/PATCH /api/settings
                                   the maintainer's routes (core/http/admin_api.py)
    GET   /api/metrics             Prometheus exposition (core/telemetry.py)
    GET   /api/openapi.json        the OpenAPI 3.1 document of /api and /v1

Routes and document come from one table, ``ENDPOINTS``: each operation names the pydantic
model its handler validates with (core/http/schemas.py). The guard (core/http/guard.py)
wraps the routes at the edge: the API token, Host and Origin checks, JSON-only bodies,
size and nesting limits. ``asgi_app()`` is the API alone behind the guard (for tests and
benchmarks); streamlit_app.py puts the same guard around the dashboard too.
"""

from __future__ import annotations

import asyncio
import json
import zoneinfo
import contextlib
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .config import load_config
from .errors import GyroscopeError, StorageError
from .history import Filters, parse_when
from .http import admin_api, guard, openai_compat, schemas
from .http.openai_schemas import ChatCompletionRequest
from .http.answers import error_response as _error, json_body as _json_body, service as _service
from .http.openapi import Operation, Query, document, sse_events
from .models import GenerationRequest
from .portal import off_loop
from .service import current_service
from .telemetry import CONTENT_TYPE

STATS_TIMEOUT_S = 5.0      # /api/stats waits this long for the file, then answers 503
_starting: asyncio.Task | None = None
PROMPT_HINT = ", e.g. {\"prompt\": \"Hello\"}"


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
    backends = gyro.backends()      # e.g. Redis down: local breaker, cache and pacing
    budget = gyro.budgets.health()  # PostgreSQL's ledger: settlements waiting, or unreachable
    degraded = (recording["history"] != "ok" or recording["history_rows_lost"]
                or budget.get("budgets", "ok") != "ok"
                or any(b["state"] != "ok" for b in backends.values()))
    return JSONResponse({"status": "degraded" if degraded else "ok", "provider": gyro.provider.name,
                         "simulated": gyro.is_simulated, **recording, **budget,
                         **({"backends": backends} if backends else {})})


async def generate(request: Request, stream: bool = False):
    """POST /api/generate: a JSON answer, or SSE when the body or the route asks for it."""
    try:
        gyro = await _service()
        body = schemas.validate(schemas.GenerateBody, await _json_body(request), PROMPT_HINT)
        fields = body.model_dump(exclude={"stream"}, exclude_unset=True)
        req = GenerationRequest(**fields, source="api")
        req.check_text()
    except GyroscopeError as exc:
        return _error(exc)
    if not (stream or body.stream):
        try:
            return JSONResponse((await gyro.agenerate(req)).as_dict())
        except GyroscopeError as exc:
            return _error(exc)
    return StreamingResponse(_sse(gyro, req), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def generate_stream(request: Request):
    """POST /api/generate/stream: /api/generate's SSE answer, whatever "stream" says."""
    return await generate(request, stream=True)


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


def _filters(request: Request) -> Filters:
    q = request.query_params       # an empty value is the same as none
    return Filters(start=parse_when(q.get("since")), end=parse_when(q.get("until")), tz=q.get("tz") or "UTC",
                   models=tuple(v for v in q.getlist("model") if v),
                   sources=tuple(v for v in q.getlist("source") if v))


async def _figures(request: Request, read):
    """``read(gyro, filters)`` off the event loop within STATS_TIMEOUT_S, as a JSON answer."""
    try:
        gyro = await _service()
        filters = _filters(request)
        return JSONResponse(await off_loop(read, gyro, filters, timeout=STATS_TIMEOUT_S))
    except GyroscopeError as exc:
        return _error(exc)
    except TimeoutError:
        return _error(StorageError(
            f"The statistics could not be read within {STATS_TIMEOUT_S:g} s: the database file "
            "is busy (another program may hold a lock on it). Try again in a few seconds.",
            retry_in_s=5.0))


async def stats(request: Request) -> JSONResponse:
    return await _figures(request, lambda gyro, filters: gyro.stats(filters))


METRIC_FIELDS = ("total_requests", "cached_requests", "failed_requests", "total_cost", "total_tokens",
                 "cache_hit_rate", "failure_rate", "average_cost")


def _metrics(gyro, filters: Filters) -> dict:
    # The same function as `stats --json`, so the numbers are equal by construction.
    totals = gyro.stats(filters)
    breakers = [admin_api.breaker_info(i) for i in gyro.breakers.all_info() if "|" in i["name"]]
    return {**{k: totals[k] for k in METRIC_FIELDS}, "breakers": breakers}


async def metrics(request: Request) -> JSONResponse:
    return await _figures(request, _metrics)


async def prometheus(request: Request) -> Response:
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


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(OPENAPI)


# An empty value is the same as none (a form's blank field).
WHEN = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"},
                  {"const": ""}]}
FILTERS = (Query("since", "From this day or time (ISO 8601, in tz)", schema=WHEN),
           Query("until", "Up to this day or time (ISO 8601, in tz)", schema=WHEN),
           Query("tz", "Time zone of the days, e.g. Europe/Berlin (default UTC)",
                 schema={"type": "string", "enum": ["", *sorted(zoneinfo.available_timezones())]}),
           Query("model", "Only these models", repeat=True),
           Query("source", "Only these sources (page, api, cli, ...)", repeat=True))
S = schemas
EVENTS = sse_events("delta", "reasoning", "retry", "done", "error")
ENDPOINTS: list[tuple[Operation, object]] = [
    (Operation("GET", "/api/health", "Liveness and the active provider", answer=S.Health), health),
    (Operation("POST", "/api/generate", "Generate (SSE when stream is true)", body=S.GenerateBody,
               answer=S.GenerationOut, events=EVENTS), generate),
    (Operation("POST", "/api/generate/stream", "Generate as Server-Sent Events (delta, retry, "
               "reasoning, done, error)", body=S.GenerateBody, events=EVENTS), generate_stream),
    (Operation("GET", "/api/generate/metrics", "The seed's figures and each breaker", answer=S.Metrics,
               query=FILTERS), metrics),
    (Operation("GET", "/api/stats", "Totals, as `python -m core stats --json`", answer=S.Stats,
               query=FILTERS), stats),
    (Operation("POST", "/api/cache/clear", "Clear the response cache (audited)", body=S.CacheClearBody,
               answer=S.CacheCleared, admin=True, tag="admin"), admin_api.cache_clear),
    (Operation("POST", "/api/breaker/reset", "Close breakers by hand (audited)", body=S.BreakerResetBody,
               answer=S.BreakersReset, admin=True, tag="admin"), admin_api.breaker_reset),
    (Operation("GET", "/api/settings", "Every setting", answer=S.SettingsOut, admin=True, tag="admin"),
     admin_api.settings_get),
    (Operation("PATCH", "/api/settings", "Change settings: all valid and stored, or none (audited)",
               body=S.SettingsPatch, answer=S.SettingsChanged, admin=True, tag="admin"), admin_api.settings_patch),
    (Operation("GET", "/api/metrics", "Prometheus exposition", text=CONTENT_TYPE), prometheus),
    (Operation("GET", "/api/openapi.json", "This document"), openapi_json),
    # The OpenAI-compatible gateway (core/http/openai_compat.py): OpenAI's bodies and errors.
    (Operation("POST", "/v1/chat/completions", "Chat completion, OpenAI's wire format (SSE when "
               "stream is true)", body=ChatCompletionRequest, answer=S.ChatCompletionOut,
               events=sse_events(None), error=S.OpenAIErrorBody, tag="v1"), openai_compat.chat_completions),
    (Operation("GET", "/v1/models", "The models on offer", answer=S.ModelList, error=S.OpenAIErrorBody,
               tag="v1"), openai_compat.list_models),
    (Operation("GET", "/v1/models/{model:path}", "One model", answer=S.ModelOut, error=S.OpenAIErrorBody,
               tag="v1"), openai_compat.get_model),
]
OPENAPI = document([op for op, _ in ENDPOINTS])


def routes() -> list[Route]:
    """The API's routes, for st.App; the last answers unknown /api and /v1 paths in JSON."""
    api = [Route(op.path, handler, methods=[op.method]) for op, handler in ENDPOINTS]
    return [*api, guard.JsonForUnknown(api)]


def asgi_app(config: guard.GuardConfig | None = None) -> Starlette:
    """The API alone behind the guard, as streamlit_app.py serves it beside the dashboard
    (for tests and benchmarks; the caller closes the service)."""
    api = routes()
    return Starlette(routes=api, middleware=guard.middleware(config, api))


@asynccontextmanager
async def lifespan(app):
    yield None
    from . import service
    if service._default is not None:
        service._default.close()
