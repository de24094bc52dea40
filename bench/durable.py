"""Durable-commit overhead: what waiting for a history row's commit costs a request.

    python bench/durable.py [--rows 3000] [--concurrent 1000]

1. One row at a time (the sequential request path): ``History.add`` alone (what the
   pipeline did before rows became durable) against ``add`` plus waiting for the commit,
   blocking (``History.wait``: the sync path) and async (``History.committed``).
2. ``--concurrent`` tasks on one event loop adding a row and awaiting its commit, again and
   again: rows per second and rows per commit (group commit under load).
3. The spill journal: one row appended (the path taken while the database refuses rows).

A real SQLite file (WAL, synchronous=NORMAL) in a temp dir; no network.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.db import Database  # noqa: E402
from core.history import History, RequestRecord  # noqa: E402
from core.journal import SpillJournal  # noqa: E402

_n = 0


def record() -> RequestRecord:
    global _n
    _n += 1
    return RequestRecord(ts=time.time(), request_id=f"bench-{_n}", model="gpt-4o-mini", attempts=1,
                         latency_ms=12.5, prompt_tokens=20, completion_tokens=5, total_tokens=25,
                         cost=0.00001)


def us(values: list[float]) -> str:
    values = sorted(values)
    return (f"median {statistics.median(values) * 1e6:7.1f} us  "
            f"p95 {values[int(len(values) * .95)] * 1e6:7.1f} us")


def sequential(history: History, rows: int) -> None:
    queued, blocking, awaited = [], [], []
    for _ in range(rows):
        t = time.perf_counter()
        history.add(record())
        queued.append(time.perf_counter() - t)
    history.db.flush()
    for _ in range(rows):
        t = time.perf_counter()
        history.wait(history.add(record()))
        blocking.append(time.perf_counter() - t)

    async def run() -> None:
        for _ in range(rows):
            t = time.perf_counter()
            await history.committed(history.add(record()))
            awaited.append(time.perf_counter() - t)
    asyncio.run(run())
    print(f"one row at a time, n={rows}")
    print(f"  add() only (queued, not waited for)     {us(queued)}")
    print(f"  add() + wait()      (sync, committed)   {us(blocking)}")
    print(f"  add() + committed() (async, committed)  {us(awaited)}")
    print(f"  durable-commit overhead (median)        sync {(statistics.median(blocking) - statistics.median(queued)) * 1e6:+.1f} us,"
          f" async {(statistics.median(awaited) - statistics.median(queued)) * 1e6:+.1f} us")


def concurrent(history: History, tasks: int, seconds: float = 3.0) -> None:
    commits = [0]
    inner = history._inserted            # bench-only peek: count commits

    def counting(exc):
        commits[0] += 1
        inner(exc)
    history._inserted = counting

    async def run() -> int:
        done = [0]
        until = time.perf_counter() + seconds

        async def one() -> None:
            while time.perf_counter() < until:
                await history.committed(history.add(record()))
                done[0] += 1
        await asyncio.gather(*(one() for _ in range(tasks)))
        return done[0]
    t = time.perf_counter()
    rows = asyncio.run(run())
    took = time.perf_counter() - t
    history._inserted = inner
    print(f"{tasks} tasks adding a row and awaiting its commit, {seconds:.0f} s")
    print(f"  {rows / took:,.0f} rows/s committed, {rows / max(1, commits[0]):.0f} rows per commit "
          f"({commits[0]} commits)")


def journal(tmp: Path, rows: int) -> None:
    j = SpillJournal(tmp / "bench-spill.jsonl")
    times = []
    for _ in range(rows):
        row = record().__dict__
        t = time.perf_counter()
        j.append([row])
        times.append(time.perf_counter() - t)
    j.close()
    print(f"spill journal, one row per append, n={rows}")
    print(f"  append()  {us(times)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--concurrent", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "bench.db")
        history = History(db)
        sequential(history, args.rows)
        concurrent(history, args.concurrent)
        journal(Path(tmp), args.rows)
        db.close()


if __name__ == "__main__":
    main()
