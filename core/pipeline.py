"""The one generation pipeline (see docs/architecture.md for the data flow):

    validate -> [optimize] -> cache lookup --hit--> record -> answer
                                   | miss
                             breaker permits? --no--> CircuitOpen -> record
                                   | yes
                      retry(provider attempt with per-attempt timeouts)
                                   |
                   cache store (complete answers only) -> record -> answer

It is a single async generator of text pieces. ``generate`` drains it, ``stream`` hands it
out. Sync callers run the same code: with ``blocking=True`` its only I/O is the provider's
blocking call (and blocking retry sleeps), so nothing in it ever suspends and
``core.portal.run_blocking`` drives it to the end with no event loop — there is no second
implementation. Every run hands exactly one history row to the database writer, and an
answer (or error) leaves only once that row is committed or spooled (see History.add).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time as _time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import tenacity

from . import budgets, errors, prices, tokens
from .history import RequestRecord
from .cache import cache_key
from .models import (NOT_OUTPUT_PARAMS, GenerationRequest, GenerationResult, RetryNotice, chat_messages,
                     short_repr)
from .providers.base import Completion, Delta, Timeouts, Usage
from .breaker import OPEN
from .settings import BY_NAME
from .retry import RetryPolicy, is_retryable, wait_backoff_or_retry_after
from .resilience.pacing import PacingConf

_log = logging.getLogger(__name__)
CACHE_CHUNK_CHARS = 24
# The most tokens a request may ask for, whatever the model: the bound of the
# generate.max_tokens setting (and the page's input). Without it a model with no known
# context window would be sent max_tokens=10**30.
MAX_TOKENS = int(BY_NAME["generate.max_tokens"].max)


# Called (no arguments) when a run has its answer and has handed its history row to the
# writer: all it has left is to wait for that commit. A batch slot sets it to send its next
# row meanwhile (core/batch/runner.py). Successful runs only: a failure may pause the job.
answered: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "gyroscope_answered", default=None)


@dataclass
class Clock:
    """Wall time, monotonic time and sleep, injected so tests never really wait."""

    time: Callable[[], float] = _time.time
    monotonic: Callable[[], float] = _time.perf_counter
    sleep: Callable[[float], "asyncio.Future"] = asyncio.sleep
    sleep_blocking: Callable[[float], None] = _time.sleep     # retry waits of sync callers


class _Tuning:
    """The retry policy, its wait strategy and the timeouts of one settings snapshot."""

    __slots__ = ("policy", "wait", "connect_s", "read_s", "_full", "pacing")

    def __init__(self, policy: RetryPolicy, wait, connect_s: float, read_s: float,
                 pacing: PacingConf = PacingConf(enabled=False)) -> None:
        self.policy, self.wait, self.connect_s, self.read_s = policy, wait, connect_s, read_s
        self.pacing = pacing
        self._full = Timeouts(connect=connect_s, read=read_s)

    def timeouts(self, left: float) -> Timeouts:
        """This attempt's timeouts: the configured ones, cut to the time left before the deadline."""
        if left >= self.connect_s and left >= self.read_s:
            return self._full
        return Timeouts(connect=min(self.connect_s, left), read=min(self.read_s, left))


class _Run:
    """The mutable state of one request while it runs."""

    def __init__(self, req: GenerationRequest, result: GenerationResult, t0: float) -> None:
        self.req = req
        self.result = result
        self.t0 = t0
        self.first_token_at: float | None = None
        self.messages: list[dict] = []
        self.optimizer_saved = 0
        self.recorded = False
        self.on_reasoning: Callable[[str], None] | None = None
        self.deltas = False
        self._prompt_tokens: int | None = None
        self.pricing: prices.Pricing = prices.OPENAI
        self.hold = None            # what the budget holds for this request (core/budgets.py)

    @property
    def prompt_tokens_est(self) -> int:
        """Prompt tokens counted with the tokenizer (only when needed: it costs ~0.1 ms)."""
        if self._prompt_tokens is None:
            self._prompt_tokens = tokens.count_messages(self.messages, self.result.model)
        return self._prompt_tokens


class Pipeline:
    """Runs requests against one provider with the cache, the breaker, retries and history."""

    budgets = None      # core.budgets.Budgets, or None: no spend limits
    # Called with (record, result, messages) as each history row is handed over: the one
    # point telemetry (core/telemetry.py) is fed from, whatever the outcome.
    observers: tuple = ()

    def __init__(self, provider, *, settings, cache, breakers, history, clock: Clock | None = None,
                 optimizer: Callable | None = None, rng=None, pacer=None) -> None:
        self.provider = provider
        self.pacer = pacer              # core.resilience.pacing.Pacer, or None: no pacing
        self.settings = settings
        self.cache = cache
        self.breakers = breakers
        self.history = history
        self.clock = clock or Clock()
        self.optimizer = optimizer
        self.rng = rng
        self._tuned: tuple[object, _Tuning] | None = None

    # -- public --------------------------------------------------------------------------
    def pricing(self, s) -> prices.Pricing:
        """How this upstream is priced under a settings snapshot (core/prices.py)."""
        return prices.pricing_for(self.provider.name, self.provider.base_url, s["prices.upstreams"])

    async def generate(self, req: GenerationRequest,
                       on_retry: Callable[[RetryNotice], None] | None = None,
                       blocking: bool = False) -> GenerationResult:
        """Run to completion; raises a GyroscopeError (with ``.result``) on failure.

        ``blocking=True`` (providers with ``complete_blocking`` only): the coroutine never
        suspends, so sync code runs it with ``core.portal.run_blocking``, no event loop."""
        result = GenerationResult()
        async for _ in self.run(req, result, streaming=False, on_retry=on_retry, blocking=blocking):
            pass
        return result

    def stream(self, req: GenerationRequest, result: GenerationResult,
               on_retry: Callable[[RetryNotice], None] | None = None,
               on_reasoning: Callable[[str], None] | None = None,
               deltas: bool = False) -> AsyncIterator[str]:
        """Text pieces as they arrive; ``result`` is filled in as it goes. A reasoning
        model's thinking goes to ``on_reasoning`` (and ``result.reasoning``), never the text.
        ``deltas=True`` (/v1): the provider's ``Delta`` objects instead of text, so tool-call
        pieces, every choice of n > 1 and finish reasons are relayed as they come."""
        return self.run(req, result, streaming=True, on_retry=on_retry, on_reasoning=on_reasoning,
                        deltas=deltas)

    # -- the pipeline ----------------------------------------------------------------------
    async def run(self, req: GenerationRequest, result: GenerationResult, *, streaming: bool,
                  on_retry: Callable[[RetryNotice], None] | None = None,
                  blocking: bool = False,
                  on_reasoning: Callable[[str], None] | None = None,
                  deltas: bool = False) -> AsyncIterator[str]:
        req.check_text()   # text that can be neither stored nor sent gets no row either
        s = self.settings.snapshot()
        run = _Run(req, result, self.clock.monotonic())
        run.on_reasoning = on_reasoning
        run.deltas = deltas
        result.model = req.model or s["provider.default_model"]
        try:
            self.history.begin_run()           # refuse rather than answer unrecorded
            params, cache_key = self._prepare(run, s)
            if cache_key is not None and not req.refresh:
                hit = self.cache.get(cache_key)
                if hit is not None:
                    async for piece in self._serve_hit(run, hit, streaming):
                        yield piece
                    await self._durable(self._record(run, "ok"), blocking)
                    return
            run.hold = self._reserve(run, params, s)     # refuses past a limit: nothing sent
            breaker, permit, got = await self._call_upstream(run, params, s, streaming, on_retry, blocking)
            if not streaming:
                self._settle_answer(run, breaker, permit, got)
                yield got.content
            else:
                relay = self._relay(run, breaker, permit, got)
                try:
                    async for piece in relay:
                        yield piece
                finally:
                    # A Stop lands at our yield: close the inner generator now (permit
                    # settled, upstream connection closed), not whenever the collector finds it.
                    await relay.aclose()
            # Only what a hit can give back is stored: one choice of text, no tool calls
            # or logprobs (those answers are keyed, so they are simply never hits).
            if (cache_key is not None and result.finish_reason in ("stop", "length")
                    and result.tool_calls is None and not req.extra.get("logprobs")
                    and req.extra.get("n") in (None, 1)):
                self.cache.put_soon(
                    cache_key, provider=self.provider.name, model=result.model,
                    content=result.content, finish_reason=result.finish_reason,
                    prompt_tokens=result.usage.prompt_tokens if result.usage else None,
                    completion_tokens=result.usage.completion_tokens if result.usage else None,
                    cost=result.cost)
            await self._durable(self._record(run, "ok"), blocking)
        except (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt):
            # Nothing was answered, and a closed generator cannot await: the row is queued
            # and committed with the next batch, without anybody waiting for it.
            result.error = errors.Cancelled()
            self._record(run, "cancelled")
            raise
        except errors.GyroscopeError as exc:
            result.error = exc
            exc.result = result
            await self._durable(self._record(run, exc.outcome, exc), blocking, quiet=True)
            raise
        except Exception as exc:  # a bug must still leave its row, then surface
            wrapped = errors.UpstreamError(
                f"Something unexpected went wrong ({exc.__class__.__name__}). Try again; if it "
                "keeps happening, report it with the time it happened.", detail=repr(exc))
            wrapped.result = result
            result.error = wrapped
            await self._durable(self._record(run, "error", wrapped), blocking, quiet=True)
            raise wrapped from exc

    def _prepare(self, run: _Run, s) -> tuple[dict, str | None]:
        """Validate, optimize and build the provider parameters and the cache key."""
        req, result = run.req, run.result
        run.pricing = self.pricing(s)
        if req.messages is None and (not isinstance(req.prompt, str) or not req.prompt.strip()):
            raise errors.InvalidParameter("The prompt is empty. Type what you want written.")
        if req.messages is not None and (not isinstance(req.messages, list) or not req.messages):
            raise errors.InvalidParameter("messages must be a non-empty list of chat messages.")
        extra = req.extra
        # A conversation may give its limit as max_completion_tokens (reasoning models take
        # no other name): it is the limit, and it is sent under the name it came with.
        limit_name = "max_completion_tokens" if extra.get("max_completion_tokens") is not None else "max_tokens"
        asked = extra["max_completion_tokens"] if limit_name != "max_tokens" else req.max_tokens
        max_tokens = s["generate.max_tokens"] if asked is None else asked
        if (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                or not 0 < max_tokens <= MAX_TOKENS):
            raise errors.InvalidParameter(f"{limit_name} must be a whole number from 1 to {MAX_TOKENS:,} "
                                          f"(got {short_repr(max_tokens)}).")
        temperature = s["generate.temperature"] if req.temperature is None else req.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise errors.InvalidParameter(f"temperature must be between 0 and 2 (got {short_repr(temperature)}).")
        if req.top_p is not None and (isinstance(req.top_p, bool) or not isinstance(req.top_p, (int, float))
                                      or not 0 < req.top_p <= 1):
            raise errors.InvalidParameter(f"top_p must be above 0 and at most 1 (got {short_repr(req.top_p)}).")
        if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int)
                                     or not -2**63 <= req.seed < 2**63):
            raise errors.InvalidParameter(f"seed must be a whole number that fits in 64 bits "
                                          f"(got {short_repr(req.seed)}).")
        if not isinstance(result.model, str) or not result.model.strip():
            raise errors.InvalidParameter("Pick a model.")
        optimize = s["optimizer.enabled"] if req.optimize is None else req.optimize
        messages = run.messages = self._optimized(run, s, optimize and self.optimizer is not None)
        window = self.provider.context_window(result.model)
        # A token is at least one byte, so a prompt whose bytes fit needs no counting.
        if (window is not None and tokens.upper_bound(messages) + max_tokens > window
                and run.prompt_tokens_est + max_tokens > window):
            raise errors.PromptTooLong(
                f"The prompt has {run.prompt_tokens_est:,} tokens and asks for up to {max_tokens:,} "
                f"more, but {result.model} accepts {window:,} in all. Shorten the prompt or lower "
                "max tokens.")
        params = {**extra, "model": result.model, "messages": messages, limit_name: max_tokens,
                  "temperature": temperature}
        for name in ("top_p", "seed", "stop"):
            if getattr(req, name) is not None:
                params[name] = getattr(req, name)
        key = None
        if req.cache and s["cache.enabled"]:
            keyed = {k: v for k, v in extra.items()
                     if k not in NOT_OUTPUT_PARAMS and k != "max_completion_tokens"}
            key = cache_key(provider=self.provider.name, base_url=self.provider.upstream_id,
                            model=result.model, messages=messages, temperature=temperature,
                            top_p=req.top_p, max_tokens=max_tokens, seed=req.seed, stop=req.stop,
                            extra=keyed, normalize=s["cache.normalize_whitespace"])
        return params, key

    def _optimized(self, run: _Run, s, optimize: bool) -> list[dict]:
        """The messages to send. The optimizer rewrites only the last user message's text
        (the turn being asked now; earlier turns are what the model already answered, and
        system or tool text is the caller's contract, not prose to tighten)."""
        req, result = run.req, run.result
        if req.messages is None:
            prompt = req.prompt
            if optimize:
                prompt = self._optimize_text(run, s, prompt)
            result.prompt_sent = prompt
            return chat_messages(prompt, req.system)
        messages = req.messages
        last = next((i for i in range(len(messages) - 1, -1, -1)
                     if isinstance(messages[i], dict) and messages[i].get("role") == "user"), None)
        if last is None:
            return messages
        content = messages[last].get("content")
        if optimize and isinstance(content, str) and content.strip():
            content = self._optimize_text(run, s, content)
            messages = [*messages[:last], {**messages[last], "content": content}, *messages[last + 1:]]
        result.prompt_sent = content if isinstance(content, str) else ""
        return messages

    def _optimize_text(self, run: _Run, s, text: str) -> str:
        report = self.optimizer(text, s, run.result.model)
        run.result.optimizer = report.as_dict()
        run.optimizer_saved = report.tokens_saved
        return report.optimized

    async def _serve_hit(self, run: _Run, hit, streaming: bool) -> AsyncIterator[str]:
        result = run.result
        result.from_cache = True
        result.model = hit.model
        result.finish_reason = hit.finish_reason
        if hit.prompt_tokens is not None:
            result.usage = Usage(hit.prompt_tokens, hit.completion_tokens or 0)
        result.cost = 0.0
        # What the answer would cost now; else what it cost when stored; else unknown,
        # flagged like any unknown price (never a silent 0 saved).
        saved = prices.price_usage(hit.model, result.usage, run.pricing) if result.usage else None
        saved = hit.cost if saved is None else saved
        result.cost_saved = saved or 0.0
        result.cost_unknown = saved is None
        run.first_token_at = self.clock.monotonic()
        if not streaming:
            result.content = hit.content
            yield hit.content
            return
        text = hit.content
        for i in range(0, len(text), CACHE_CHUNK_CHARS):
            piece = text[i:i + CACHE_CHUNK_CHARS]
            result.content += piece
            yield Delta(text=piece) if run.deltas else piece
            await asyncio.sleep(0)  # let the page draw between pieces
        if run.deltas:
            yield Delta(finish_reason=hit.finish_reason)

    def _reserve(self, run: _Run, params: dict, s):
        """Hold the request's most possible cost against every budget it falls in."""
        if self.budgets is None:
            return None
        plan = budgets.plan_of(s)
        if not plan.limits:
            return None
        most = params.get("max_completion_tokens") or params.get("max_tokens") or 0
        most *= params.get("n") or 1
        amount = prices.price(run.result.model, run.pricing, run.prompt_tokens_est, most)
        return self.budgets.reserve(plan, run.result.model, run.req.source, amount)

    def _tuning(self, s) -> "_Tuning":
        """What a settings snapshot means for attempts, worked out once per snapshot."""
        tuned = self._tuned
        if tuned is None or tuned[0] is not s:
            policy = RetryPolicy.from_settings(s)
            tuned = self._tuned = (s, _Tuning(policy, wait_backoff_or_retry_after(policy, self.rng),
                                              s["timeout.connect_s"], s["timeout.read_s"],
                                              PacingConf.from_settings(s)))
        return tuned[1]

    async def _call_upstream(self, run: _Run, params: dict, s, streaming: bool, on_retry,
                             blocking: bool):
        """Attempts and retries under the breaker, up to an answer (or a stream's first
        delta): (breaker, permit, what ``_attempt`` got). The caller settles the permit."""
        tuning = self._tuning(s)
        breaker = self.breakers.get(self.provider.upstream_id, run.result.model)
        deadline_at = run.t0 + tuning.policy.deadline_s
        try:   # the first attempt runs without tenacity's machinery: most requests need no other
            permit, got = await self._attempt(run, breaker, params, tuning, deadline_at, streaming, blocking)
        except errors.RetryableError as first:
            permit, got = await self._retry(run, breaker, params, tuning, deadline_at, streaming,
                                            blocking, on_retry, first)
        return breaker, permit, got

    def _settle_answer(self, run: _Run, breaker, permit, got: Completion) -> None:
        """A plain (not streamed) answer arrived: the upstream is well, fill in the result."""
        breaker.success(permit)
        run.first_token_at = self.clock.monotonic()
        result = run.result
        result.content = got.content
        result.reasoning = got.reasoning
        result.finish_reason = got.finish_reason
        result.tool_calls, result.choices, result.logprobs = got.tool_calls, got.choices, got.logprobs
        result.model = got.model or result.model
        self._settle_usage(run, got.usage)

    async def _relay(self, run: _Run, breaker, permit, got) -> AsyncIterator[str]:
        """Streaming past the first delta: a failure ends the stream; no retries.

        However it ends, the upstream connection is closed before any token is counted (the
        tokenizer's first load takes up to a second, and a paid API bills the tokens it
        keeps sending meanwhile)."""
        upstream_stream, iterator, delta = got
        result, monotonic = run.result, self.clock.monotonic
        try:
            while delta is not None:
                if delta.index:                 # another choice of n > 1: relayed, not kept
                    if run.deltas:
                        yield delta
                    delta = await anext(iterator, None)
                    continue
                if delta.reasoning:             # thinking: kept apart from the answer text
                    result.reasoning += delta.reasoning
                    if run.on_reasoning is not None:
                        run.on_reasoning(delta.reasoning)
                if delta.tool_calls:
                    if run.first_token_at is None:
                        run.first_token_at = monotonic()
                    result.tool_calls = merge_tool_calls(result.tool_calls, delta.tool_calls)
                if delta.text:
                    if run.first_token_at is None:
                        run.first_token_at = monotonic()
                    result.content += delta.text
                    if not run.deltas:
                        yield delta.text
                if delta.finish_reason:
                    result.finish_reason = delta.finish_reason
                if run.deltas and (delta.text or delta.tool_calls or delta.finish_reason or delta.reasoning
                                   or delta.logprobs):
                    yield delta
                if delta.usage is not None:
                    self._settle_usage(run, delta.usage)
                delta = await anext(iterator, None)
            if result.finish_reason is None:    # ended without saying it was complete
                raise errors.StreamInterrupted()
            breaker.success(permit)
        except errors.UpstreamError as exc:
            self._settle_permit(breaker, permit, exc)
            await upstream_stream.aclose()
            self._settle_usage(run, None)
            if isinstance(exc, errors.StreamInterrupted):
                raise
            raise errors.StreamInterrupted(status=exc.status, detail=str(exc)) from exc
        except BaseException:                   # a Stop or a bug: neither success nor failure
            breaker.release(permit)
            await upstream_stream.aclose()
            self._settle_usage(run, None)
            raise
        finally:
            breaker.release(permit)             # no-op once settled
            await upstream_stream.aclose()      # idempotent: a no-op when already closed
        if result.usage is None:    # a complete stream without usage (llama.cpp): ask the server
            await self._count_on_server(run)
            self._settle_usage(run, None)

    async def _count_on_server(self, run: _Run) -> None:
        """Usage from the upstream's own tokenizer, both counts or neither (never mixed with
        an estimate); left unset when it has none, so ``_settle_usage`` estimates."""
        result = run.result
        try:
            counted = await self.provider.count_tokens(result.model, run.messages,
                                                       result.reasoning + result.content)
        except Exception:  # noqa: BLE001 - counting must never cost the answer
            counted = None
        if counted is not None:
            result.usage = Usage(*counted)
            result.tokens_estimated = False
            result.token_source = "tokenizer"

    async def _attempt(self, run: _Run, breaker, params: dict, tuning: "_Tuning", deadline_at: float,
                       streaming: bool, blocking: bool):
        """One attempt under the breaker: (permit, completion) or (permit, (stream, iterator,
        first delta)). The permit is settled here on failure, by the caller on success."""
        pacer, pace_key, ticket = self.pacer if tuning.pacing.enabled else None, None, None
        if pacer is not None:   # wait for the rate limit before asking the breaker (no probe held)
            pace_key = f"{self.provider.upstream_id}|{run.result.model}"
            ticket = await pacer.acquire(
                pace_key, run.req.source, tuning.pacing,
                lambda: run.prompt_tokens_est + (params.get("max_tokens") or params.get("max_completion_tokens") or 0),
                deadline_at - self.clock.monotonic(), blocking)
        permit = breaker.acquire()
        run.result.attempts += 1
        started = self.clock.monotonic()
        left = max(0.01, deadline_at - started)
        timeout = tuning.timeouts(left)
        try:
            if blocking:        # sync callers: the provider's blocking call, bounded by `left`
                got = self.provider.complete_blocking(params, timeout)
                if pacer is not None:
                    pacer.observe(pace_key, got.headers, ticket)
                return permit, got
            async with asyncio.timeout(left):   # the overall deadline, whatever trickles in
                if not streaming:
                    got = await self.provider.complete(params, timeout)
                    if pacer is not None:
                        pacer.observe(pace_key, got.headers, ticket)
                    return permit, got
                upstream_stream = await self.provider.stream(params, timeout)
                if pacer is not None:
                    pacer.observe(pace_key, upstream_stream.headers, ticket)
                    pacer = None    # observed: a failure while reading must not end it twice
                iterator = upstream_stream.__aiter__()
                return permit, (upstream_stream, iterator, await self._first_delta(upstream_stream, iterator))
        except TimeoutError as exc:
            if pacer is not None:
                pacer.observe(pace_key, None, ticket)
            breaker.failure(permit, "timeout")
            raise errors.UpstreamTimeout() from exc
        except errors.UpstreamError as exc:
            if pacer is not None:
                pacer.observe(pace_key, getattr(exc, "rate_headers", None), ticket)
            self._settle_permit(breaker, permit, exc)
            raise
        except BaseException:
            if pacer is not None:
                pacer.observe(pace_key, None, ticket)
            breaker.release(permit)
            raise
        finally:    # time spent waiting on the upstream, apart from our own (/v1's overhead header)
            run.result.upstream_ms += (self.clock.monotonic() - started) * 1000.0

    async def _retry(self, run: _Run, breaker, params: dict, tuning: "_Tuning", deadline_at: float,
                     streaming: bool, blocking: bool, on_retry, first: errors.RetryableError):
        """Tenacity's retry loop, entered after a first attempt failed in a retryable way
        (that failure is its attempt 1)."""
        result, policy, monotonic = run.result, tuning.policy, self.clock.monotonic

        def breaker_opened(state: tenacity.RetryCallState) -> bool:
            # Our own failures just opened it: waiting to be refused would only waste time.
            return breaker.storage.state == OPEN

        def stop(state: tenacity.RetryCallState) -> bool:
            return (state.attempt_number >= policy.max_attempts
                    or monotonic() + state.upcoming_sleep > deadline_at   # never sleep past it
                    or breaker_opened(state))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception()
            result.retry_wait_s += state.upcoming_sleep
            if on_retry is not None:
                on_retry(RetryNotice(kind=exc.kind, attempt=state.attempt_number + 1,
                                     max_attempts=policy.max_attempts, wait_s=state.upcoming_sleep,
                                     status=exc.status))

        def give_up(state: tenacity.RetryCallState):
            exc = state.outcome.exception()
            if (state.attempt_number < policy.max_attempts and exc.retry_in_s is not None
                    and not breaker_opened(state)):
                raise errors.RetryLater(retry_in_s=state.upcoming_sleep, status=exc.status,
                                        detail=str(exc)) from exc
            raise exc

        async def sleep_blocking(seconds: float) -> None:
            self.clock.sleep_blocking(seconds)

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(is_retryable), stop=stop, wait=tuning.wait,
            sleep=sleep_blocking if blocking else self.clock.sleep,
            before_sleep=before_sleep, retry_error_callback=give_up)
        replay: list[BaseException] = [first]
        async for attempt in retrying:
            with attempt:
                if replay:
                    raise replay.pop()
                return await self._attempt(run, breaker, params, tuning, deadline_at, streaming, blocking)
        raise AssertionError("unreachable: tenacity returns or raises")

    @staticmethod
    def _settle_permit(breaker, permit, exc: errors.UpstreamError) -> None:
        """Count the failure against the upstream only when it is the upstream's fault."""
        if exc.breaker_failure:   # Retry-After, when sent, sets how long an opening lasts
            breaker.failure(permit, exc.kind, exc.retry_in_s)
        else:
            breaker.release(permit)

    @staticmethod
    async def _first_delta(upstream_stream, iterator) -> Delta | None:
        """Read up to the first text or thinking (or the end), so retries cover 'nothing came back'."""
        try:
            while True:
                delta = await anext(iterator, None)
                # Thinking is progress too: a reasoning model's first thought ends the
                # "nothing came back" phase, so no deadline cuts it while it thinks.
                if (delta is None or delta.text or delta.reasoning or delta.finish_reason or delta.usage
                        or delta.tool_calls):
                    return delta
        except BaseException:
            await upstream_stream.aclose()
            raise

    def _settle_usage(self, run: _Run, usage: Usage | None) -> None:
        """Usage as the API reported it, or (marked estimated) counted from what we saw."""
        result = run.result
        if usage is not None:
            result.usage = usage
            result.tokens_estimated = False
            result.token_source = "reported"
        elif result.usage is None:
            # Thinking is billed as completion tokens, so it is counted with the answer.
            result.usage = Usage(run.prompt_tokens_est,
                                 tokens.count_text(result.reasoning + result.content, result.model))
            result.tokens_estimated = True
            result.token_source = "estimated"
        result.cost = prices.price_usage(result.model, result.usage, run.pricing)
        result.cost_unknown = result.cost is None

    async def _durable(self, ticket, blocking: bool, quiet: bool = False) -> None:
        """Wait until the run's row is committed or spooled: no answer leaves before that.
        A row that can be neither raises StorageError (``quiet``: an error being reported
        keeps its own message; the loss is counted in ``History.lost_rows``)."""
        if ticket is None or (ticket.done and ticket.error is None):
            return
        try:
            if blocking:        # sync callers have no loop: block on the writer's event
                self.history.wait(ticket)
            else:
                await self.history.committed(ticket)
        except errors.StorageError:
            if not quiet:
                raise

    def _record(self, run: _Run, outcome: str, exc: errors.GyroscopeError | None = None):
        """Hand the run's one history row to the database writer; returns its ticket, which
        the run waits on (``_durable``) before it ends, or None if it was recorded already."""
        if run.recorded:
            return None
        run.recorded = True
        result, req = run.result, run.req
        now = self.clock.monotonic()
        result.outcome = outcome
        result.latency_ms = (now - run.t0) * 1000.0
        if run.first_token_at is not None:
            result.ttft_ms = (run.first_token_at - run.t0) * 1000.0
        optimizer_cost_saved = 0.0
        try:   # counting and costing must never cost the request its row
            if outcome == "cancelled" and result.usage is None and result.attempts:
                self._settle_usage(run, None)
            if run.optimizer_saved:
                optimizer_cost_saved = prices.price(result.model, run.pricing,
                                                    run.optimizer_saved, 0) or 0.0
        except Exception:  # noqa: BLE001
            pass
        usage = result.usage
        if run.hold is not None:    # settle to the real cost (the hold itself when unknown)
            self.budgets.settle(run.hold, result.cost if result.cost is not None
                                else run.hold.amount if usage is not None else 0.0)
        record = RequestRecord(
            ts=self.clock.time(), request_id=result.request_id, source=req.source, job_id=req.job_id,
            provider=self.provider.name, base_url=self.provider.base_url,
            upstream=self.provider.upstream_id, model=result.model, outcome=outcome,
            error_kind=exc.kind if exc is not None else None,
            http_status=exc.status if exc is not None else None,
            error_message=exc.user_message if exc is not None else None,
            attempts=result.attempts, retry_wait_s=result.retry_wait_s,
            latency_ms=result.latency_ms, ttft_ms=result.ttft_ms,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            tokens_estimated=result.tokens_estimated,
            cost=result.cost, cost_unknown=usage is not None and result.cost_unknown,
            from_cache=result.from_cache, cost_saved=result.cost_saved,
            optimizer_tokens_saved=run.optimizer_saved, optimizer_cost_saved=optimizer_cost_saved,
            cached_tokens=usage.cached_tokens if usage else None,
            cache_write_tokens=usage.cache_write_tokens if usage else None,
            reasoning_tokens=usage.reasoning_tokens if usage else None,
            token_source=result.token_source if usage else None, finish_reason=result.finish_reason)
        for observe in self.observers:
            try:
                observe(record, result, run.messages)
            except Exception:  # noqa: BLE001 - telemetry must never cost the request its row
                _log.exception("a history observer failed")
        ticket = self.history.add(record)
        if outcome == "ok":
            hook = answered.get()
            if hook is not None:
                hook()
        return ticket


def merge_tool_calls(calls: list[dict] | None, pieces: list[dict]) -> list[dict]:
    """Tool calls put together from streamed pieces: by index, the first piece brings id,
    type and name, later ones more of the arguments."""
    calls = list(calls or [])
    for piece in pieces:
        index = piece.get("index", 0)
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call, function = calls[index], piece.get("function") or {}
        call["id"] = piece.get("id") or call["id"]
        call["type"] = piece.get("type") or call["type"]
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return calls
