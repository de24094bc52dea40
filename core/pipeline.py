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
implementation. Every run hands exactly one history row to the database writer.
"""

from __future__ import annotations

import asyncio
import time as _time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import tenacity

from . import errors, prices, tokens
from .history import RequestRecord
from .cache import cache_key
from .models import GenerationRequest, GenerationResult, RetryNotice, chat_messages
from .providers.base import Completion, Delta, Timeouts, Usage
from .breaker import OPEN
from .retry import RetryPolicy, is_retryable, wait_backoff_or_retry_after

CACHE_CHUNK_CHARS = 24


@dataclass
class Clock:
    """Wall time, monotonic time and sleep, injected so tests never really wait."""

    time: Callable[[], float] = _time.time
    monotonic: Callable[[], float] = _time.perf_counter
    sleep: Callable[[float], "asyncio.Future"] = asyncio.sleep
    sleep_blocking: Callable[[float], None] = _time.sleep     # retry waits of sync callers


class _Tuning:
    """The retry policy, its wait strategy and the timeouts of one settings snapshot."""

    __slots__ = ("policy", "wait", "connect_s", "read_s", "_full")

    def __init__(self, policy: RetryPolicy, wait, connect_s: float, read_s: float) -> None:
        self.policy, self.wait, self.connect_s, self.read_s = policy, wait, connect_s, read_s
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
        self._prompt_tokens: int | None = None

    @property
    def prompt_tokens_est(self) -> int:
        """Prompt tokens counted with the tokenizer (only when needed: it costs ~0.1 ms)."""
        if self._prompt_tokens is None:
            self._prompt_tokens = tokens.count_messages(self.messages, self.result.model)
        return self._prompt_tokens


class Pipeline:
    """Runs requests against one provider with the cache, the breaker, retries and history."""

    def __init__(self, provider, *, settings, cache, breakers, history, clock: Clock | None = None,
                 optimizer: Callable | None = None, rng=None) -> None:
        self.provider = provider
        self.settings = settings
        self.cache = cache
        self.breakers = breakers
        self.history = history
        self.clock = clock or Clock()
        self.optimizer = optimizer
        self.rng = rng
        self.price_provider = "openai"
        self._tuned: tuple[object, _Tuning] | None = None

    # -- public --------------------------------------------------------------------------
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
               on_retry: Callable[[RetryNotice], None] | None = None) -> AsyncIterator[str]:
        """Text pieces as they arrive; ``result`` is filled in as it goes."""
        return self.run(req, result, streaming=True, on_retry=on_retry)

    # -- the pipeline ----------------------------------------------------------------------
    async def run(self, req: GenerationRequest, result: GenerationResult, *, streaming: bool,
                  on_retry: Callable[[RetryNotice], None] | None = None,
                  blocking: bool = False) -> AsyncIterator[str]:
        s = self.settings.snapshot()
        run = _Run(req, result, self.clock.monotonic())
        result.model = req.model or s["provider.default_model"]
        try:
            params, cache_key = self._prepare(run, s)
            if cache_key is not None and not req.refresh:
                hit = self.cache.get(cache_key)
                if hit is not None:
                    async for piece in self._serve_hit(run, hit, streaming):
                        yield piece
                    self._record(run, "ok")
                    return
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
            if cache_key is not None and result.finish_reason in ("stop", "length"):
                self.cache.put_soon(
                    cache_key, provider=self.provider.name, model=result.model,
                    content=result.content, finish_reason=result.finish_reason,
                    prompt_tokens=result.usage.prompt_tokens if result.usage else None,
                    completion_tokens=result.usage.completion_tokens if result.usage else None,
                    cost=result.cost)
            self._record(run, "ok")
        except (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt):
            result.error = errors.Cancelled()
            self._record(run, "cancelled")
            raise
        except errors.GyroscopeError as exc:
            result.error = exc
            exc.result = result
            self._record(run, exc.outcome, exc)
            raise
        except Exception as exc:  # a bug must still leave its row, then surface
            wrapped = errors.UpstreamError(
                f"Something unexpected went wrong ({exc.__class__.__name__}). Try again; if it "
                "keeps happening, report it with the time it happened.", detail=repr(exc))
            wrapped.result = result
            result.error = wrapped
            self._record(run, "error", wrapped)
            raise wrapped from exc

    def _prepare(self, run: _Run, s) -> tuple[dict, str | None]:
        """Validate, optimize and build the provider parameters and the cache key."""
        req, result = run.req, run.result
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise errors.InvalidParameter("The prompt is empty. Type what you want written.")
        max_tokens = s["generate.max_tokens"] if req.max_tokens is None else req.max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise errors.InvalidParameter(f"max_tokens must be a whole number above 0 (got {max_tokens!r}).")
        temperature = s["generate.temperature"] if req.temperature is None else req.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise errors.InvalidParameter(f"temperature must be between 0 and 2 (got {temperature!r}).")
        if req.top_p is not None and (not isinstance(req.top_p, (int, float)) or not 0 < req.top_p <= 1):
            raise errors.InvalidParameter(f"top_p must be above 0 and at most 1 (got {req.top_p!r}).")
        if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int)):
            raise errors.InvalidParameter(f"seed must be a whole number (got {req.seed!r}).")
        if not isinstance(result.model, str) or not result.model.strip():
            raise errors.InvalidParameter("Pick a model.")
        prompt = req.prompt
        optimize = s["optimizer.enabled"] if req.optimize is None else req.optimize
        if optimize and self.optimizer is not None:
            report = self.optimizer(prompt, s, result.model)
            result.optimizer = report.as_dict()
            run.optimizer_saved = report.tokens_saved
            prompt = report.optimized
        result.prompt_sent = prompt
        messages = run.messages = chat_messages(prompt, req.system)
        window = self.provider.context_window(result.model)
        # A token is at least one byte, so a prompt whose bytes fit needs no counting.
        if (window is not None and tokens.upper_bound(messages) + max_tokens > window
                and run.prompt_tokens_est + max_tokens > window):
            raise errors.PromptTooLong(
                f"The prompt has {run.prompt_tokens_est:,} tokens and asks for up to {max_tokens:,} "
                f"more, but {result.model} accepts {window:,} in all. Shorten the prompt or lower "
                "max tokens.")
        params = {"model": result.model, "messages": messages, "max_tokens": max_tokens,
                  "temperature": temperature}
        for name in ("top_p", "seed", "stop"):
            if getattr(req, name) is not None:
                params[name] = getattr(req, name)
        key = None
        if req.cache and s["cache.enabled"]:
            key = cache_key(provider=self.provider.name, base_url=self.provider.upstream_id,
                            model=result.model, messages=messages, temperature=temperature,
                            top_p=req.top_p, max_tokens=max_tokens, seed=req.seed, stop=req.stop,
                            normalize=s["cache.normalize_whitespace"])
        return params, key

    async def _serve_hit(self, run: _Run, hit, streaming: bool) -> AsyncIterator[str]:
        result = run.result
        result.from_cache = True
        result.model = hit.model
        result.finish_reason = hit.finish_reason
        if hit.prompt_tokens is not None:
            result.usage = Usage(hit.prompt_tokens, hit.completion_tokens or 0)
        result.cost = 0.0
        result.cost_saved = hit.cost or 0.0
        run.first_token_at = self.clock.monotonic()
        if not streaming:
            result.content = hit.content
            yield hit.content
            return
        text = hit.content
        for i in range(0, len(text), CACHE_CHUNK_CHARS):
            piece = text[i:i + CACHE_CHUNK_CHARS]
            result.content += piece
            yield piece
            await asyncio.sleep(0)  # let the page draw between pieces

    def _tuning(self, s) -> "_Tuning":
        """What a settings snapshot means for attempts, worked out once per snapshot."""
        tuned = self._tuned
        if tuned is None or tuned[0] is not s:
            policy = RetryPolicy.from_settings(s)
            tuned = self._tuned = (s, _Tuning(policy, wait_backoff_or_retry_after(policy, self.rng),
                                              s["timeout.connect_s"], s["timeout.read_s"]))
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
        result.finish_reason = got.finish_reason
        result.model = got.model or result.model
        self._settle_usage(run, got.usage)

    async def _relay(self, run: _Run, breaker, permit, got) -> AsyncIterator[str]:
        """Streaming past the first delta: a failure ends the stream; no retries."""
        upstream_stream, iterator, delta = got
        result, monotonic = run.result, self.clock.monotonic
        try:
            while delta is not None:
                if delta.text:
                    if run.first_token_at is None:
                        run.first_token_at = monotonic()
                    result.content += delta.text
                    yield delta.text
                if delta.finish_reason:
                    result.finish_reason = delta.finish_reason
                if delta.usage is not None:
                    self._settle_usage(run, delta.usage)
                delta = await anext(iterator, None)
            if result.finish_reason is None:    # ended without saying it was complete
                raise errors.StreamInterrupted()
            breaker.success(permit)
        except errors.UpstreamError as exc:
            self._settle_permit(breaker, permit, exc)
            self._settle_usage(run, None)
            if isinstance(exc, errors.StreamInterrupted):
                raise
            raise errors.StreamInterrupted(status=exc.status, detail=str(exc)) from exc
        except BaseException:
            self._settle_usage(run, None)
            raise
        finally:
            breaker.release(permit)             # a Stop or a bug: neither success nor failure
            await upstream_stream.aclose()
        if result.usage is None:
            self._settle_usage(run, None)

    async def _attempt(self, run: _Run, breaker, params: dict, tuning: "_Tuning", deadline_at: float,
                       streaming: bool, blocking: bool):
        """One attempt under the breaker: (permit, completion) or (permit, (stream, iterator,
        first delta)). The permit is settled here on failure, by the caller on success."""
        permit = breaker.acquire()
        run.result.attempts += 1
        left = max(0.01, deadline_at - self.clock.monotonic())
        timeout = tuning.timeouts(left)
        try:
            if blocking:        # sync callers: the provider's blocking call, bounded by `left`
                return permit, self.provider.complete_blocking(params, timeout)
            async with asyncio.timeout(left):   # the overall deadline, whatever trickles in
                if not streaming:
                    return permit, await self.provider.complete(params, timeout)
                upstream_stream = await self.provider.stream(params, timeout)
                iterator = upstream_stream.__aiter__()
                return permit, (upstream_stream, iterator, await self._first_delta(upstream_stream, iterator))
        except TimeoutError as exc:
            breaker.failure(permit, "timeout")
            raise errors.UpstreamTimeout() from exc
        except errors.UpstreamError as exc:
            self._settle_permit(breaker, permit, exc)
            raise
        except BaseException:
            breaker.release(permit)
            raise

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
        """Read up to the first text (or the end), so retries cover 'nothing came back'."""
        try:
            while True:
                delta = await anext(iterator, None)
                if delta is None or delta.text or delta.finish_reason or delta.usage:
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
        elif result.usage is None:
            result.usage = Usage(run.prompt_tokens_est, tokens.count_text(result.content, result.model))
            result.tokens_estimated = True
        result.cost = prices.cost(result.model, result.usage.prompt_tokens,
                                  result.usage.completion_tokens, self.price_provider)

    def _record(self, run: _Run, outcome: str, exc: errors.GyroscopeError | None = None) -> None:
        """Hand the run's one history row to the database writer (the answer does not wait
        for its commit; ``Gyroscope.close()`` and process exit commit what is queued)."""
        if run.recorded:
            return
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
                optimizer_cost_saved = prices.cost(result.model, run.optimizer_saved, 0,
                                                   self.price_provider) or 0.0
        except Exception:  # noqa: BLE001
            pass
        usage = result.usage
        record = RequestRecord(
            ts=self.clock.time(), request_id=result.request_id, source=req.source,
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
            cost=result.cost, cost_unknown=usage is not None and result.cost is None and not result.from_cache,
            from_cache=result.from_cache, cost_saved=result.cost_saved,
            optimizer_tokens_saved=run.optimizer_saved, optimizer_cost_saved=optimizer_cost_saved)
        self.history.add(record)
