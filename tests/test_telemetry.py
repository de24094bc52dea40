"""Prometheus exposition equals the history; OpenTelemetry GenAI spans through the SDK's
in-memory exporter; nothing of OpenTelemetry without OTEL_EXPORTER_OTLP_ENDPOINT."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import errors, telemetry
from core.models import GenerationRequest
from tests.support import FakeClock
from tests.test_pipeline import make_gyro, rows


@pytest.fixture
def gyro(tmp_path, simulator):
    simulator.sim.prompt_cache.clear()
    g = make_gyro(tmp_path, simulator, FakeClock(), **{"retry.max_retries": 0})
    yield g
    g.close()


def ask(prompt: str, **kw) -> GenerationRequest:
    kw.setdefault("source", "test")
    return GenerationRequest(prompt=prompt, **kw)


def some_traffic(gyro, simulator) -> None:
    """Answers, a cache hit, a reasoning model, cached prompt tokens, a failure, a stream."""
    long = "Describe sourdough starters, step by step, in detail. " * 120
    gyro.generate(ask("Name a bread"))
    gyro.generate(ask("Name a bread"))                               # a cache hit
    gyro.generate(ask("Name a cake", model="o4-mini"))               # reasoning tokens
    gyro.generate(ask(long, cache=False))
    gyro.generate(ask(long, cache=False))                            # cached prompt tokens
    with gyro.stream(ask("Name a pastry")) as stream:
        "".join(stream)
    simulator.sim.set_faults(fail_next=1, fail_status=400)
    with pytest.raises(errors.GyroscopeError):
        gyro.generate(ask("Name a pie"))


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(found: dict, name: str, **labels) -> float:
    return sum(s.value for s in found.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


def test_prometheus_text_parses_and_its_values_equal_the_history(gyro, simulator):
    gyro.settings.set("budget.daily_usd", 5.0, actor="test")
    some_traffic(gyro, simulator)
    found = samples(gyro.prometheus.exposition().decode())
    t = gyro.stats()
    got = rows(gyro)
    assert total(found, "gyroscope_requests_total") == t["total_requests"] == len(got) == 7
    for outcome in ("ok", "error"):
        assert total(found, "gyroscope_requests_total", outcome=outcome) == sum(
            r["outcome"] == outcome for r in got)
    assert total(found, "gyroscope_tokens_total", type="prompt") == t["prompt_tokens"]
    assert total(found, "gyroscope_tokens_total", type="completion") == t["completion_tokens"]
    assert total(found, "gyroscope_tokens_total", type="cached") == t["cached_tokens"] > 0
    assert total(found, "gyroscope_tokens_total", type="reasoning") == t["reasoning_tokens"] == 32
    assert total(found, "gyroscope_cost_usd_total") == pytest.approx(t["total_cost"])
    assert total(found, "gyroscope_cache_hits_total") == t["cached_requests"] == 1
    answered = [r for r in got if r["outcome"] == "ok" and not r["from_cache"]]
    assert total(found, "gyroscope_request_latency_seconds_count") == len(answered)
    assert total(found, "gyroscope_request_latency_seconds_sum") == pytest.approx(
        sum(r["latency_ms"] for r in answered) / 1000)
    assert total(found, "gyroscope_time_to_first_token_seconds_count") == sum(
        r["ttft_ms"] is not None for r in answered)
    states = {s.labels["breaker"]: s.value for s in found["gyroscope_breaker_state"]}
    assert states and set(states.values()) <= {0, 1, 2}
    left = {(s.labels["scope"], s.labels["period"]): s.value for s in found["gyroscope_budget_left_usd"]}
    assert left[("all", "day")] == pytest.approx(5.0 - t["total_cost"])
    assert total(found, "gyroscope_pacing_waits_total") == 0


def test_api_metrics_route_serves_the_exposition(app_env):
    from starlette.testclient import TestClient
    import core.service
    from core import api
    gyro = core.service.default_service()
    gyro.generate(ask("Name a bread", source="api"))
    with TestClient(api.asgi_app(), base_url="http://127.0.0.1") as client:
        got = client.get("/api/metrics")
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain")
    assert total(samples(got.text), "gyroscope_requests_total", outcome="ok", source="api") == 1


# -- OpenTelemetry -----------------------------------------------------------------------------
def otel_pair(capture: bool = False):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    otel = telemetry.OTel(tracer_provider, MeterProvider(metric_readers=[reader]), "openai", capture)
    return otel, spans, reader


GENAI = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
         "gen_ai.response.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
         "gen_ai.usage.cache_read.input_tokens", "gen_ai.response.finish_reasons",
         "gen_ai.usage.cost.total")


def test_spans_carry_the_genai_attributes_and_no_content_unless_opted_in(gyro, simulator):
    otel, spans, reader = otel_pair()
    gyro.pipeline.observers = (*gyro.pipeline.observers, otel.observe)
    some_traffic(gyro, simulator)
    otel.flush()       # spans are built on the telemetry thread
    finished = spans.get_finished_spans()
    assert len(finished) == len(rows(gyro)) == 7
    answered = [s for s in finished if s.attributes["gyroscope.outcome"] == "ok"]
    for span in answered:
        assert set(GENAI) <= set(span.attributes), span.attributes
        assert span.name == f"chat {span.attributes['gen_ai.request.model']}"
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.provider.name"] == "openai"
        assert "gen_ai.input.messages" not in span.attributes
    by_id = {r["request_id"]: r for r in rows(gyro)}
    for span in answered:
        row = by_id[span.attributes["gyroscope.request_id"]]
        assert span.attributes["gen_ai.usage.input_tokens"] == row["prompt_tokens"]
        assert span.attributes["gen_ai.usage.cache_read.input_tokens"] == row["cached_tokens"]
        assert span.attributes["gen_ai.usage.cost.total"] == pytest.approx(row["cost"])
        assert span.end_time - span.start_time == pytest.approx(row["latency_ms"] * 1e6, abs=1e3)
    failed = [s for s in finished if s.attributes["gyroscope.outcome"] == "error"]
    assert len(failed) == 1 and failed[0].attributes["error.type"] == "bad_request"
    assert not failed[0].status.is_ok
    assert any(s.attributes.get("gen_ai.usage.reasoning.output_tokens") == 32 for s in answered)
    names = {m.name for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= names


def test_spans_are_built_off_the_request_path_and_a_bad_row_stops_nothing(caplog):
    from core.history import RequestRecord
    otel, spans, _ = otel_pair()
    row = RequestRecord(ts=1_800_000_000.0, request_id="r1", source="api", model="gpt-4o-mini",
                        outcome="ok", latency_ms=400.0, prompt_tokens=12, completion_tokens=3)
    otel.observe(type("Broken", (), {"ts": None})())     # no time: its span cannot be built
    for _ in range(3):
        otel.observe(row)
    otel.flush()
    assert otel._thread.name == "gyroscope-otel" and otel._thread.is_alive()
    assert len(spans.get_finished_spans()) == 3
    assert "a span could not be built" in caplog.text


def test_message_content_only_when_the_operator_opts_in(gyro):
    otel, spans, _ = otel_pair(capture=True)
    gyro.pipeline.observers = (*gyro.pipeline.observers, otel.observe)
    result = gyro.generate(ask("Name a bread"))
    otel.flush()
    span = spans.get_finished_spans()[0]
    assert json.loads(span.attributes["gen_ai.input.messages"]) == [{"role": "user", "content": "Name a bread"}]
    assert json.loads(span.attributes["gen_ai.output.messages"])[0]["content"] == result.content
    assert telemetry.OTel.from_env("openai", env={}) is None


def test_nothing_of_opentelemetry_is_set_up_without_an_endpoint(tmp_path):
    code = ("import os, sys; os.environ.pop('OTEL_EXPORTER_OTLP_ENDPOINT', None)\n"
            "from core.config import Config\nfrom core.service import Gyroscope\n"
            f"g = Gyroscope(Config(provider='simulator', base_url=None, db_path={str(tmp_path / 'o.db')!r}))\n"
            "assert g.otel is None and g.pipeline.observers == (g.prometheus.observe,)\n"
            # redis-py (which pybreaker imports when installed) loads opentelemetry's API for
            # its own optional metrics; what must not happen is an exporter or a provider.
            "assert not [m for m in sys.modules if m.startswith('opentelemetry.exporter')], 'exporter'\n"
            "from opentelemetry import metrics, trace\n"
            "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider', 'tracer set up'\n"
            "assert type(metrics.get_meter_provider()).__name__ == '_ProxyMeterProvider', 'meter set up'\n"
            "g.close(); print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "clean", out.stderr


def test_an_endpoint_builds_otlp_exporters_and_reads_the_opt_in(monkeypatch):
    otel = telemetry.OTel.from_env("openai", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", telemetry.CAPTURE_ENV: "true"})
    try:
        assert otel is not None and otel.capture_content and otel.duration is not None
    finally:
        otel.shutdown()
