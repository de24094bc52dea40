"""The OpenAPI 3.1 document of /api and /v1, generated from the operations the routes are
built from and the pydantic models their handlers validate with (never kept by hand).

    op = Operation("POST", "/api/generate", "Generate", body=GenerateBody, answer=GenerationOut)
    document([op, ...])       # the dict served at GET /api/openapi.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .schemas import ErrorBody

REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")      # Starlette's {model:path} is OpenAPI's {model}


def sse_events(*names: str) -> dict:
    """The schema of one Server-Sent Event (OpenAPI 3.1: ``schema`` describes each event):
    one of ``names``, with a JSON ``data`` line (``None`` among the names: data-only events)."""
    data = {"type": "string", "contentMediaType": "application/json"}
    kinds = [n for n in names if n is not None]
    event = {"enum": kinds} if kinds else {"type": "string"}
    return {"type": "object", "required": ["data"] + (["event"] if None not in names else []),
            "properties": {"event": event, "data": data}}


@dataclass(frozen=True)
class Query:
    """One query parameter (a string, or a repeatable list of them)."""

    name: str
    description: str
    repeat: bool = False
    schema: dict | None = None          # of one value; default: any string


@dataclass(frozen=True)
class Operation:
    """One method on one path: its body, its answer, and how it fails."""

    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None        # the model the handler validates with
    body_required: bool = True
    answer: type[BaseModel] | None = None      # JSON answer (200)
    events: dict | None = None                 # one SSE event's schema: also (or, with no
                                               # answer, only) a Server-Sent Events stream
    text: str | None = None                    # a text answer of this media type (200)
    query: tuple[Query, ...] = ()
    error: type[BaseModel] = ErrorBody         # /v1 has OpenAI's error shape
    admin: bool = False                        # needs X-Admin-Password when one is set
    tag: str = "api"


def document(operations: list[Operation], title: str = "Gyroscope", version: str = "0.1.0") -> dict:
    """The OpenAPI 3.1 document for ``operations``."""
    wanted = {(op.body, "validation") for op in operations if op.body}
    wanted |= {(m, "serialization") for op in operations for m in (op.answer, op.error) if m}
    refs, defs = models_json_schema(sorted(wanted, key=lambda pair: (pair[0].__name__, pair[1])),
                                    ref_template=REF)
    paths: dict[str, dict] = {}
    for op in operations:
        paths.setdefault(_PARAM.sub(r"{\1}", op.path), {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Gyroscope's HTTP API (/api) and its OpenAI-compatible gateway (/v1)."},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer",
                          "description": "GYROSCOPE_API_TOKEN, when it is set"},
                "adminPassword": {"type": "apiKey", "in": "header", "name": "X-Admin-Password",
                                  "description": "GYROSCOPE_ADMIN_PASSWORD, when it is set"},
            },
        },
        # Either nothing (no token configured) or the token.
        "security": [{}, {"token": []}],
    }


def _operation(op: Operation, refs: dict) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if op.answer:
        content["application/json"] = {"schema": refs[(op.answer, "serialization")]}
    if op.events:
        content["text/event-stream"] = {"schema": op.events}
    if op.text:
        content[op.text.split(";")[0]] = {"schema": {"type": "string"}}
    error = {"description": "What went wrong and what to do",
             "content": {"application/json": {"schema": refs[(op.error, "serialization")]}}}
    out: dict[str, Any] = {
        "summary": op.summary, "tags": [op.tag],
        "operationId": op.method.lower() + "_" + re.sub(r"\W+", "_", _PARAM.sub(r"\1", op.path)).strip("_"),
        "responses": {"200": {"description": "OK", "content": content}, "default": error},
    }
    if op.body:
        out["requestBody"] = {"required": op.body_required,
                              "content": {"application/json": {"schema": refs[(op.body, "validation")]}}}
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in _PARAM.findall(op.path)]
    if op.query:
        params += [
            {"name": q.name, "in": "query", "required": False, "description": q.description,
             "schema": {"type": "array", "items": q.schema or {"type": "string"}} if q.repeat
             else q.schema or {"type": "string"},
             **({"style": "form", "explode": True} if q.repeat else {})}
            for q in op.query]
    if params:
        out["parameters"] = params
    if op.admin:
        out["security"] = [{}, {"adminPassword": []}, {"token": [], "adminPassword": []}]
    return out
