"""The drop-in gateway under load: N concurrent ``/v1/chat/completions`` through Gyroscope
(one server process) against the simulator called directly with ``AsyncOpenAI``, in one run.

    python bench/gateway.py [--concurrent 1000] [--rounds 2] [--latency-ms 200] [--sequential 50]

Three processes: the simulator (``--latency-ms`` before its first token), Gyroscope's API
served by uvicorn exactly as ``asgi_app()`` builds it (the guard, /api and /v1; provider
``openai`` pointed at the simulator, a new database, default settings: cache on, every
prompt new, so every request is a miss that goes upstream), and this process, the client.
Both sides use the same client: ``AsyncOpenAI`` with the SDK's retries off, so a failure
is counted as lost, not hidden by a retry. Rounds alternate which side goes first. Printed:
each burst's throughput, the ratio (through Gyroscope / direct; goal >= 0.6x), requests
lost, history rows (must equal the requests sent through Gyroscope, read from
``/api/stats``), and at low load (``--sequential`` one-at-a-time requests) the p50 of the
gateway's own ``x-gyroscope-overhead-ms`` and of the added wall time per request.

The connect timeout is 60 s on both sides (Gyroscope's ``timeout.connect_s`` too): 1000
connections opening at once on a busy 2-core VM can take longer than 5 s to be accepted,
and a figure made of connect failures on both sides means nothing (see bench/fresh.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx2
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._sim import free_port, simulator_process  # noqa: E402

MSG = "Write a tagline for a neighbourhood bakery, number {i} of run {run}"
MAX_TOKENS = 16
CONNECT_S = 60.0
SERVER = """
import sys, uvicorn
from core.api import asgi_app
from core.service import default_service
default_service().settings.set("timeout.connect_s", {connect}, actor="bench")
uvicorn.run(asgi_app(), host="127.0.0.1", port={port}, log_level="warning", access_log=False,
            backlog=4096, timeout_keep_alive=75)
"""


def _gateway(sim_url: str, db_path: str, what: str = "the gateway", **extra_env: str):
    """A Gyroscope API server (SERVER) with its database at ``db_path``, provider ``openai``
    pointed at ``sim_url``, and ``extra_env``: (process, URL) once /api/health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GYROSCOPE_", "OPENAI_"))}
    env.update(OPENAI_BASE_URL=sim_url, OPENAI_API_KEY="sk-bench", GYROSCOPE_PROVIDER="openai",
               GYROSCOPE_DB=db_path, **extra_env)
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(port=port, connect=CONNECT_S)], env=env,
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(url + "/api/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"{what} did not start")


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0,
                              timeout=httpx2.Timeout(600, connect=CONNECT_S))


async def _burst(clients: list[openai.AsyncOpenAI], n: int, run: str) -> tuple[float, int]:
    """n concurrent requests, spread round-robin over ``clients``: (req/s, requests lost)."""
    async def one(i: int) -> bool:
        try:
            await clients[i % len(clients)].chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": MSG.format(i=i, run=run)}],
                max_tokens=MAX_TOKENS)
            return True
        except openai.OpenAIError:
            return False
    t0 = time.perf_counter()
    ok = await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0), n - sum(ok)


async def _sequential(direct: openai.AsyncOpenAI, gateway: openai.AsyncOpenAI, n: int) -> tuple[float, float]:
    overheads, added = [], []
    for i in range(n):
        messages = [{"role": "user", "content": MSG.format(i=i, run="seq")}]
        t0 = time.perf_counter()
        await direct.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=MAX_TOKENS)
        t1 = time.perf_counter()
        raw = await gateway.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, max_tokens=MAX_TOKENS)
        t2 = time.perf_counter()
        overheads.append(float(raw.headers["x-gyroscope-overhead-ms"]))
        added.append(((t2 - t1) - (t1 - t0)) * 1000)
    return statistics.median(overheads), statistics.median(added)


async def _main(args, sim_url: str, gw_url: str) -> dict:
    direct, gateway = _client(sim_url), _client(gw_url + "/v1")
    await direct.models.list()
    await gateway.models.list()
    ratios, rates, lost, sent = [], {"direct": [], "gyroscope": []}, {"direct": 0, "gyroscope": 0}, 0
    for r in range(args.rounds):
        order = ("direct", "gyroscope") if r % 2 == 0 else ("gyroscope", "direct")
        got = {}
        for side in order:
            rate, failed = await _burst([direct if side == "direct" else gateway], args.concurrent, f"{r}{side}")
            got[side] = rate
            rates[side].append(rate)
            lost[side] += failed
            sent += args.concurrent if side == "gyroscope" else 0
        ratios.append(got["gyroscope"] / got["direct"])
        print(f"round {r + 1}: direct {got['direct']:.0f} req/s, through Gyroscope {got['gyroscope']:.0f} "
              f"req/s, ratio {ratios[-1]:.2f}x", flush=True)
    overhead_p50, added_p50 = await _sequential(direct, gateway, args.sequential)
    await direct.close()
    await gateway.close()
    stats = json.loads(urllib.request.urlopen(gw_url + "/api/stats", timeout=60).read())
    return {"ratios": ratios, "rates": rates, "lost": lost, "sent": sent + args.sequential,
            "rows": stats["total_requests"], "overhead_p50": overhead_p50, "added_p50": added_p50}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=200)
    ap.add_argument("--sequential", type=int, default=50)
    args = ap.parse_args()
    with simulator_process(ttft_ms=args.latency_ms) as sim_url, tempfile.TemporaryDirectory() as tmp:
        proc, gw_url = _gateway(sim_url, os.path.join(tmp, "gateway.db"))
        try:
            out = asyncio.run(_main(args, sim_url, gw_url))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\n{args.concurrent} concurrent /v1/chat/completions, {args.latency_ms:g} ms simulated latency, "
          f"{args.rounds} rounds")
    print(f"throughput ratio (Gyroscope / direct): median {statistics.median(out['ratios']):.2f}x "
          f"(rounds: {', '.join(f'{x:.2f}' for x in out['ratios'])}; goal >= 0.6x)")
    print(f"lost requests: direct {out['lost']['direct']}, through Gyroscope {out['lost']['gyroscope']} (goal 0)")
    print(f"history rows {out['rows']} for {out['sent']} requests through Gyroscope "
          f"({'equal' if out['rows'] == out['sent'] else 'NOT equal'})")
    print(f"low load ({args.sequential} sequential): p50 x-gyroscope-overhead-ms {out['overhead_p50']:.2f} ms, "
          f"p50 added wall time per request {out['added_p50']:.2f} ms")


if __name__ == "__main__":
    main()
