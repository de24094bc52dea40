"""Value objects that cross the public surface: request, result, retry notice."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidParameter
from .providers.base import Usage
from .tokens import message_texts

# Request ids must be unique, not secret: a generator seeded from os.urandom (and again in
# every forked child) costs a fraction of uuid4's system call per id.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id(ts: float | None = None, rng: random.Random = _ids) -> str:
    """A UUIDv7 as 32 hex digits: milliseconds since 1970 (now, or ``ts``), then 74 random
    bits (from ``rng``). Ids made later sort later, so the history's unique index grows at
    its end (measured: a third less work per row than random ids, which land on a random
    page each)."""
    ms = time.time_ns() // 1_000_000 if ts is None else int(ts * 1000)
    value = ms << 80 | 0x7 << 76 | rng.getrandbits(12) << 64
    return f"{value | 0b10 << 62 | rng.getrandbits(62):032x}"


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    """The chat messages of a prompt and an optional system prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]


# Chat parameters that change no answer: left out of the cache key, so callers that only
# differ in who they are (``user``: an end-user id for abuse monitoring; ``metadata`` and
# ``store``: stored-completions bookkeeping) share cached answers, as /api callers do.
NOT_OUTPUT_PARAMS = frozenset({"user", "metadata", "store"})


@dataclass
class GenerationRequest:
    """What to generate, and how (the per-request switches).

    The request is a conversation: ``messages`` (OpenAI chat messages, content as a string
    or a list of parts) with ``extra`` chat parameters (tools, tool_choice, n, stop, ...)
    forwarded verbatim upstream. ``prompt`` + ``system`` is the shortcut the page, /api
    and the CLI use; it builds the messages when ``messages`` is not given."""

    prompt: str | None = None
    system: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    cache: bool = True
    refresh: bool = False
    optimize: bool | None = None      # None: the optimizer.enabled setting decides
    source: str = "api"
    messages: list[dict] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None         # the batch job a row belongs to (history keeps it)

    def conversation(self) -> list[dict]:
        """The messages sent upstream (built from the prompt shortcut when not given)."""
        if self.messages is not None:
            return self.messages
        return chat_messages(self.prompt, self.system)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "api") -> "GenerationRequest":
        """Build from JSON; unknown fields and wrong types are refused, so typos and
        ``"cache": "no"`` do not pass silently."""
        if not isinstance(data, dict):
            raise InvalidParameter("The request body must be a JSON object with a \"prompt\".")
        # /api takes the prompt shortcut only; conversations come through /v1.
        allowed = set(cls.__dataclass_fields__) - {"source", "messages", "extra", "job_id"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise InvalidParameter(f"Unknown field(s): {', '.join(unknown)}. Allowed: "
                                   f"{', '.join(sorted(allowed))}.")
        if "prompt" not in data:
            raise InvalidParameter("The request needs a \"prompt\", e.g. {\"prompt\": \"Hello\"}.")
        for name, value in data.items():
            check_json_type(name, value, _FIELD_TYPES[name])
        req = cls(**data, source=source)
        req.check_text()
        return req

    def check_text(self) -> None:
        """Refuse text that cannot be stored or sent (lone surrogates) and model names past
        MAX_MODEL_CHARS, naming the field; raises InvalidParameter."""
        for name in ("prompt", "system", "model"):
            check_unicode(name, getattr(self, name))
        for i, message in enumerate(self.messages or ()):
            for text in message_texts(message):
                check_unicode(f"messages[{i}]", text)
        for text in self.stop or ():
            check_unicode("stop", text)
        if self.model is not None:
            check_model_name(self.model)


# The longest model name taken: each name gets a breaker in memory and rows in the
# database, so an unbounded one is a way to fill both. Real names are under 100 characters.
MAX_MODEL_CHARS = 256

# JSON types of the request fields: "bool" takes only true/false, "number" any finite
# number but not a boolean, "int" a whole number (not 5.0, not a boolean).
_FIELD_TYPES = {"prompt": "str", "system": "str?", "model": "str?", "temperature": "number?",
                "max_tokens": "int?", "top_p": "number?", "seed": "int?", "stop": "strlist?",
                "cache": "bool", "refresh": "bool", "optimize": "bool?"}
_TYPE_WORDS = {"str": "a string", "number": "a number", "int": "a whole number",
               "strlist": "a list of strings", "bool": "true or false"}


def check_json_type(name: str, value: Any, kind: str) -> None:
    """Raise InvalidParameter unless ``value`` is of JSON type ``kind`` ('bool', 'int',
    'number', 'str', 'strlist'; a trailing '?' also takes null), naming the field."""
    base = kind.rstrip("?")
    if value is None and kind.endswith("?"):
        return
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "number":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    elif base == "str":
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        # Scalars are shown as sent (shortened); containers by their kind only.
        shown = ("a list" if isinstance(value, list) else "an object" if isinstance(value, dict)
                 else json.dumps(value)[:40])
        raise InvalidParameter(f"{name} must be {_TYPE_WORDS[base]}"
                               f"{' or null' if kind.endswith('?') else ''} (got {shown}).")


def check_unicode(name: str, text: str | None) -> None:
    """Refuse text with lone surrogates (a JSON "\\ud800" escape, or bytes that are not
    UTF-8 in a command-line argument): it can be neither stored nor sent."""
    if text is None or text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(
            f"{name} contains a character that is not valid Unicode (a lone surrogate at "
            f"position {exc.start}). Send it as UTF-8 text.") from None


def short_repr(value: Any) -> str:
    """A value for an error message, shortened (a 4,000-digit number is not read)."""
    try:
        text = repr(value)
    except ValueError:   # an integer past Python's 4,300-digit limit for str()
        return "a number too long to show"
    return text if len(text) <= 40 else text[:30] + "…"


def check_model_name(model: str, name: str = "model") -> None:
    """Refuse a model name longer than MAX_MODEL_CHARS."""
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidParameter(f"{name} is {len(model):,} characters long; model names are at "
                               f"most {MAX_MODEL_CHARS}. Check the name.")


@dataclass
class RetryNotice:
    """Announced before each retry wait, so a page can tell the user."""

    kind: str
    attempt: int          # the attempt about to be made (2 = first retry)
    max_attempts: int
    wait_s: float
    status: int | None = None

    @property
    def message(self) -> str:
        what = {"rate_limited": "Rate limited", "server_error": "Service error",
                "timeout": "Timed out", "connection": "Connection failed",
                "model_loading": "The model is still loading",
                "malformed_response": "Garbled answer"}.get(self.kind, self.kind)
        if self.status and self.kind == "server_error":
            what += f" ({self.status})"
        return f"{what} — retrying in {self.wait_s:.1f} s (attempt {self.attempt} of {self.max_attempts})"


@dataclass
class Thinking:
    """A piece of a reasoning model's thinking, streamed apart from the answer text."""

    text: str


@dataclass
class GenerationResult:
    """What came back, and what it took (``request_id`` is new for every run)."""

    request_id: str = field(default_factory=new_request_id)
    content: str = ""
    reasoning: str = ""       # a reasoning model's thinking: shown apart, never cached
    model: str = ""
    finish_reason: str | None = None
    tool_calls: list[dict] | None = None   # the assistant's tool calls (choice 0), OpenAI's shape
    choices: list[dict] | None = None      # every choice as the upstream sent it, when n > 1
    logprobs: dict | None = None           # choice 0's logprobs, passed through when asked for
    usage: Usage | None = None
    tokens_estimated: bool = False
    token_source: str | None = None   # 'reported', 'tokenizer' (the server's) or 'estimated'
    cost: float | None = None
    cost_unknown: bool = False        # no price for this upstream and model: cost is None, not 0
    from_cache: bool = False
    cost_saved: float = 0.0
    attempts: int = 0
    retry_wait_s: float = 0.0
    latency_ms: float = 0.0
    upstream_ms: float = 0.0    # spent in provider calls (up to a stream's first piece)
    ttft_ms: float | None = None
    outcome: str = "ok"
    prompt_sent: str = ""
    optimizer: dict | None = None
    error: Any = None

    def usage_dict(self) -> dict | None:
        """The usage in the JSON shape of ``as_dict``."""
        u = self.usage
        if u is None:
            return None
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens, "cached_tokens": u.cached_tokens,
                "cache_write_tokens": u.cache_write_tokens, "reasoning_tokens": u.reasoning_tokens}

    def as_dict(self) -> dict:
        """The JSON shape of the CLI's --json and the API."""
        usage = self.usage_dict()
        out = {k: v for k, v in asdict(self).items() if k not in ("usage", "error", "prompt_sent")}
        for name in ("tool_calls", "choices", "logprobs"):   # conversation answers only
            if out[name] is None:
                del out[name]
        out["usage"] = usage
        out["latency_ms"] = round(self.latency_ms, 3)
        out["upstream_ms"] = round(self.upstream_ms, 3)
        if self.error is not None:
            out["error"] = self.error.as_dict()
        return out
