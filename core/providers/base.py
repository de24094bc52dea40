"""The provider plugin interface.

A provider turns chat parameters into an answer from one upstream. Subclass
``Provider``, implement ``complete``, ``stream`` and ``models``, and register a factory
``factory(config) -> Provider`` (built-ins in ``core.providers``; third parties through
the ``gyroscope.providers`` entry-point group). ``complete_blocking`` is optional: with it,
sync callers skip the event loop (``Gyroscope.generate`` calls it on their thread)::

    class EchoProvider(Provider):
        name = "echo"
        async def complete(self, params, timeout): ...
        def stream(self, params, timeout): ...
        async def models(self): return ["echo-1"]

Providers raise ``core.errors.UpstreamError`` subclasses; retries, the breaker, the
cache and history are the pipeline's job, never the provider's.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass(frozen=True)
class Timeouts:
    """Per-attempt time limits in seconds."""

    connect: float
    read: float


@dataclass
class Usage:
    """Token usage as the API reported it. The details are parts of the two counts (as
    OpenAI reports them): ``cached_tokens`` and ``cache_write_tokens`` of the prompt,
    ``reasoning_tokens`` of the completion."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """A complete answer."""

    content: str
    model: str
    finish_reason: str
    usage: Usage | None
    reasoning: str = ""          # a reasoning model's thinking, kept apart from the answer
    tool_calls: list[dict] | None = None   # OpenAI's shape: {id, type, function: {name, arguments}}
    choices: list[dict] | None = None      # every choice as sent, when the request had n > 1
    logprobs: dict | None = None           # choice 0's logprobs, when asked for
    headers: dict | None = None            # the answer's x-ratelimit-* headers, for pacing


@dataclass
class Delta:
    """One streamed event: text (or a reasoning model's thinking), and on the last events
    finish_reason and/or usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    reasoning: str = ""
    tool_calls: list[dict] | None = None   # tool-call pieces as sent: {index, id?, type?, function}
    index: int = 0                         # the choice this belongs to (n > 1)
    logprobs: dict | None = None


class Stream(ABC):
    """An open streamed answer; ``aclose`` must close the upstream connection at once."""

    headers: dict | None = None  # the response's x-ratelimit-* headers, for pacing

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[Delta]: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Provider(ABC):
    """One upstream that speaks chat completions."""

    name: str = "provider"
    base_url: str = ""

    @property
    def upstream_id(self) -> str:
        """What the circuit breaker is keyed by (with the model)."""
        return self.base_url or self.name

    @abstractmethod
    async def complete(self, params: dict, timeout: Timeouts) -> Completion:
        """One attempt at a plain answer."""

    @abstractmethod
    async def stream(self, params: dict, timeout: Timeouts) -> Stream:
        """One attempt at a streamed answer; returns once the response has started."""

    @abstractmethod
    async def models(self) -> list[str]:
        """Models this upstream offers."""

    def complete_blocking(self, params: dict, timeout: Timeouts) -> Completion:
        """Optional: ``complete`` for sync callers, blocking the calling thread (no event loop)."""
        raise NotImplementedError

    @property
    def blocking(self) -> bool:
        """True when ``complete_blocking`` is implemented where ``complete`` is (a subclass
        that overrides only ``complete`` must not have sync callers bypass it)."""
        return _has_blocking(type(self))

    def context_window(self, model: str) -> int | None:
        """Tokens the model accepts, when known."""
        return None

    async def count_tokens(self, model: str, messages: list[dict], text: str) -> tuple[int, int] | None:
        """Optional: (prompt tokens, tokens of ``text``) by the upstream's own tokenizer, for
        answers that came without usage; None when it has none (then the pipeline estimates)."""
        return None

    async def aclose(self) -> None:
        """Release connections."""


@functools.cache
def _has_blocking(cls: type) -> bool:
    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in vars(k))
    return owner("complete_blocking") is not Provider and issubclass(owner("complete_blocking"), owner("complete"))
