"""Pipeline overhead against the raw openai SDK, side by side in one run.

    python bench/pipeline.py [--sequential 400] [--concurrent 1000]

1. Sequential requests, cache off: median latency raw SDK vs Gyroscope (sync facade and async).
2. 1000 concurrent requests with 200 ms simulator latency: throughput raw AsyncOpenAI vs pipeline.
3. Time to first token when streaming: raw vs pipeline.
The simulator runs in a separate process; both clients talk to it over loopback HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._sim import simulator_process  # noqa: E402
from core.config import Config  # noqa: E402
from core.models import GenerationRequest  # noqa: E402
from core.providers.openai_provider import OpenAIProvider  # noqa: E402
from core.service import Gyroscope  # noqa: E402

MSG = "Write a tagline for a neighbourhood bakery, number {i}"


def make_gyro(base_url: str, tmp: Path) -> Gyroscope:
    cfg = Config(provider="openai", base_url=base_url, db_path=tmp / "bench.db", api_key="sk-bench")
    gyro = Gyroscope(cfg, provider=OpenAIProvider("sk-bench", base_url))
    gyro.settings.set_many({"cache.enabled": False, "breaker.fail_max": 1000}, actor="bench")
    return gyro


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.3f} ms  p95 {sorted(values)[int(len(values) * .95)] * 1000:7.3f} ms"


def sequential(base_url: str, gyro: Gyroscope, n: int) -> None:
    raw = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    params = dict(model="gpt-4o-mini", max_tokens=16, temperature=0.7)
    raw_t, gyro_t = [], []
    for i in range(30):  # warm both paths
        raw.chat.completions.create(messages=[{"role": "user", "content": MSG.format(i=i)}], **params)
        gyro.generate(GenerationRequest(prompt=MSG.format(i=i), max_tokens=16, source="bench"))
    for i in range(n):   # interleaved, so drift hits both equally
        t = time.perf_counter()
        raw.chat.completions.create(messages=[{"role": "user", "content": MSG.format(i=i)}], **params)
        raw_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        gyro.generate(GenerationRequest(prompt=MSG.format(i=i), max_tokens=16, source="bench"))
        gyro_t.append(time.perf_counter() - t)
    print(f"sequential, cache off, n={n}")
    print(f"  raw openai.OpenAI        {ms(raw_t)}")
    print(f"  gyroscope generate()     {ms(gyro_t)}")
    print(f"  overhead (median)        {(statistics.median(gyro_t) - statistics.median(raw_t)) * 1000:+.3f} ms")


async def async_sequential(base_url: str, gyro: Gyroscope, n: int) -> None:
    raw = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    params = dict(model="gpt-4o-mini", max_tokens=16, temperature=0.7)
    raw_t, gyro_t = [], []
    for i in range(30):
        await raw.chat.completions.create(messages=[{"role": "user", "content": MSG.format(i=i)}], **params)
        await gyro.agenerate(GenerationRequest(prompt=MSG.format(i=i), max_tokens=16, source="bench"))
    for i in range(n):
        t = time.perf_counter()
        await raw.chat.completions.create(messages=[{"role": "user", "content": MSG.format(i=i)}], **params)
        raw_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        await gyro.agenerate(GenerationRequest(prompt=MSG.format(i=i), max_tokens=16, source="bench"))
        gyro_t.append(time.perf_counter() - t)
    print(f"sequential async, cache off, n={n}")
    print(f"  raw openai.AsyncOpenAI   {ms(raw_t)}")
    print(f"  gyroscope agenerate()    {ms(gyro_t)}")
    print(f"  overhead (median)        {(statistics.median(gyro_t) - statistics.median(raw_t)) * 1000:+.3f} ms")
    await raw.close()


async def concurrent(base_url: str, gyro: Gyroscope, n: int, rounds: int = 5) -> None:
    raw = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    params = dict(model="gpt-4o-mini", max_tokens=16, temperature=0.7)

    async def raw_one(i):
        await raw.chat.completions.create(messages=[{"role": "user", "content": MSG.format(i=i)}], **params)

    async def gyro_one(i):
        await gyro.agenerate(GenerationRequest(prompt=MSG.format(i=i), max_tokens=16, source="bench"))

    await asyncio.gather(*(raw_one(i) for i in range(100)))
    await asyncio.gather(*(gyro_one(i) for i in range(100)))
    rps: dict[str, list[float]] = {"raw": [], "gyro": []}
    cpu: dict[str, list[float]] = {"raw": [], "gyro": []}
    for _ in range(rounds):              # alternate, so machine noise hits both alike
        for name, fn in (("raw", raw_one), ("gyro", gyro_one)):
            c, t = time.process_time(), time.perf_counter()
            await asyncio.gather(*(fn(i) for i in range(n)))
            rps[name].append(n / (time.perf_counter() - t))
            cpu[name].append((time.process_time() - c) / n * 1000)
    print(f"{n} concurrent requests, simulator latency 200 ms, {rounds} alternating rounds each")
    for name, label in (("raw", "raw AsyncOpenAI       "), ("gyro", "gyroscope agenerate() ")):
        print(f"  {label}   best {max(rps[name]):6.1f} req/s  median {statistics.median(rps[name]):6.1f} req/s"
              f"  client CPU {statistics.median(cpu[name]):.2f} ms/request")
    print(f"  throughput vs raw        best {max(rps['gyro']) / max(rps['raw']):.1%}"
          f"  median {statistics.median(rps['gyro']) / statistics.median(rps['raw']):.1%}")
    await raw.close()


async def ttft(base_url: str, gyro: Gyroscope, n: int) -> None:
    raw = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    raw_t, gyro_t = [], []
    for i in range(n):
        t = time.perf_counter()
        stream = await raw.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": MSG.format(i=i)}], max_tokens=32,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                raw_t.append(time.perf_counter() - t)
                break
        await stream.close()
        t = time.perf_counter()
        s = gyro.astream(GenerationRequest(prompt=MSG.format(i=i), max_tokens=32, source="bench"))
        async for _piece in s:
            gyro_t.append(time.perf_counter() - t)
            break
        await s.aclose()
    print(f"time to first token, streaming, simulator TTFT 50 ms, n={n}")
    print(f"  raw AsyncOpenAI          {ms(raw_t)}")
    print(f"  gyroscope astream()      {ms(gyro_t)}")
    print(f"  overhead (median)        {(statistics.median(gyro_t) - statistics.median(raw_t)) * 1000:+.3f} ms")
    await raw.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequential", type=int, default=400)
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ttft", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        with simulator_process(ttft_ms=0, tokens_per_s=0) as base:
            gyro = make_gyro(base, Path(d))
            sequential(base, gyro, args.sequential)
            asyncio.run(async_sequential(base, gyro, args.sequential))
            gyro.close()
        with simulator_process(ttft_ms=200, tokens_per_s=0) as base:
            gyro = make_gyro(base, Path(d) / "c")
            asyncio.run(concurrent(base, gyro, args.concurrent, args.rounds))
            gyro.close()
        with simulator_process(ttft_ms=50, tokens_per_s=200) as base:
            gyro = make_gyro(base, Path(d) / "t")
            asyncio.run(ttft(base, gyro, args.ttft))
            gyro.close()


if __name__ == "__main__":
    main()
