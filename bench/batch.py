"""Batch jobs: throughput against the ideal, and pacing against a rate limit.

    python bench/batch.py [--rows 1000] [--latency-ms 200] [--concurrency 32] [--repeat 1]
                          [--paced-rows 120] [--limit 20] [--window-s 1]

Throughput: every row through the whole pipeline and the ledger (claim, history row, result)
against a simulator in its own process answering after ``latency-ms``; the ideal is
rows / concurrency x latency. The job runs as the CLI and the page run it (started on the
service's loop, core/portal.py: uvloop's when installed). Beside it, the same requests
through the pipeline without the ledger, and from the raw ``AsyncOpenAI`` client. Each side
prints its CPU per row (this process, all threads) and the simulator's: on a small machine
they share the cores, so CPU is the steadier figure. ``--repeat`` runs the sides in turn
that many times and prints the medians. Pacing: the simulator allows ``limit`` requests per
``window-s`` (x-ratelimit-* headers, 429 + Retry-After past it); the same job with pacing
on and off, against the limit's ideal (the windows the rows need, the first one free), and
with the interactive reserve on, against the ideal of what batch rows may take a window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._sim import process_cpu_s, simulator_process  # noqa: E402
from core import portal  # noqa: E402
from core.batch.files import parse_lines  # noqa: E402
from core.config import Config  # noqa: E402
from core.models import GenerationRequest  # noqa: E402
from core.providers.openai_provider import OpenAIProvider  # noqa: E402
from core.service import Gyroscope  # noqa: E402


def _sim(base: str, path: str, body: dict | None = None) -> dict:
    url = base.removesuffix("/v1") + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _gyro(base: str, db: Path, **settings) -> Gyroscope:
    cfg = Config(provider="openai", base_url=base, db_path=db, api_key="sk-bench")
    gyro = Gyroscope(cfg, provider=OpenAIProvider("sk-bench", base))
    gyro.settings.set_many({"cache.enabled": False, "generate.max_tokens": 16, **settings},
                           actor="bench")
    return gyro


def _run(gyro: Gyroscope, rows: int, concurrency: int, tag: str) -> tuple[float, dict]:
    """One job as the CLI and the page run it: started on the service's loop."""
    parsed = parse_lines("\n".join(f"{tag}: write line {i}" for i in range(rows)))
    job = gyro.batch.create(parsed, concurrency=concurrency)
    t0, c0 = time.perf_counter(), time.process_time()
    gyro.batch.start(job).finished.wait()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, {**gyro.batch.progress(job), "cpu_s": cpu}


def _plain(gyro: Gyroscope, rows: int, concurrency: int) -> tuple[float, float]:
    """The same requests through the pipeline with a semaphore and no ledger (on the same
    loop): what the machine does without batch, so the ledger's own cost shows apart."""
    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                await gyro.agenerate(GenerationRequest(prompt=f"plain: write line {i}", source="batch"))
        await asyncio.gather(*(one(i) for i in range(rows)))
    t0, c0 = time.perf_counter(), time.process_time()
    portal.run(main())
    return time.perf_counter() - t0, time.process_time() - c0


def _raw(base: str, rows: int, concurrency: int, loop_factory) -> tuple[float, float]:
    """The same requests from the raw ``AsyncOpenAI`` client with a semaphore: the floor
    this machine sets before Gyroscope does anything (its SDK's CPU per request)."""
    import openai

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=base, api_key="sk-bench", max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"raw: write line {i}"}])
        await asyncio.gather(*(one(i) for i in range(concurrency)))       # connections
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(i) for i in range(rows)))
        times.extend((time.perf_counter() - t0, time.process_time() - c0))
        await client.close()
    times: list[float] = []
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    return times[0], times[1]


def _loop_name(loop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def throughput(rows: int, latency_ms: float, concurrency: int, repeat: int, tmp: Path) -> None:
    ideal = rows / concurrency * latency_ms / 1000
    ours = _loop_name(portal.loop())
    sides = [("batch job", "a row"), ("pipeline + semaphore, no ledger", "a request"),
             (f"raw AsyncOpenAI, {ours}'s loop", "a request")]
    if ours != "asyncio":
        sides.append(("raw AsyncOpenAI, asyncio's loop", "a request"))
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in sides}
    print(f"throughput: {rows} rows, {latency_ms:.0f} ms latency, concurrency {concurrency}; ideal "
          f"{ideal:.2f} s; Gyroscope's loop: {ours}; CPU per row: ours (all threads) / the simulator's")
    with simulator_process(ttft_ms=latency_ms) as base:
        gyro = _gyro(base, tmp / "throughput.db")
        try:
            _run(gyro, concurrency, concurrency, "warm-up")      # connections, tokenizer
            for n in range(repeat):
                for name, unit in sides:
                    s0 = process_cpu_s(base.pid)
                    if name == "batch job":
                        wall, p = _run(gyro, rows, concurrency, f"throughput {n}")
                        cpu, extra = p["cpu_s"], f"; done {p['done']}, failed {p['failed']}"
                    elif name.startswith("pipeline"):
                        (wall, cpu), extra = _plain(gyro, rows, concurrency), ""
                    else:
                        factory = portal.new_loop if ours in name else asyncio.new_event_loop
                        (wall, cpu), extra = _raw(base, rows, concurrency, factory), ""
                    sim = process_cpu_s(base.pid) - s0
                    figures[name].append((wall, cpu, sim))
                    print(f"  {name}: {wall:.2f} s = {wall / ideal:.3f}x of the ideal; CPU "
                          f"{cpu / rows * 1000:.2f} ms {unit} / simulator {sim / rows * 1000:.2f} ms{extra}")
                print(f"  load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        finally:
            gyro.close()
    if repeat > 1:
        print(f"medians of {repeat} runs:")
        for name, unit in sides:
            wall, cpu, sim = (statistics.median(f[i] for f in figures[name]) for i in range(3))
            print(f"  {name}: {wall:.2f} s = {wall / ideal:.3f}x (best {min(f[0] for f in figures[name]) / ideal:.3f}x); "
                  f"CPU {cpu / rows * 1000:.2f} ms {unit} / simulator {sim / rows * 1000:.2f} ms")


def pacing(rows: int, limit: int, window_s: float, concurrency: int, tmp: Path) -> None:
    ideal = (math.ceil(rows / limit) - 1) * window_s
    for paced, reserve in ((True, 0.1), (True, 0.0), (False, 0.1)):
        with simulator_process(ttft_ms=20) as base:
            _sim(base, "/_sim/faults", {"rate_limit_requests": limit, "rate_limit_window_s": window_s})
            gyro = _gyro(base, tmp / f"pacing-{paced}-{reserve}.db", **{
                "pacing.enabled": paced, "pacing.interactive_reserve": reserve, "retry.max_retries": 10, "retry.base_delay_s": 0.05,
                "breaker.mode": "consecutive", "breaker.fail_max": 1000})
            try:
                wall, p = _run(gyro, rows, concurrency, f"paced-{paced}")
            finally:
                gyro.close()
            stats = _sim(base, "/_sim/stats")
        share = limit - (math.ceil(limit * reserve) if paced else 0)    # what batch rows may take a window
        kept = (math.ceil(rows / share) - 1) * window_s
        with_reserve = f", {wall / kept:.2f}x of {kept:.2f} s with the reserve kept" if kept != ideal else ""
        print(f"pacing {f'on (reserve {reserve:g})' if paced else 'off'}: {rows} rows under {limit} requests per "
              f"{window_s:g} s, concurrency {concurrency}: {wall:.2f} s (limit's ideal {ideal:.2f} s, "
              f"{wall / ideal:.2f}x{with_reserve}); 429s {stats['rate_limited']}; requests {stats['chat_requests']}; "
              f"done {p['done']}, failed {p['failed']}; load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="throughput runs (medians printed)")
    ap.add_argument("--paced-rows", type=int, default=120)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--window-s", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rows:
            throughput(args.rows, args.latency_ms, args.concurrency, args.repeat, Path(tmp))
        if args.paced_rows:
            pacing(args.paced_rows, args.limit, args.window_s, 16, Path(tmp))


if __name__ == "__main__":
    main()
