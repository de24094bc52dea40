"""Value objects that cross the public surface: request, result, retry notice."""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .providers.base import Usage

# Request ids must be unique, not secret: a generator seeded from os.urandom (and again in
# every forked child) costs a fraction of uuid4's system call per id.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """A UUIDv7 as 32 hex digits: milliseconds since 1970, then 74 random bits. Ids made
    later sort later, so the history's unique index grows at its end (measured: a third
    less work per row than random ids, which land on a random page each)."""
    value = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | _ids.getrandbits(12) << 64
    return f"{value | 0b10 << 62 | _ids.getrandbits(62):032x}"


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    """The chat messages of a prompt and an optional system prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]


@dataclass
class GenerationRequest:
    """What to generate, and how (the per-request switches)."""

    prompt: str
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

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "api") -> "GenerationRequest":
        """Build from JSON; unknown fields are refused so typos do not pass silently."""
        from .errors import InvalidParameter
        if not isinstance(data, dict):
            raise InvalidParameter("The request body must be a JSON object with a \"prompt\".")
        allowed = set(cls.__dataclass_fields__) - {"source"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise InvalidParameter(f"Unknown field(s): {', '.join(unknown)}. Allowed: "
                                   f"{', '.join(sorted(allowed))}.")
        return cls(**data, source=source)


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
    usage: Usage | None = None
    tokens_estimated: bool = False
    cost: float | None = None
    from_cache: bool = False
    cost_saved: float = 0.0
    attempts: int = 0
    retry_wait_s: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    outcome: str = "ok"
    prompt_sent: str = ""
    optimizer: dict | None = None
    error: Any = None

    def as_dict(self) -> dict:
        """The JSON shape of the CLI's --json and the API."""
        usage = None
        if self.usage is not None:
            usage = {"prompt_tokens": self.usage.prompt_tokens,
                     "completion_tokens": self.usage.completion_tokens,
                     "total_tokens": self.usage.total_tokens}
        out = {k: v for k, v in asdict(self).items() if k not in ("usage", "error", "prompt_sent")}
        out["usage"] = usage
        out["latency_ms"] = round(self.latency_ms, 3)
        if self.error is not None:
            out["error"] = self.error.as_dict()
        return out
