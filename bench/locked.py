"""The API while another process locks the database file: health latency and requests served.

    python bench/locked.py [--hold 10] [--clients 8]

Serves core.api's routes with uvicorn (the app's own simulator as the provider, as with no
API key), runs the load once with no lock (the baseline: with 8 clients on 2 cores the loop
is busy serving requests), then twice has a second process lock the file for ``--hold`` seconds while
``--clients`` threads send /api/generate requests (each prompt new: cache misses) and
/api/health is probed every 0.1 s:

1. ``BEGIN EXCLUSIVE`` on a running service (WAL: writers wait, readers go on), with one
   /api/stats call in flight (it commits queued rows first, so it waits for the file);
2. ``PRAGMA locking_mode=EXCLUSIVE`` plus a write, taken before the service opened the file
   (the only time SQLite grants it: see docs/architecture.md), so the service is starting.

Prints health's latency (p50, p95, max) and the requests answered during each lock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import support  # noqa: E402 - tests/support.py: the second process that holds a lock


def lock(path: Path, kind: str, seconds: float) -> subprocess.Popen:
    """A second process holding the ``kind`` lock on the file for ``seconds``."""
    if kind == "none":      # the baseline: same load, nobody locks the file
        return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    holder = support.hold_lock(path, kind)
    threading.Timer(seconds, support.release, [holder]).start()
    return holder


def call(url: str, body: dict | None = None) -> tuple[int, float]:
    t = time.perf_counter()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    return status, time.perf_counter() - t


def under_lock(url: str, path: Path, kind: str, hold: float, clients: int, stats: bool) -> None:
    holder = lock(path, kind, hold)
    t0 = time.perf_counter()
    health: list[float] = []
    answered: list[tuple[int, float, float]] = []       # status, latency, finished at
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            status, took = call(url + "/api/generate", {"prompt": f"{kind} lock, client {c}, #{i}",
                                                        "max_tokens": 8})
            answered.append((status, took, time.perf_counter() - t0))
            i += 1
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    stats_result: list[tuple[int, float]] = []
    if stats:
        threads.append(threading.Thread(target=lambda: stats_result.append(call(url + "/api/stats"))))
    for th in threads:
        th.start()
    while holder.poll() is None:
        health.append(call(url + "/api/health")[1])
        time.sleep(0.1)
    held = time.perf_counter() - t0
    stop.set()
    for th in threads:
        th.join()
    during = [a for a in answered if a[2] <= held]
    ms = sorted(h * 1000 for h in health)
    title = {"none": "no lock (baseline, same load)", "write": "BEGIN EXCLUSIVE, service running",
             "file": "PRAGMA locking_mode=EXCLUSIVE, service starting"}[kind]
    print(f"{title}: {held:.1f} s")
    print(f"  /api/health  {len(ms)} probes: p50 {statistics.median(ms):.1f} ms  p95 {ms[int(len(ms) * .95)]:.1f} ms"
          f"  max {ms[-1]:.1f} ms")
    if during:
        print(f"  /api/generate answered during the lock: {len(during)} "
              f"({sum(a[0] == 200 for a in during)} ok), median {statistics.median(a[1] for a in during) * 1000:.0f} ms")
    else:
        first = min((a[2] for a in answered), default=None)
        print("  /api/generate answered during the lock: 0 (they wait off the loop for the file; "
              f"first answer {first - held:.2f} s after it was released)" if first else "  no answers")
    if stats_result:
        print(f"  /api/stats (commits queued rows first): {stats_result[0][0]} after {stats_result[0][1]:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_PROVIDER", "GYROSCOPE_API_TOKEN"):
        os.environ.pop(name, None)
    path = tmp / "locked.db"
    os.environ["GYROSCOPE_DB"] = str(path)
    os.chdir(tmp)
    from starlette.applications import Starlette

    import core.service
    from core import api
    from core.db import Database
    from test_foundation import _serve     # the tests' uvicorn-in-a-thread server

    url, server = _serve(Starlette(routes=api.routes()))
    try:
        gyro = core.service.default_service()
        gyro.provider.sim.set_latency(ttft_ms=0, tokens_per_s=0)
        call(url + "/api/generate", {"prompt": "warm up", "max_tokens": 8})
        under_lock(url, path, "none", args.hold, args.clients, stats=False)
        under_lock(url, path, "write", args.hold, args.clients, stats=True)
        # A service that has not opened its file yet: a new file (this process's threads
        # still hold connections to the first one, and SQLite grants the whole-file lock
        # only to a file's sole user).
        core.service._default.close()
        core.service._default = None
        path = tmp / "starting.db"
        os.environ["GYROSCOPE_DB"] = str(path)
        Database(path).close()
        under_lock(url, path, "file", args.hold, args.clients, stats=False)
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
