"""Throughput at 1000 concurrent requests from a FRESH process at the default settings,
against raw ``AsyncOpenAI`` — what a user who starts Gyroscope and sends a burst gets.

    python bench/fresh.py [--rounds 6] [--concurrent 1000] [--batches 2] [--latency-ms 200]
                          [--unfrozen]

``bench/pipeline.py`` measures a warmed process with the cache off and the breaker
loosened; this bench changes nothing: each side is a new Python process that imports what
it needs and builds its client the way a user would (raw: ``AsyncOpenAI(base_url=...,
api_key=...)``; ours: ``Gyroscope()`` from the environment, a new database file, every
setting at its default, so the cache is on and every request is a cache miss). One
exception, on both sides alike: the connect timeout is ``--connect-timeout`` (60 s), as in
bench/pipeline.py, because with 1000 connections opening at once on 2 busy cores a connect
can take longer than the 5 s default to be noticed, and then most requests fail on both
sides (seen: 880 of 1000 raw requests failed) and the figure means nothing. Each process
sends ``--batches`` bursts of ``--concurrent`` requests and reports each burst's
throughput (ours: until its history rows are committed), the collector's full collections
and the objects the collector tracked when the first burst began.

Rounds alternate the order (raw first in even rounds) and each round's ratio is ours over
the raw process of the same round; the figure is the median of those ratios, per burst
(burst 1 also opens the connection pool). With 1000 requests in flight each process is
CPU-bound, so its process CPU time per request is printed too, and raw's over ours as a
second ratio: less swayed than wall time when other work shares the VM. The simulator runs in its own process with
``--latency-ms`` before its first token. ``--unfrozen`` adds a third process per round,
ours with ``GYROSCOPE_GC_FREEZE=0`` (start-up heap left to the collector), in the same
rotation. Rerun after any change to the request path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The raw side must not import core (that would put Gyroscope's modules on its heap), so the
# prompt is spelled here rather than imported from bench/pipeline.py.
MSG = "Write a tagline for a neighbourhood bakery, number {i}"
MAX_TOKENS = 16
BENCH_KEY = "sk-bench"     # the simulator takes any key


# -- one side, in its own process ---------------------------------------------------------------
class _Collector:
    def __init__(self) -> None:
        self.full, self.seconds, self._t = 0, 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.full += info["generation"] == 2


async def _child(side: str, base_url: str, n: int, batches: int, connect_s: float) -> None:
    if side == "raw":
        import httpx2
        import openai
        client = openai.AsyncOpenAI(base_url=base_url, api_key=BENCH_KEY,
                                    timeout=httpx2.Timeout(600, connect=connect_s))

        async def one(i: int) -> None:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": MSG.format(i=i)}],
                max_tokens=MAX_TOKENS)

        def settle() -> None:
            pass
    else:
        from core.models import GenerationRequest
        from core.service import Gyroscope
        gyro = Gyroscope()            # from the environment: OPENAI_BASE_URL, GYROSCOPE_DB
        gyro.settings.set("timeout.connect_s", connect_s, actor="bench")

        async def one(i: int) -> None:
            await gyro.agenerate(GenerationRequest(prompt=MSG.format(i=i), max_tokens=MAX_TOKENS,
                                                   source="bench"))

        def settle() -> None:
            gyro.db.flush()            # its rows' commits count against it
    objects = len(gc.get_objects())
    collector = _Collector()
    for b in range(batches):
        full, seconds = collector.full, collector.seconds
        t, cpu = time.perf_counter(), time.process_time()
        outcomes = await asyncio.gather(*(one(b * n + i) for i in range(n)), return_exceptions=True)
        settle()
        took, cpu = time.perf_counter() - t, time.process_time() - cpu
        errors = [type(o).__name__ for o in outcomes if isinstance(o, BaseException)]
        print(json.dumps({"rps": n / took, "cpu_ms": cpu / n * 1000, "errors": len(errors), "kinds": sorted(set(errors)),
                          "full_gc": collector.full - full, "gc_s": collector.seconds - seconds,
                          "objects": objects}), flush=True)


# -- the rounds ---------------------------------------------------------------------------------
def _run_side(side: str, base_url: str, args, tmp: Path, r: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GYROSCOPE_", "OPENAI_"))}
    env.update(OPENAI_BASE_URL=base_url, OPENAI_API_KEY=BENCH_KEY,
               GYROSCOPE_DB=str(tmp / f"{side}{r}.db"))
    if side == "unfrozen":
        env["GYROSCOPE_GC_FREEZE"] = "0"
    out = subprocess.run([sys.executable, __file__, "--child", "raw" if side == "raw" else "ours",
                          "--base", base_url,
                          "--concurrent", str(args.concurrent), "--batches", str(args.batches),
                          "--connect-timeout", str(args.connect_timeout)],
                         env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{side} process failed:\n{out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=200)
    ap.add_argument("--unfrozen", action="store_true")
    ap.add_argument("--connect-timeout", type=float, default=60)
    ap.add_argument("--child", choices=("raw", "ours"))
    ap.add_argument("--base")
    args = ap.parse_args()
    if args.child:
        asyncio.run(_child(args.child, args.base, args.concurrent, args.batches, args.connect_timeout))
        return
    sys.path.insert(0, str(ROOT))
    from bench._sim import simulator_process

    sides = ["raw", "ours"] + (["unfrozen"] if args.unfrozen else [])
    rounds: list[dict[str, list[dict]]] = []
    with tempfile.TemporaryDirectory() as d, simulator_process(ttft_ms=args.latency_ms) as base:
        for r in range(args.rounds):
            result = {}
            order = sides[r % len(sides):] + sides[:r % len(sides)]     # raw first, then later
            for side in order if r % 2 == 0 else order[::-1]:
                result[side] = _run_side(side, base, args, Path(d), r)
            rounds.append(result)
            print(f"  round {r + 1}: " + "   ".join(f"burst {b + 1}: " + "  ".join(
                f"{side} {result[side][b]['rps']:6.1f} req/s"
                + (f" ({result[side][b]['rps'] / result['raw'][b]['rps']:.0%})" if side != "raw" else "")
                + (f" [{result[side][b]['errors']} errors: {', '.join(result[side][b]['kinds'])}]"
                   if result[side][b]["errors"] else "")
                for side in sides) for b in range(args.batches)), flush=True)
    print(f"fresh process per side and round, default settings, {args.concurrent} concurrent, "
          f"simulator latency {args.latency_ms:g} ms, {args.rounds} alternating rounds")
    for b in range(args.batches):
        print(f"  burst {b + 1}{' (opens the pool)' if b == 0 else ''}:")
        for side in sides[1:]:
            ratios = [x[side][b]["rps"] / x["raw"][b]["rps"] for x in rounds]
            by_cpu = [x["raw"][b]["cpu_ms"] / x[side][b]["cpu_ms"] for x in rounds]
            print(f"    {side}/raw median {statistics.median(ratios):.1%}"
                  f"   (per round: {', '.join(f'{x:.0%}' for x in ratios)});"
                  f"  by CPU per request: median {statistics.median(by_cpu):.1%}")
        for side in sides:
            xs = [x[side][b] for x in rounds]
            print(f"    {side:8s} median {statistics.median(x['rps'] for x in xs):6.1f} req/s,"
                  f" {statistics.median(x['cpu_ms'] for x in xs):.2f} ms CPU per request"
                  f" (min {min(x['rps'] for x in xs):6.1f}, max {max(x['rps'] for x in xs):6.1f});"
                  f" errors {sum(x['errors'] for x in xs)}; full collections {sum(x['full_gc'] for x in xs)},"
                  f" {statistics.median(x['gc_s'] for x in xs):.2f} s per burst in the collector;"
                  f" objects tracked at start {xs[0]['objects']:,}")


if __name__ == "__main__":
    main()
