"""Gyroscope: the wired-up service (storage, settings, cache, breakers, provider, pipeline)
with an async API and a sync facade over the same pipeline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import os
import queue
import threading
from typing import Any, AsyncIterator, Callable, Iterator

from . import portal, prices, providers, tokens
from .breaker import Breakers
from . import telemetry
from .budgets import Budgets, plan_of as budgets_plan
from .cache import ResponseCache
from .config import Config, load_config
from .db import Database
from .errors import GyroscopeError
from .history import Filters, History
from .journal import default_path as default_spill
from .models import GenerationRequest, GenerationResult, RetryNotice, Thinking, chat_messages
from .pipeline import Clock, Pipeline
from .resilience.pacing import Pacer, SQLitePacingStore
from .settings import SettingsStore


def open_postgres(config: Config):
    """The PostgreSQL database of GYROSCOPE_DATABASE_URL, or None when it is not set."""
    if not config.database_url:
        return None
    from .storage.postgres import PgDatabase   # psycopg is imported only when configured
    return PgDatabase(config.database_url)


def _optimizer(prompt: str, s, model: str):
    from .optimizer import RULES, optimize
    rules = [r for r in RULES if s.get(f"optimizer.rule.{r}", True)]
    return optimize(prompt, rules=rules, model=model)


class AsyncGenerationStream:
    """Async iterator of text; ``result`` fills in as it goes; ``aclose()`` is a Stop."""

    def __init__(self, agen: AsyncIterator[str], result: GenerationResult) -> None:
        self._agen = agen
        self.result = result

    def __aiter__(self) -> AsyncIterator[str]:
        return self._agen

    async def aclose(self) -> None:
        await self._agen.aclose()


class GenerationStream:
    """Sync iterator over the same pipeline, driven on the portal loop.

    With ``events=True`` it also yields ``RetryNotice`` objects as retries happen,
    ``Thinking`` pieces as a reasoning model thinks, and ``None`` about every
    ``HEARTBEAT_S`` while nothing arrives, so a page gets a chance to
    notice a Stop during a long wait. ``close()`` is a Stop: it closes the upstream
    connection and records the request as cancelled.
    """

    HEARTBEAT_S = 0.25

    def __init__(self, pipeline: Pipeline, req: GenerationRequest, events: bool = False) -> None:
        self.result = GenerationResult()
        self._notices: queue.SimpleQueue = queue.SimpleQueue()
        self._events = events
        self._agen = pipeline.stream(
            req, self.result, on_retry=self._notices.put,
            on_reasoning=(lambda text: self._notices.put(Thinking(text))) if events else None)
        self._done = False
        self._pending: concurrent.futures.Future | None = None
        self._task: asyncio.Task | None = None

    def __iter__(self) -> Iterator[str | RetryNotice | Thinking | None]:
        return self

    def __next__(self) -> str | RetryNotice | Thinking | None:
        if self._done:
            raise StopIteration
        if self._pending is None:
            self._pending = portal.submit(self._next())
        while True:
            try:
                piece = self._pending.result(timeout=self.HEARTBEAT_S if self._events else None)
                break
            except concurrent.futures.TimeoutError:
                return self._notices.get() if not self._notices.empty() else None
            except BaseException:
                self._pending = None
                self._done = True
                raise
        self._pending = None
        if self._events and not self._notices.empty():
            # A notice that arrived with this piece is shown first; the piece comes next.
            notice = self._notices.get()
            self._pending = _resolved(piece)
            return notice
        if piece is None:
            self._done = True
            raise StopIteration
        return piece

    async def _next(self) -> str | None:
        self._task = asyncio.current_task()
        return await anext(self._agen, None)

    async def _stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()               # a read in flight: cancel it and let it record
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancellation is the point
                pass
        await self._agen.aclose()       # no-op when the generator already finished

    def close(self) -> None:
        """Stop: close the upstream connection and record the request as cancelled."""
        if self._done and (self._pending is None or self._pending.done()):
            return
        self._done = True
        try:
            portal.run(self._stop(), timeout=30)
        except concurrent.futures.TimeoutError:
            pass  # the loop is wedged; the row is written when the generator is finalised

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _resolved(value: Any) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(value)
    return fut


class Gyroscope:
    """Everything a page, the API or the CLI needs, over one SQLite file and one provider."""

    def __init__(self, config: Config | None = None, *, provider=None, db: Database | None = None,
                 clock: Clock | None = None, rng=None) -> None:
        self.config = config or load_config()
        self.clock = clock or Clock()
        self.db = db or Database(self.config.db_path)
        # History, events, settings and budgets in PostgreSQL when configured (shared by
        # replicas); cache, breakers and pacing stay in the file (or Redis).
        self.pg = open_postgres(self.config)
        if self.pg is not None:
            from .storage.pg_history import PgHistory
            from .storage.pg_settings import PgSettingsStore
            self.settings = PgSettingsStore(self.pg)
            self.history = PgHistory(self.pg, self.config.spill_path or default_spill(self.db.path))
        else:
            self.settings = SettingsStore(self.db)
            self.history = History(self.db, self.config.spill_path)
        self.cache = ResponseCache(self.db, self.settings, clock=self.clock.time)
        pacing_store = SQLitePacingStore(self.db)
        # GYROSCOPE_REDIS_URL: breaker, cache and pacing shared by every replica (each with
        # the SQLite part above as its fallback), settings changes announced.
        self.redis = None
        breaker_storage = None
        if self.config.redis_url:
            from .storage.redis_backend import RedisBackend
            self.redis = RedisBackend(self.config.redis_url, self.db, self.settings,
                                      clock=self.clock.monotonic, prefix=self.config.redis_prefix)
            self.cache = self.redis.cache(self.cache, self.settings, self.clock.time)
            pacing_store = self.redis.pacing_store(pacing_store)
            breaker_storage = self.redis.breaker_storage
        self.breakers = Breakers(self.db, self.settings, self.history, clock=self.clock.time,
                                 storage_factory=breaker_storage)
        if self.redis is not None:
            self.breakers.shared_names = self.redis.breaker_names
        self.provider = provider or providers.create(self.config.provider, self.config)
        self._models: tuple[float, list[str]] | None = None
        self.pacer = Pacer(pacing_store, clock=self.clock)
        self.pipeline = Pipeline(self.provider, settings=self.settings, cache=self.cache,
                                 breakers=self.breakers, history=self.history, clock=self.clock,
                                 optimizer=_optimizer, rng=rng, pacer=self.pacer)
        if self.pg is not None:     # one ledger for every replica
            from .storage.pg_budgets import PgBudgets, journal_path
            self.budgets = PgBudgets(self.pg, self.history, clock=self.clock.time,
                                     journal=journal_path(self.history.journal.path))
        else:
            self.budgets = Budgets(self.db, self.history, clock=self.clock.time)
        self.pipeline.budgets = self.budgets
        # Telemetry is fed where history rows are handed over (Pipeline.observers).
        self.prometheus = telemetry.Prometheus(self._scrape)
        self.otel = telemetry.OTel.from_env(telemetry.provider_name(self.provider))
        self.pipeline.observers = (self.prometheus.observe, *((self.otel.observe,) if self.otel else ()))
        # The first settings read waits for the file; later ones (on the event loop) never do.
        self.settings.snapshot()
        _freeze_startup_heap()

    @functools.cached_property
    def batch(self):
        """Batch jobs (core.batch.BatchJobs) over this service's pipeline and database."""
        from .batch import BatchJobs
        return BatchJobs(self)

    @property
    def is_simulated(self) -> bool:
        return self.provider.name == "simulator"

    # -- async --------------------------------------------------------------------------
    async def agenerate(self, req: GenerationRequest,
                        on_retry: Callable[[RetryNotice], None] | None = None) -> GenerationResult:
        """Generate; raises GyroscopeError (with ``.result``) on failure."""
        return await self.pipeline.generate(req, on_retry)

    def astream(self, req: GenerationRequest,
                on_retry: Callable[[RetryNotice], None] | None = None,
                on_reasoning: Callable[[str], None] | None = None,
                deltas: bool = False) -> AsyncGenerationStream:
        """Stream text pieces from async code (a reasoning model's thinking to ``on_reasoning``;
        ``deltas=True``: the provider's Delta objects, for /v1)."""
        result = GenerationResult()
        return AsyncGenerationStream(self.pipeline.stream(req, result, on_retry, on_reasoning, deltas),
                                     result)

    # -- sync (the same pipeline, driven from sync code) ------------------------------------
    def generate(self, req: GenerationRequest,
                 on_retry: Callable[[RetryNotice], None] | None = None) -> GenerationResult:
        """Generate from sync code: the same pipeline on the provider's blocking client with
        no event loop, or (for a provider without one) on this thread's own loop."""
        if self.provider.blocking:
            return portal.run_blocking(self.pipeline.generate(req, on_retry, blocking=True))
        return portal.run_here(self.pipeline.generate(req, on_retry))

    def stream(self, req: GenerationRequest, events: bool = False) -> GenerationStream:
        """Stream from sync code (a Streamlit page, the CLI)."""
        return GenerationStream(self.pipeline, req, events=events)

    def models(self) -> list[str]:
        """The models to offer, the default first when the provider offers it; never raises."""
        return self.model_menu()[0]

    def model_menu(self) -> tuple[list[str], str | None]:
        """(models to offer, a note or None): the provider's list (asked at most once a
        minute) plus the configured extras. The configured default comes first only if it
        is offered; otherwise the provider's first model does, and the note says why."""
        extra = [m.strip() for m in self.settings.get("provider.extra_models").split(",") if m.strip()]
        cached = self._models
        if cached is not None and self.clock.monotonic() - cached[0] < 60:
            listed = cached[1]
        else:
            try:
                listed = portal.run(self.provider.models(), timeout=15)
            except (GyroscopeError, concurrent.futures.TimeoutError, OSError):
                listed = []
            self._models = (self.clock.monotonic(), listed)
        default = self.settings.get("provider.default_model")
        offered = list(dict.fromkeys([*listed, *extra]))
        if not listed:      # the provider lists nothing (or could not be asked)
            return list(dict.fromkeys([default, *extra])), None
        if default in offered:
            return list(dict.fromkeys([default, *offered])), None
        return offered, (f"The configured default model, {default}, is not offered by this "
                         f"AI service; {offered[0]} (its first model) is used instead.")

    def estimate(self, prompt: str | None, system: str | None, model: str, max_tokens: int,
                 messages: list[dict] | None = None) -> dict:
        """Prompt tokens, the model's limit and the most the request can cost, before sending
        (of a whole conversation when ``messages`` is given)."""
        prompt_tokens = tokens.count_messages(messages if messages is not None else chat_messages(prompt, system),
                                              model)
        window = self.provider.context_window(model)
        return {"prompt_tokens": prompt_tokens, "context_window": window,
                "too_long": window is not None and prompt_tokens + max_tokens > window,
                # priced as this upstream is (prices.upstreams); None when unknown
                "max_cost": prices.price(model, self.pipeline.pricing(self.settings.snapshot()),
                                         prompt_tokens, max_tokens)}

    def optimize_preview(self, prompt: str, model: str):
        """The optimizer's report for a prompt with the current rules."""
        return _optimizer(prompt, self.settings.snapshot(), model)

    # -- numbers ---------------------------------------------------------------------------
    def _scrape(self) -> dict:
        """What Prometheus reads when it scrapes: breakers, budgets left, pacing waits."""
        plan = budgets_plan(self.settings.snapshot())
        pacer = getattr(self, "pacer", None)
        return {"breakers": self.breakers.all_info(),
                "budgets": self.budgets.status(plan) if plan.limits else [],
                "pacing_waits": getattr(pacer, "waits", 0), "pacing_wait_s": getattr(pacer, "waited_s", 0.0)}

    def stats(self, filters: Filters = Filters()) -> dict:
        """Totals for a range plus each breaker's state (what `stats --json` prints)."""
        totals = self.history.totals(filters)
        totals["breakers"] = {b["name"]: b["state"] for b in self.breakers.all_info()}
        totals["cache"] = self.cache.stats()
        return totals

    async def astats(self, filters: Filters = Filters(), timeout: float | None = None) -> dict:
        """``stats`` from async code: run off the event loop (it reads the file and waits
        for queued writes); TimeoutError after ``timeout`` s."""
        return await portal.off_loop(self.stats, filters, timeout=timeout)

    def backends(self) -> dict:
        """Shared backends and how they answer now (for health and the Settings page)."""
        return {"redis": self.redis.status()} if self.redis is not None else {}

    def close(self) -> None:
        """Commit pending writes and release connections."""
        if "batch" in self.__dict__:    # jobs running here stop, resumable
            self.batch.stop_all()
        if self.redis is not None:
            self.redis.close()
        try:
            portal.run(self.provider.aclose(), timeout=5)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        if self.otel is not None:
            self.otel.shutdown()
        self.budgets.close()        # settlements queued: written (or kept) first
        self.db.close()
        if self.pg is not None:
            self.pg.close()
        self.history.journal.close()


_frozen = False


def _freeze_startup_heap() -> None:
    """Take what start-up left on the heap out of the garbage collector's reach, once.

    Importing core brings ~50,000 objects that live as long as the process (numpy and
    pandas through sqlite-utils, genai-prices' price table, the SDK's types), and every
    full collection scanned them all: ~80 ms each on this machine, several per burst of
    1000 concurrent requests, which cost a fresh process a tenth of its throughput (see
    docs/benchmarks.md, bench/fresh.py). Frozen objects are still freed by reference
    counting; the collection before the freeze keeps garbage cycles out of it.
    GYROSCOPE_GC_FREEZE=0 leaves the collector alone (a host process that manages it).
    """
    global _frozen
    if not _frozen and os.environ.get("GYROSCOPE_GC_FREEZE", "1") != "0":
        _frozen = True
        gc.collect()
        gc.freeze()


_default_lock = threading.Lock()
_default: Gyroscope | None = None


def default_service() -> Gyroscope:
    """The process-wide Gyroscope from the environment, shared by pages and the API."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Gyroscope()
        return _default


def current_service() -> Gyroscope | None:
    """The process-wide Gyroscope if it is built already (never builds it: no waiting)."""
    return _default
