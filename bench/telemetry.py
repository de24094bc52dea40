"""What budgets and telemetry add to each request (issue 16: <= 0.1 ms p50).

    python bench/telemetry.py [--n 5000]

Times, per request and on a real SQLite file in a temp dir, the pieces the pipeline runs:

1. budget, no limit set (the default): working out that none applies;
2. budget, a daily and a monthly limit plus a per-model one: the reservation (one write
   transaction on the file) and its settlement (queued to the writer; its commit is timed
   apart, as the writer's thread does it);
3. Prometheus: counting one history row;
4. OpenTelemetry (when an endpoint is set): one span and two metric points, into the SDK's
   in-memory exporter (what the batch exporter does later, off the request path, is not
   counted).

Each figure is the median (p50) and p95 of n timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import budgets, telemetry  # noqa: E402
from core.db import Database  # noqa: E402
from core.history import History, RequestRecord  # noqa: E402
from core.settings import SettingsStore  # noqa: E402


def timed(fn, n: int) -> tuple[float, float]:
    for _ in range(min(200, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.95)]


def record(i: int) -> RequestRecord:
    return RequestRecord(ts=time.time(), request_id=f"r{i}", source="api", model="gpt-4o-mini",
                         outcome="ok", latency_ms=412.0, ttft_ms=180.0, prompt_tokens=1400,
                         completion_tokens=120, total_tokens=1520, cost=0.000285,
                         cached_tokens=1024, reasoning_tokens=0, token_source="reported",
                         finish_reason="stop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    n = ap.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "bench.db")
        history = History(db)
        settings = SettingsStore(db)
        ledger = budgets.Budgets(db, history)
        figures = {}

        off = budgets.plan_of(settings.snapshot())
        figures["budget, no limit set"] = timed(lambda: off.applying("gpt-4o-mini", "api"), n)

        settings.set_many({"budget.daily_usd": 1e6, "budget.monthly_usd": 1e7,
                           "budget.limits": '{"model:gpt-4o-mini": {"day": 1e6}}'}, actor="bench")
        plan = budgets.plan_of(settings.snapshot())
        holds = []
        figures["budget reserve (3 limits)"] = timed(
            lambda: holds.append(ledger.reserve(plan, "gpt-4o-mini", "api", 0.0003)), n)
        it = iter(holds)
        figures["budget settle (queued)"] = timed(lambda: ledger.settle(next(it), 0.0002), n)
        t0 = time.perf_counter()
        db.flush()
        writer_ms = (time.perf_counter() - t0) * 1000 / max(1, len(holds) - 200)

        from core import tokens
        from core.models import chat_messages
        messages = chat_messages("Write a short, warm tagline for a family bakery in Lyon that "
                                 "sells sourdough, croissants and seasonal fruit tarts.")
        tokens.count_messages(messages, "gpt-4o-mini")
        figures["prompt count for the hold (tiktoken, ~30 tokens)"] = timed(
            lambda: tokens.count_messages(messages, "gpt-4o-mini"), n)

        prom = telemetry.Prometheus(lambda: {})
        rec = record(0)
        figures["Prometheus observe"] = timed(lambda: prom.observe(rec), n)

        try:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
            spans = InMemorySpanExporter()
            tp = TracerProvider()
            tp.add_span_processor(SimpleSpanProcessor(spans))
            otel = telemetry.OTel(tp, MeterProvider(metric_readers=[InMemoryMetricReader()]), "openai")

            def queued() -> None:
                otel.observe(rec)
            figures["OpenTelemetry observe (queued, on the request path)"] = timed(queued, n)
            otel.flush()
            spans.clear()

            def span() -> None:
                otel.emit(rec)
                spans.clear()
            figures["OpenTelemetry span + 2 metric points (its thread)"] = timed(span, n)
        except ImportError:
            print("OpenTelemetry not installed (pip install -e '.[otel]'): skipped")
        db.close()

    print(f"budgets and telemetry per request, n={n} (ms)")
    for name, (p50, p95) in figures.items():
        print(f"  {name:48s} p50 {p50:7.4f}   p95 {p95:7.4f}")
    print(f"  {'settle commits left on the writer (per hold, approx.)':48s} {writer_ms:7.4f}")
    default = figures["budget, no limit set"][0] + figures["Prometheus observe"][0]
    limited = (figures["budget reserve (3 limits)"][0] + figures["budget settle (queued)"][0]
               + figures["Prometheus observe"][0])
    counted = limited + figures["prompt count for the hold (tiktoken, ~30 tokens)"][0]
    print(f"request path, defaults (no limit, Prometheus):        p50 {default:.4f} ms "
          f"({'MET' if default <= 0.1 else 'NOT MET'}: <= 0.1 ms)")
    print(f"request path, with limits (reserve + settle + Prom.): p50 {limited:.4f} ms "
          f"({'MET' if limited <= 0.1 else 'NOT MET'}: <= 0.1 ms)")
    print(f"  ... plus counting the prompt for the hold:            p50 {counted:.4f} ms "
          f"({'MET' if counted <= 0.1 else 'NOT MET'}: <= 0.1 ms)")
    queued = figures.get("OpenTelemetry observe (queued, on the request path)")
    if queued is not None:
        every = counted + queued[0]
        print(f"  ... plus OpenTelemetry (an endpoint set):           p50 {every:.4f} ms "
              f"({'MET' if every <= 0.1 else 'NOT MET'}: <= 0.1 ms; the span itself is built "
              "on the telemetry thread)")


if __name__ == "__main__":
    main()
