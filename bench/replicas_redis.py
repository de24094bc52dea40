"""Two replicas against one sharing Redis: throughput of N concurrent /v1/chat/completions
(bench/replicas.py does the same on PostgreSQL).

    python bench/replicas_redis.py [--concurrent 1000] [--rounds 2] [--latency-ms 200]

Processes: the simulator (``--latency-ms`` before its first token), three Gyroscope API
servers started as bench/gateway.py starts one (provider ``openai`` pointed at the
simulator, each on its own SQLite file, all with ``GYROSCOPE_REDIS_URL`` so breaker, cache
and pacing are shared), and this process, the client. "one" sends the whole burst to one
replica; "two" spreads it over two others, alternating request by request as a
round-robin load balancer would. Every prompt is new (cache misses that go upstream).
Rounds alternate which case goes first. Printed: each burst's throughput, the ratio
(two / one), requests lost, and history rows (their sum over the replicas must equal the
requests sent).

Redis is the one in GYROSCOPE_REDIS_URL, else 127.0.0.1:6379, else a redis-server started
here, under a throw-away key prefix removed afterwards. On this 2-core machine shared with
other work the replicas compete for the same two cores, so the figure says what a second
process buys on one machine, not what a second machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._sim import simulator_process  # noqa: E402
from bench.gateway import _burst, _client, _gateway  # noqa: E402
from bench.redis_cache import _redis_url  # noqa: E402


def _replica(sim_url: str, tmp: Path, name: str, redis_url: str, prefix: str):
    return _gateway(sim_url, str(tmp / f"{name}.db"), f"replica {name}",
                    GYROSCOPE_REDIS_URL=redis_url, GYROSCOPE_REDIS_PREFIX=prefix)


async def _main(args, urls: dict[str, list[str]]) -> dict:
    clients = {case: [_client(u + "/v1") for u in us] for case, us in urls.items()}
    for cs in clients.values():
        for c in cs:
            await c.models.list()
    rates, lost, ratios = {"one": [], "two": []}, {"one": 0, "two": 0}, []
    for r in range(args.rounds):
        got = {}
        for case in (("one", "two") if r % 2 == 0 else ("two", "one")):
            rate, failed = await _burst(clients[case], args.concurrent, f"{r}{case}")
            got[case] = rate
            rates[case].append(rate)
            lost[case] += failed
        ratios.append(got["two"] / got["one"])
        print(f"round {r + 1}: one replica {got['one']:.0f} req/s, two replicas {got['two']:.0f} req/s, "
              f"ratio {ratios[-1]:.2f}x", flush=True)
    for cs in clients.values():
        for c in cs:
            await c.close()
    rows = {case: sum(json.loads(urllib.request.urlopen(u + "/api/stats", timeout=60).read())["total_requests"]
                      for u in us) for case, us in urls.items()}
    return {"rates": rates, "lost": lost, "ratios": ratios, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    redis_url, redis_proc = _redis_url(tmp)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    procs = []
    try:
        with simulator_process(ttft_ms=args.latency_ms) as sim_url:
            urls: dict[str, list[str]] = {"one": [], "two": []}
            for case, names in (("one", ["solo"]), ("two", ["a", "b"])):
                for name in names:
                    proc, url = _replica(sim_url, tmp, name, redis_url, prefix)
                    procs.append(proc)
                    urls[case].append(url)
            print(f"{args.concurrent} concurrent, {args.rounds} round(s), upstream latency "
                  f"{args.latency_ms:g} ms, Redis shared", flush=True)
            out = asyncio.run(_main(args, urls))
        best = {case: max(v) for case, v in out["rates"].items()}
        print(f"best: one {best['one']:.0f} req/s, two {best['two']:.0f} req/s "
              f"({best['two'] / best['one']:.2f}x); ratios {', '.join(f'{x:.2f}' for x in out['ratios'])}")
        sent = args.concurrent * args.rounds
        print(f"lost: one {out['lost']['one']}, two {out['lost']['two']}; history rows: one "
              f"{out['rows']['one']} of {sent}, two {out['rows']['two']} of {sent}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        if redis_proc is not None:
            redis_proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
