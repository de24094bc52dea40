"""The /api bodies as pydantic models: the handlers validate with them and the OpenAPI
document (core/http/openapi.py) is generated from them, so the two cannot drift apart.

Types are strict (``"stream": "false"``, ``"cache": "no"`` and ``"top_p": true`` are 400s)
and a refusal is worded as before: ``explain`` turns pydantic's errors into one message
that names the field and what it takes.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (AllowInfNan, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError, WithJsonSchema, create_model)

from ..errors import InvalidParameter
from ..models import MAX_MODEL_CHARS, check_unicode
from ..pipeline import MAX_TOKENS
from ..settings import SETTINGS, spec

# Any finite JSON number, never a boolean (one "number" in the document).
Number = Annotated[StrictInt | Annotated[StrictFloat, AllowInfNan(False)], WithJsonSchema({"type": "number"})]


def number(ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A finite number within bounds, checked on both of its JSON forms (whole or not) and
    stated once in the document."""
    schema: dict[str, Any] = {"type": "number"}
    for key, name in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum")):
        if locals()[key] is not None:
            schema[name] = locals()[key]
    bounds = Field(ge=ge, gt=gt, le=le, lt=lt)
    whole = Field(ge=None if ge is None else math.ceil(ge), gt=None if gt is None else math.floor(gt),
                  le=None if le is None else math.floor(le), lt=None if lt is None else math.ceil(lt))
    return Annotated[Annotated[StrictInt, whole] | Annotated[StrictFloat, AllowInfNan(False), bounds],
                     WithJsonSchema(schema)]


class Strict(BaseModel):
    """A request body: unknown fields are refused, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateBody(Strict):
    """POST /api/generate (and /api/generate/stream): a prompt and the per-request switches.
    The ranges are the pipeline's own, so a body that passes here is not refused for one."""

    prompt: StrictStr = Field(pattern=r"\S", description="The text to answer.")
    system: StrictStr | None = Field(None, description="A system prompt.")
    model: StrictStr | None = Field(None, pattern=r"\S", max_length=MAX_MODEL_CHARS,
                                    description="Model; default: the provider.default_model setting.")
    temperature: number(ge=0, le=2) | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS, description="Most tokens in the answer.")
    top_p: number(gt=0, le=1) | None = None
    seed: StrictInt | None = Field(None, ge=-2**63, lt=2**63)
    stop: list[StrictStr] | None = Field(None, max_length=4, description="At most 4 stop sequences.")
    cache: StrictBool = Field(True, description="Serve from / store in the response cache.")
    refresh: StrictBool = Field(False, description="Skip the cached answer and store a new one.")
    optimize: StrictBool | None = Field(None, description="Optimize the prompt; null: the setting decides.")
    stream: StrictBool = Field(False, description="Answer with Server-Sent Events.")


# A blank text in words of its own (a pattern error would only say "must match \S").
_BLANK = {"prompt": "The prompt is empty. Type what you want written.", "model": "Pick a model."}


class CacheClearBody(Strict):
    """POST /api/cache/clear: everything, or what was cached before a day (server time)."""

    before: Annotated[StrictStr, Field(pattern=r"^\d{4}-\d{2}-\d{2}$", json_schema_extra={"format": "date"})] \
        | None = Field(None, description="YYYY-MM-DD: clear only answers cached before this day.")


class BreakerResetBody(Strict):
    """POST /api/breaker/reset: every breaker, those of one upstream, or one upstream and model."""

    upstream: StrictStr | None = Field(None, description="e.g. 'simulator' or https://api.openai.com/v1")
    model: StrictStr | None = None


def _setting_type(s) -> Any:
    """A setting's JSON type with its bounds (a float setting takes any finite number)."""
    bounds = {"ge": s.min, "le": s.max}
    if s.choices:
        return Literal[s.choices]
    if s.type is float:
        return number(ge=s.min, le=s.max)
    kind = {bool: StrictBool, int: StrictInt, str: StrictStr}[s.type]
    return Annotated[kind, Field(**bounds)] if s.type is int else kind


def _setting_field(s) -> tuple[Any, Any]:
    # Not nullable: the None default only marks a setting left out (it is never validated).
    return _setting_type(s), Field(None, alias=s.name, title=s.name, description=s.help)


# PATCH /api/settings: any of the settings, each with its type and bounds from core/settings.py.
SettingsPatch = create_model("SettingsPatch", __base__=Strict,
                             **{s.name.replace(".", "__"): _setting_field(s) for s in SETTINGS})


# -- answers (for the document; the handlers build them from the core's own dicts) ---------------
class Open(BaseModel):
    """An answer object that may carry more fields than listed."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(Open):
    kind: str
    message: str
    retry_in_s: float | None = None


class ErrorBody(BaseModel):
    """Every /api error: what went wrong and what to do."""

    error: ErrorDetail


class Health(Open):
    status: str
    provider: str
    simulated: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerationOut(Open):
    request_id: str
    content: str
    model: str
    finish_reason: str | None = None
    usage: Usage | None = None
    cost: float | None = None
    from_cache: bool
    attempts: int
    outcome: str
    latency_ms: float


class Stats(Open):
    total_requests: int
    cached_requests: int
    failed_requests: int
    total_cost: float
    total_tokens: int


class BreakerInfo(Open):
    upstream: str
    model: str
    state: str
    failures: int


class Metrics(BaseModel):
    """The seed's figures (equal to `python -m core stats --json`) and each breaker."""

    total_requests: int
    cached_requests: int
    failed_requests: int
    total_cost: float
    total_tokens: int
    cache_hit_rate: float
    failure_rate: float
    average_cost: float
    breakers: list[BreakerInfo]


SettingValue = StrictBool | StrictInt | float | StrictStr


class SettingsOut(BaseModel):
    version: int
    settings: dict[str, SettingValue]


class SettingsChanged(SettingsOut):
    changed: list[str]


class CacheCleared(BaseModel):
    removed: int


class BreakersReset(BaseModel):
    reset: list[BreakerInfo]


# /v1 answers (the request model is core/http/openai_schemas.py's ChatCompletionRequest).
class OpenAIErrorDetail(Open):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIErrorBody(BaseModel):
    """Every /v1 error, in OpenAI's shape (so its SDK raises its own exception classes)."""

    error: OpenAIErrorDetail


class ChatCompletionOut(Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ModelOut(Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Open):
    object: Literal["list"]
    data: list[ModelOut]


# -- refusals in words ------------------------------------------------------------------------------
_WORDS = {str: "a string", bool: "true or false", int: "a whole number", float: "a number",
          list: "a list of strings"}


def _expects(annotation) -> tuple[str, bool]:
    """What a field takes, in words, and whether null is allowed."""
    args = typing.get_args(annotation)
    nullable = type(None) in args
    if nullable:
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    base = typing.get_origin(annotation) or annotation
    if base in (typing.Union, types.UnionType):     # Number: an int or a float
        return _WORDS[float], nullable
    return _WORDS.get(base, "of another type"), nullable


def shown(value: Any) -> str:
    """A value as an error message shows it: scalars as sent (shortened), containers by kind."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    try:
        return json.dumps(value)[:40]
    except ValueError:
        return "a number too long to show"


def validate(model: type[BaseModel], data: Any, missing_hint: str = "") -> BaseModel:
    """``data`` as ``model``, or InvalidParameter naming the field and what it takes."""
    if not isinstance(data, dict):
        raise InvalidParameter(f"The body must be a JSON object{missing_hint}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidParameter(explain(model, exc, data, missing_hint)) from None


def explain(model: type[BaseModel], exc: ValidationError, data: dict, missing_hint: str = "") -> str:
    """One message for a refused body: unknown fields first, then a missing one, then the
    first wrong value in the body's order."""
    errors = exc.errors(include_url=False)
    names = {f.alias or n: f for n, f in model.model_fields.items()}
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        if model is SettingsPatch:
            spec(unknown[0])        # "Unknown setting 'x'. Run `python -m core settings list`..."
        return f"Unknown field(s): {', '.join(unknown)}. Allowed: {', '.join(sorted(names))}."
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
    if missing:
        return f"The request needs a \"{missing[0]}\"{missing_hint}."
    order = {name: i for i, name in enumerate(data)}
    first = min(errors, key=lambda e: order.get(e["loc"][0], len(order)))
    name = str(first["loc"][0])
    value = data.get(name)
    if model is SettingsPatch:
        spec(name).parse(value)     # bounds and choices in the Settings page's words
        return f"{name} must be {_WORDS[spec(name).type]} (got {shown(value)})."
    kinds = {e["type"] for e in errors if e["loc"][0] == name}
    if "string_unicode" in kinds:       # a lone surrogate ("\ud800"), named as everywhere else
        for text in value if isinstance(value, list) else [value]:
            check_unicode(name, text if isinstance(text, str) else None)
    if "string_pattern_mismatch" in kinds:
        return _BLANK.get(name) or f"{name} must look like 2026-11-30 (got {shown(value)})."
    words, nullable = _expects(names[name].annotation)
    bounds = _bounds(model, name) if kinds & _RANGE_ERRORS else ""
    if bounds:
        return f"{name} must be {words} {bounds} (got {shown(value)})."
    return f"{name} must be {words}{' or null' if nullable else ''} (got {shown(value)})."


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long",
                 "string_too_long"}


def _bounds(model: type[BaseModel], name: str) -> str:
    """A field's range in words ('from 1 to 128,000', 'above 0 and at most 1'), read from
    the model's own JSON schema (the document states the same)."""
    prop = model.model_json_schema(by_alias=True)["properties"][name]
    limits: dict[str, Any] = {}
    for part in [prop, *prop.get("anyOf", ())]:
        limits.update({k: v for k, v in part.items() if k in (
            "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "maxLength", "maxItems")})

    def num(v) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"

    if "maxLength" in limits:
        return f"of at most {num(limits['maxLength'])} characters"
    if "maxItems" in limits:
        return f"of at most {num(limits['maxItems'])} items"
    if "minimum" in limits and "maximum" in limits:
        return f"from {num(limits['minimum'])} to {num(limits['maximum'])}"
    low = (f"above {num(limits['exclusiveMinimum'])}" if "exclusiveMinimum" in limits
           else f"at least {num(limits['minimum'])}" if "minimum" in limits else "")
    high = (f"at most {num(limits['maximum'])}" if "maximum" in limits
            else f"below {num(limits['exclusiveMaximum'])}" if "exclusiveMaximum" in limits else "")
    return " and ".join(p for p in (low, high) if p)
