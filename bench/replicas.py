"""Replicas on one PostgreSQL: throughput of two API replicas against one, at 1000 concurrent.

    python bench/replicas.py [--requests 6000] [--concurrent 1000] [--ttft-ms 0]

Each run starts the simulator in a process of its own and 1 or 2 API replicas (uvicorn,
`core.api`), each with its own SQLite file and all on one fresh PostgreSQL database
(GYROSCOPE_DATABASE_URL): the machine's server at 127.0.0.1:5432 when it answers, else a
temporary cluster (initdb + pg_ctl). One client process sends ``--requests`` POST
/api/generate (no cache) with ``--concurrent`` in flight, spread round-robin over the
replicas, and prints requests/s, latency p50/p95 and the rows PostgreSQL holds afterwards
(every answered request must have its row). A run with one replica on the SQLite file alone
(no GYROSCOPE_DATABASE_URL) is the baseline.

On this 2-core VM the client, the simulator and the replicas share the cores, so the
figures say what PostgreSQL costs a replica and whether a second one helps here, not what
two machines would do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench._sim import simulator_process  # noqa: E402
from pg_support import MACHINE_URL, TempCluster, answers, create_database, drop_database  # noqa: E402

SERVER = """
import socket, uvicorn
from starlette.applications import Starlette
from core.api import routes, lifespan
sock = socket.socket(); sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(Starlette(routes=routes(), lifespan=lifespan), log_level="error",
                              backlog=4096, timeout_keep_alive=120)).run(sockets=[sock])
"""


def start_replica(tmp: Path, name: str, sim: str, url: str | None) -> tuple[subprocess.Popen, str]:
    import httpx2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GYROSCOPE_", "OPENAI_"))}
    env.update(GYROSCOPE_DB=str(tmp / f"{name}.db"), OPENAI_BASE_URL=sim, OPENAI_API_KEY="sk-bench",
               PYTHONPATH=str(ROOT))
    if url:
        env["GYROSCOPE_DATABASE_URL"] = url
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = f"http://127.0.0.1:{int(proc.stdout.readline())}"
    for _ in range(600):
        with contextlib.suppress(httpx2.HTTPError):
            if httpx2.get(base + "/api/health", timeout=5).json().get("status") == "ok":
                return proc, base
        time.sleep(0.05)
    raise SystemExit(f"replica {name} did not start")


async def load(bases: list[str], requests: int, concurrent: int) -> tuple[float, list[float], int]:
    import httpx2
    latencies: list[float] = []
    failed = 0
    counter = iter(range(requests))
    clients = [httpx2.AsyncClient(base_url=b, timeout=120,
                                  limits=httpx2.Limits(max_connections=concurrent)) for b in bases]

    async def worker() -> None:
        nonlocal failed
        for i in counter:
            client = clients[i % len(clients)]
            t0 = time.perf_counter()
            try:
                resp = await client.post("/api/generate", json={"prompt": f"bench {i}", "max_tokens": 16,
                                                                "cache": False})
            except httpx2.HTTPError:       # counted, not fatal: a figure, not a test
                failed += 1
                continue
            latencies.append(time.perf_counter() - t0)
            failed += resp.status_code != 200

    # A warm-up round so that imports, pools and the tokenizer are not in the figures.
    await asyncio.gather(*(c.post("/api/generate", json={"prompt": "warm", "max_tokens": 4})
                           for c in clients for _ in range(20)))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrent)))
    elapsed = time.perf_counter() - t0
    for c in clients:
        await c.aclose()
    return elapsed, latencies, failed


def run(label: str, replicas: int, url: str | None, sim: str, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start_replica(Path(tmp), f"r{i}", sim, url) for i in range(replicas)]
        try:
            elapsed, lat, failed = asyncio.run(load([b for _, b in procs], args.requests, args.concurrent))
        finally:
            for proc, _ in procs:
                proc.terminate()
                proc.wait(30)
        rows = ""
        if url:
            import psycopg
            with psycopg.connect(url) as conn:
                n = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
            rows = f"  rows in PostgreSQL {n}"
        lat.sort()
        print(f"{label:28} {args.requests / elapsed:8.0f} req/s  p50 {statistics.median(lat) * 1000:7.0f} ms  "
              f"p95 {lat[int(len(lat) * .95)] * 1000:7.0f} ms  failed {failed}{rows}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--concurrent", type=int, default=1000)
    ap.add_argument("--ttft-ms", type=float, default=0)
    args = ap.parse_args()
    cluster = None
    server = MACHINE_URL
    if not answers(server):
        cluster = TempCluster()
        cluster.start()
        server = cluster.url
    print(f"{args.requests} requests, {args.concurrent} concurrent, simulator ttft {args.ttft_ms:g} ms, "
          f"{os.cpu_count()} cores", flush=True)
    try:
        with simulator_process(ttft_ms=args.ttft_ms) as sim:
            run("1 replica, SQLite only", 1, None, sim, args)
            for replicas in (1, 2):
                url = create_database(server)
                try:
                    run(f"{replicas} replica(s), PostgreSQL", replicas, url, sim, args)
                finally:
                    drop_database(server, url)
    finally:
        if cluster is not None:
            cluster.remove()


if __name__ == "__main__":
    main()
