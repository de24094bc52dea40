"""Pydantic models of the /v1 request bodies: they validate what the handlers take and are
the schemas the OpenAPI document is built from (so the two never drift).

Validation is strict (``"5"`` is not a number, ``1.0`` is not a whole number) and extra
fields are allowed: unknown chat parameters are forwarded upstream untouched. The ranges
are the pipeline's own, so a body that passes here is never refused later for a range.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..pipeline import MAX_TOKENS

_OPEN = ConfigDict(strict=True, extra="allow")


class TextPart(BaseModel):
    """One part of a message's content: ``{"type": "text", "text": ...}``, an image, audio..."""

    model_config = _OPEN
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = _OPEN
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A tool call the assistant made, as it comes back in an earlier turn."""

    model_config = _OPEN
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One turn of the conversation."""

    model_config = _OPEN
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "ChatMessage":
        # What OpenAI refuses too: caught here, a bad turn costs no upstream call and no row.
        if self.content is None and self.role not in ("assistant", "function"):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self


class FunctionDef(BaseModel):
    model_config = _OPEN
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = _OPEN
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = _OPEN
    name: str


class NamedToolChoice(BaseModel):
    model_config = _OPEN
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = _OPEN
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's body. Parameters not named here are forwarded."""

    model_config = _OPEN
    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    reasoning_effort: str | None = None


# Pydantic names the member of a union it tried ("str", "list[str]", "NamedToolChoice")
# in an error's location; the caller knows the field by its path only.
_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def error_param(loc: tuple) -> str:
    """An error location as OpenAI writes a param: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (part[:1].isupper() or "[" in part or "-" in part or part in _TAGS):
            out += f".{part}" if out else part
    return out or "body"


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(param, message) of a validation error, the message saying what to send instead."""
    error = exc.errors(include_url=False)[0]
    param = error_param(error["loc"])
    if error["type"] == "missing":
        return param, f"Missing required parameter: '{param}'."
    if error["type"] == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: {param}"
    return param, f"Invalid value for '{param}': {error['msg'].removeprefix('Value error, ')}."
