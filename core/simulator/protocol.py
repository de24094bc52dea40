"""The simulator's wire format: validating chat requests and building completion responses."""

from __future__ import annotations

import hashlib
import json
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

from core import tokens
from core.simulator import textgen, tools
from core.simulator.faults import ApiError
from core.simulator.usage import hidden_reasoning

MODELS: dict[str, int] = {
    "gpt-4o-mini": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "o4-mini": 200_000,          # a reasoning model: hidden reasoning tokens (simulator/usage.py)
    "gpt-oss-20b": 131_072,      # open weights, usually self-hosted (vLLM, llama.cpp); reasons too
}
DEFAULT_MODEL = "gpt-4o-mini"
ROLES = ("system", "assistant", "user", "function", "tool", "developer")
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
        if role == "assistant" and message.get("tool_calls"):
            if not isinstance(message["tool_calls"], list):
                raise _bad_type(f"{where}.tool_calls", "an array", message["tool_calls"])
            item["tool_calls"] = message["tool_calls"]
        if role == "tool":
            if message.get("tool_call_id") is None:
                raise _missing(f"{where}.tool_call_id")
            item["tool_call_id"] = message["tool_call_id"]
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
    n: int = 1
    stop: list[str] | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return None if stop is None else [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad_type("stop", "one of a string or array of strings", stop)
    if len(stop) > 4:
        raise ApiError(400, f"Invalid 'stop': array too long. Expected an array with maximum length 4, but got "
                            f"an array with length {len(stop)} instead.", param="stop", code="array_above_max_length")
    return stop


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
    n = _integer(body, "n", 1)
    if n is not None and n > 128:
        raise ApiError(400, f"Invalid 'n': integer above maximum value. Expected a value <= 128, but got {n} "
                            "instead.", param="n", code="integer_above_max_value")
    stop = _stop(body)
    tool_list, tool_choice = tools.parse_tools(body)
    logprobs = _flag(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0)
    if top_logprobs is not None and (top_logprobs > 20 or not logprobs):
        raise ApiError(400, "Invalid value for 'top_logprobs': it must be between 0 and 20, and 'logprobs' "
                            "must be true.", param="top_logprobs", code="invalid_value")
    if model not in MODELS:
        message = f"The model `{model}` does not exist or you do not have access to it."
        raise ApiError(404, message, param="model", code="model_not_found")
    max_tokens = max_completion if max_completion is not None else legacy_max
    return ChatRequest(model, messages, stream, include_usage, max_tokens, temperature, top_p, seed,
                       n or 1, stop, tool_list, tool_choice, logprobs, top_logprobs)


# ----- completions


@dataclass
class Choice:
    """One of the n replies: text, or a tool call."""

    content: str | None
    finish_reason: str
    tool_calls: list[dict] | None = None

    @property
    def pieces(self) -> list[str]:
        return textgen.pieces(self.content or "")

    def message(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": self.content, "refusal": None, "annotations": []}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


@dataclass
class Completion:
    """One generated reply (n of them with ``n``), with what the wire format needs around it."""

    id: str
    created: int
    model: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int          # includes reasoning_tokens, as OpenAI counts them
    choices: list[Choice] | None = None
    cached_tokens: int = 0          # part of prompt_tokens
    reasoning_tokens: int = 0       # part of completion_tokens
    cache_write_tokens: int = 0     # part of prompt_tokens; reported only with report_cache_writes
    top_logprobs: int | None = None  # None: logprobs not asked for; else alternatives per token

    def __post_init__(self) -> None:
        if self.choices is None:
            self.choices = [Choice(self.content, self.finish_reason)]

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
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0,
                                      **({"cache_write_tokens": self.cache_write_tokens}
                                         if self.cache_write_tokens else {})},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def as_json(self, reasoning: dict[str, str] | None = None) -> dict[str, Any]:
        """The plain answer; ``reasoning`` ({field: text}) adds a reasoning model's thinking."""
        choices = [{"index": i, "message": {**c.message(), **(reasoning or {})},
                    "logprobs": self.logprobs(c.pieces) if c.tool_calls is None else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(self.choices)]
        return {**self._envelope("chat.completion"), "choices": choices, "usage": self.usage()}

    def logprobs(self, pieces: list[str]) -> dict[str, Any] | None:
        """OpenAI's logprobs object for these pieces of text, when they were asked for."""
        if self.top_logprobs is None:
            return None
        return {"content": [textgen.logprob(p, self.top_logprobs) for p in pieces], "refusal": None}

    def chunk(self, delta: dict, finish_reason: str | None = None, with_usage: bool = False,
              index: int = 0) -> dict[str, Any]:
        content = delta.get("content")
        logprobs = self.logprobs([content]) if content else None
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        if with_usage:  # with include_usage, OpenAI sends "usage": null on every chunk but the last
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()}


def complete(request: ChatRequest, reply: str | None = None) -> Completion:
    """Generate the reply for a validated request (``reply``: this text instead); raises
    ApiError when the prompt does not fit."""
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
    choices = [_choice(request, i, reply) for i in range(request.n)]
    visible = sum(tokens.count_text(c.content or "", request.model)
                  + sum(tokens.count_text(t["function"]["arguments"], request.model)
                        for t in c.tool_calls or ()) for c in choices)
    hidden = hidden_reasoning(request.model, visible, request.max_tokens)
    alphabet = string.ascii_letters + string.digits
    return Completion(
        id="chatcmpl-" + "".join(secrets.choice(alphabet) for _ in range(29)),
        created=int(time.time()),
        model=request.model,
        content=choices[0].content or "",
        finish_reason=choices[0].finish_reason,
        prompt_tokens=prompt,
        completion_tokens=visible + hidden,
        reasoning_tokens=hidden,
        choices=choices,
        top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )


def _choice(request: ChatRequest, index: int, reply: str | None = None) -> Choice:
    """Reply number ``index``: the first is what n=1 would answer; later ones differ."""
    function = tools.chosen_tool(request.tools, request.tool_choice, request.messages)
    if function is not None:
        call = {"id": tools.call_id(function, [request.messages, index]), "type": "function",
                "function": {"name": function["name"], "arguments": tools.arguments(function, request.messages)}}
        return Choice(None, "tool_calls", [call])
    seed = request.seed if index == 0 else [request.seed, index]
    text = reply if reply is not None else textgen.generate(
        request.model, request.messages, seed=seed, temperature=request.temperature, top_p=request.top_p)
    if request.messages[-1].get("role") == "tool":
        text = tools.after_tool(request.messages) + text
    for stop in request.stop or ():      # the answer ends before a stop sequence, which is not sent
        if stop and stop in text:
            text = text[:text.index(stop)]
    content, cut = textgen.truncate(text, request.max_tokens, request.model)
    return Choice(content, "length" if cut else "stop")
