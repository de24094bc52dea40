"""What a budget reservation costs when the ledger is in PostgreSQL (issue 18), beside the
SQLite file's (issue 16's goal there: <= 0.1 ms per request).

    python bench/pg_budgets.py [--n 3000] [--url postgresql://...]

Against the machine's PostgreSQL (127.0.0.1:5432) when it answers, else a temporary cluster
(initdb + pg_ctl); a fresh database either way, dropped after. Times, per call:

1. the file's reservation (3 limits: daily, monthly, per model), for comparison;
2. PostgreSQL's reservation (3 limits): one call of ``gyroscope_budget_reserve`` on the
   reservations' connection, a network round trip to a local server;
3. its settlement as the request sees it (queued to the settler thread), and the settler's
   throughput (the queued settlements written, timed to the end of ``flush``);
4. two processes reserving on the same ledger rows at once (the contended case: replicas
   taking turns on the rows' locks): each one's p50 and p95 and the reservations per second
   of both together.

Each figure is the median (p50) and p95 of n timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from core import budgets  # noqa: E402
from core.db import Database  # noqa: E402
from core.settings import SettingsStore  # noqa: E402

LIMITS = {"budget.daily_usd": 1e6, "budget.monthly_usd": 1e7,
          "budget.limits": '{"model:gpt-4o-mini": {"day": 1e6}}'}


def timed(fn, n: int) -> list[float]:
    for _ in range(min(200, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return sorted(out)


def p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def pg_ledger(url: str):
    from core.storage.pg_budgets import PgBudgets
    from core.storage.pg_settings import PgSettingsStore
    from core.storage.postgres import PgDatabase
    db = PgDatabase(url)
    return db, PgSettingsStore(db), PgBudgets(db)


def worker(url: str, n: int) -> None:
    """One process reserving and settling n times; prints its timings as JSON."""
    db, settings, ledger = pg_ledger(url)
    plan = budgets.plan_of(settings.snapshot())
    print("ready", flush=True)
    sys.stdin.readline()            # start together
    t0 = time.perf_counter()
    times = timed(lambda: ledger.settle(ledger.reserve(plan, "gpt-4o-mini", "api", 0.0003), 0.0002), n)
    elapsed = time.perf_counter() - t0
    ledger.flush()
    ledger.close()
    db.close()
    print(json.dumps({"times": times, "elapsed": elapsed, "calls": n + min(200, n)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--url", help="a PostgreSQL server (its maintenance database)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.n)
    from pg_support import MACHINE_URL, TempCluster, answers, create_database, drop_database
    n = args.n
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lite = Database(Path(tmp) / "bench.db")
        SettingsStore(lite).set_many(LIMITS, actor="bench")
        plan = budgets.plan_of(SettingsStore(lite).snapshot())
        file_ledger = budgets.Budgets(lite)
        holds = []
        figures["file: reserve (3 limits)"] = timed(
            lambda: holds.append(file_ledger.reserve(plan, "gpt-4o-mini", "api", 0.0003)), n)
        lite.close()

    cluster = None
    server = args.url or (MACHINE_URL if answers(MACHINE_URL) else None)
    if server is None:
        cluster = TempCluster()
        cluster.start()
        server = cluster.url
    url = create_database(server)
    try:
        db, settings, ledger = pg_ledger(url)
        settings.set_many(LIMITS, actor="bench")
        plan = budgets.plan_of(settings.snapshot())
        holds = []
        figures["PostgreSQL: reserve (3 limits, one round trip)"] = timed(
            lambda: holds.append(ledger.reserve(plan, "gpt-4o-mini", "api", 0.0003)), n)
        it = iter(holds)
        figures["PostgreSQL: settle (queued to its thread)"] = timed(lambda: ledger.settle(next(it), 0.0002), n)
        t0 = time.perf_counter()
        ledger.flush()
        flush_s = time.perf_counter() - t0
        ledger.close()
        db.close()

        procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, "--n", str(n)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.communicate(timeout=600)[0].strip().splitlines()[-1]) for proc in procs]
        for i, r in enumerate(results):
            figures[f"PostgreSQL, 2 processes at once: reserve + settle, process {i + 1}"] = r["times"]
        rate = sum(r["calls"] for r in results) / max(r["elapsed"] for r in results)
    finally:
        drop_database(server, url)
        if cluster is not None:
            cluster.remove()

    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"budget reservations, n={n}, load average {load} (ms)")
    for name, values in figures.items():
        print(f"  {name:<66} p50 {statistics.median(values):8.4f}   p95 {p(values, 0.95):8.4f}")
    print(f"  settler: {len(holds)} settlements written in {flush_s * 1000:.1f} ms after the last was queued")
    print(f"  2 processes at once on the same rows: {rate:,.0f} reservations + settlements per second together")


if __name__ == "__main__":
    main()
