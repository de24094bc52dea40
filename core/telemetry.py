"""Observability in the ecosystem's standards, fed from the one point every request passes:
the hand-over of its history row (``Pipeline.observers``), never from inside the pipeline.

Prometheus (prometheus-client, always on; served at ``GET /api/metrics``, docs/metrics.md):
counters and histograms updated per row, plus gauges read when scraped (breaker states,
budget left, pacing waits). One registry per service, so two services never mix.

OpenTelemetry (the ``[otel]`` extra): a span per request with the GenAI semantic
conventions (``gen_ai.*``; cost in the draft ``gen_ai.usage.cost.*``) and the GenAI client
metrics, exported over OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; otherwise
nothing is imported or created. Message content is added only when the operator opts in
with ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

_log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATE_VALUE = {"closed": 0, "half-open": 1, "open": 2}
TOKEN_TYPES = ("prompt", "completion", "cached", "cache_write", "reasoning")


class Prometheus:
    """The service's Prometheus metrics: ``observe`` is a Pipeline observer."""

    def __init__(self, scrape: Callable[[], Mapping] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gyroscope_requests", "Requests by outcome (one per history row).",
                                ["outcome", "source", "model"], registry=r)
        self.tokens = Counter("gyroscope_tokens", "Tokens by type (cached is part of prompt, "
                              "reasoning part of completion).", ["type", "model"], registry=r)
        self.cost = Counter("gyroscope_cost_usd", "Cost in USD of answered requests (known prices).",
                            ["model", "source"], registry=r)
        self.unknown = Counter("gyroscope_cost_unknown", "Requests whose price is unknown.",
                               ["model"], registry=r)
        self.cache_hits = Counter("gyroscope_cache_hits", "Answers served from the response cache.",
                                  ["model"], registry=r)
        self.estimated = Counter("gyroscope_tokens_estimated_requests", "Requests whose token "
                                 "counts were not reported by the upstream.", ["token_source"], registry=r)
        self.latency = Histogram("gyroscope_request_latency_seconds", "Request latency, answers from "
                                 "the upstream.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gyroscope_time_to_first_token_seconds", "Time to the first token, "
                              "answers from the upstream.", ["model"], buckets=TTFT_BUCKETS, registry=r)
        if scrape is not None:
            r.register(_Scraped(scrape))

    def observe(self, record, result=None, messages=None) -> None:
        """Count one history row."""
        model = record.model or ""
        self.requests.labels(record.outcome, record.source or "", model).inc()
        if record.from_cache:
            self.cache_hits.labels(model).inc()
        elif record.outcome == "ok" and record.latency_ms is not None:
            self.latency.labels(model).observe(record.latency_ms / 1000.0)
            if record.ttft_ms is not None:
                self.ttft.labels(model).observe(record.ttft_ms / 1000.0)
        if record.prompt_tokens is not None:
            for kind, value in zip(TOKEN_TYPES, (record.prompt_tokens, record.completion_tokens,
                                                 record.cached_tokens, record.cache_write_tokens,
                                                 record.reasoning_tokens)):
                if value:
                    self.tokens.labels(kind, model).inc(value)
        if record.cost:
            self.cost.labels(model, record.source or "").inc(record.cost)
        if record.cost_unknown:
            self.unknown.labels(model).inc()
        if record.token_source and record.token_source != "reported":
            self.estimated.labels(record.token_source).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class _Scraped:
    """Gauges read when scraped: ``scrape()`` gives breakers, budgets and pacing numbers."""

    def __init__(self, scrape: Callable[[], Mapping]) -> None:
        self.scrape = scrape

    def describe(self):
        return []

    def collect(self):
        try:
            now = self.scrape()
        except Exception:  # noqa: BLE001 - a scrape must answer, even with fewer metrics
            _log.exception("reading the scraped metrics failed")
            return
        state = GaugeMetricFamily("gyroscope_breaker_state", "Circuit breaker state: 0 closed, "
                                  "1 half-open, 2 open.", labels=["breaker"])
        for info in now.get("breakers", ()):
            if info.get("state") in STATE_VALUE:
                state.add_metric([info["name"]], STATE_VALUE[info["state"]])
        yield state
        left = GaugeMetricFamily("gyroscope_budget_left_usd", "USD left under each budget limit "
                                 "(limit - spent - held).", labels=["scope", "period"])
        limit = GaugeMetricFamily("gyroscope_budget_limit_usd", "Each budget limit in USD.",
                                  labels=["scope", "period"])
        for b in now.get("budgets", ()):
            left.add_metric([b["scope"], b["period"]], b["left_usd"])
            limit.add_metric([b["scope"], b["period"]], b["limit_usd"])
        yield left
        yield limit
        waits = CounterMetricFamily("gyroscope_pacing_waits", "Requests held back by pacing.")
        waits.add_metric([], now.get("pacing_waits", 0))
        yield waits
        waited = CounterMetricFamily("gyroscope_pacing_wait_seconds", "Time requests were held "
                                     "back by pacing.")
        waited.add_metric([], now.get("pacing_wait_s", 0.0))
        yield waited


# -- OpenTelemetry ------------------------------------------------------------------------------
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


class OTel:
    """GenAI spans and metrics from history rows. Build with ``from_env`` (None when
    OTEL_EXPORTER_OTLP_ENDPOINT is unset) or, in tests, with your own providers."""

    def __init__(self, tracer_provider, meter_provider=None, provider_name: str = "openai",
                 capture_content: bool = False) -> None:
        # Building a span and its metric points costs ~0.05 ms of CPU: a thread of its own
        # does it, so the request only queues its row (what the BatchSpanProcessor already
        # does for the export). ``flush`` waits for what is queued.
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.tracer = tracer_provider.get_tracer("gyroscope")
        self.provider_name = provider_name
        self.capture_content = capture_content
        self._providers = (tracer_provider, meter_provider)
        self.token_usage = self.duration = None
        if meter_provider is not None:
            meter = meter_provider.get_meter("gyroscope")
            self.token_usage = meter.create_histogram(
                "gen_ai.client.token.usage", unit="{token}", description="Tokens used per request.")
            self.duration = meter.create_histogram(
                "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.")

    @classmethod
    def from_env(cls, provider_name: str, env: Mapping[str, str] | None = None) -> "OTel | None":
        """OTLP exporters from the standard OTEL_* variables, or None when no endpoint is set
        (or the [otel] extra is not installed: said once in the log)."""
        env = os.environ if env is None else env
        if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            _log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed; "
                         "pip install -e '.[otel]' to send spans and metrics.")
            return None
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "gyroscope")})
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        meter_provider = MeterProvider(resource=resource, metric_readers=[
            PeriodicExportingMetricReader(OTLPMetricExporter())])
        capture = env.get(CAPTURE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        return cls(tracer_provider, meter_provider, provider_name, capture)

    def observe(self, record, result=None, messages=None) -> None:
        """Queue one history row for its span and metric points (built on the telemetry thread)."""
        model = result.model if result is not None else None
        content = result.content if result is not None else None
        self._queue.put((record, model, content, messages if self.capture_content else None))
        if self._thread is None:
            with self._thread_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._drain, name="gyroscope-otel",
                                                    daemon=True)
                    self._thread.start()

    def flush(self) -> None:
        """Wait until every queued row has its span and metric points."""
        if self._thread is not None:
            self._queue.join()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self.emit(*item)
            except Exception:  # noqa: BLE001 - telemetry must never stop the service
                _log.exception("OpenTelemetry: a span could not be built")
            finally:
                self._queue.task_done()

    def emit(self, record, model: str | None = None, content: str | None = None,
             messages=None) -> None:
        """One CLIENT span (and metric points) for one history row, timed as the request ran."""
        from opentelemetry.trace import SpanKind, Status, StatusCode
        end_ns = int(record.ts * 1e9)
        start_ns = end_ns - int((record.latency_ms or 0.0) * 1e6)
        attrs = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": self.provider_name,
                 "gen_ai.request.model": (model or record.model) or "",
                 "gyroscope.request_id": record.request_id, "gyroscope.source": record.source or "",
                 "gyroscope.outcome": record.outcome, "gyroscope.from_cache": bool(record.from_cache)}
        if record.model:
            attrs["gen_ai.response.model"] = record.model
        if record.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [record.finish_reason]
        if record.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = record.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = record.completion_tokens or 0
            attrs["gen_ai.usage.cache_read.input_tokens"] = record.cached_tokens or 0
            if record.cache_write_tokens:
                attrs["gen_ai.usage.cache_creation.input_tokens"] = record.cache_write_tokens
            if record.reasoning_tokens:
                attrs["gen_ai.usage.reasoning.output_tokens"] = record.reasoning_tokens
        if record.cost is not None:        # draft convention; USD
            attrs["gen_ai.usage.cost.total"] = record.cost
        if record.cost_unknown:
            attrs["gyroscope.cost_unknown"] = True
        if record.ttft_ms is not None:
            attrs["gyroscope.time_to_first_token_s"] = record.ttft_ms / 1000.0
        if record.error_kind:
            attrs["error.type"] = record.error_kind
        if self.capture_content and messages:
            attrs["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
            if content:
                attrs["gen_ai.output.messages"] = json.dumps(
                    [{"role": "assistant", "content": content,
                      "finish_reason": record.finish_reason}], ensure_ascii=False)
        span = self.tracer.start_span(f"chat {attrs['gen_ai.request.model']}".strip(),
                                      kind=SpanKind.CLIENT, attributes=attrs, start_time=start_ns)
        if record.error_kind:
            span.set_status(Status(StatusCode.ERROR, record.error_kind))
        span.end(end_time=end_ns)
        if self.duration is not None:
            base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": self.provider_name,
                    "gen_ai.request.model": attrs["gen_ai.request.model"]}
            self.duration.record((record.latency_ms or 0.0) / 1000.0,
                                 {**base, **({"error.type": record.error_kind} if record.error_kind else {})})
            if record.prompt_tokens is not None:
                self.token_usage.record(record.prompt_tokens, {**base, "gen_ai.token.type": "input"})
                self.token_usage.record(record.completion_tokens or 0, {**base, "gen_ai.token.type": "output"})

    def shutdown(self) -> None:
        self.flush()
        for provider in self._providers:
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass


def provider_name(provider) -> str:
    """gen_ai.provider.name of an upstream: the pricing's catalogue provider when known
    ('openai' for the simulator), else the provider plugin's name."""
    from .prices import default_pricing
    if provider.name == "simulator":      # never start the simulator just to name it
        return "openai"
    pricing = default_pricing(provider.name, provider.base_url)
    return pricing.provider_id or provider.name
