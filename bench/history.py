"""The Metrics page's queries over a million requests.

    python bench/history.py [--rows 1000000] [--runs 5] [--keep DIR]

Builds two SQLite files with core.demo.fill_history: the rows spread over 365 days, and the
worst case, all of them inside the 30-day window. For each, times every query the page runs
for the last 30 days (core.charts.page_queries, plus the model/source pickers), prints each
one's median over --runs runs and their total, and checks the budget: under 1 s in total,
daily cost by model under 300 ms. Then runs the queries once more under tracemalloc to show
the peak Python memory: the page never loads the rows. --keep DIR keeps (and reuses) the files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.charts import page_queries  # noqa: E402
from core.db import Database  # noqa: E402
from core.demo import fill_history  # noqa: E402
from core.history import Filters, History  # noqa: E402

END = dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc).timestamp()
WINDOW_DAYS = 30
TZ = "Europe/Berlin"
BUDGET_TOTAL_MS, BUDGET_DAILY_MS = 1000.0, 300.0


def build(path: Path, rows: int, days: int) -> Database:
    """The file with ``rows`` synthetic requests over ``days`` days before END (reused if there)."""
    db = Database(path)
    have = db.query_one("SELECT count(*) AS n FROM requests")["n"]
    if have == rows:
        print(f"  reusing {path} ({rows:,} rows)")
        return db
    if have:
        raise SystemExit(f"{path} holds {have:,} rows, not {rows:,}; remove it or pick another --keep")
    began = time.perf_counter()
    fill_history(db, rows=rows, days=days, end=END, chunk=50_000)
    history = History(db)
    # Breaker transitions every ~3 days, so the events query has something to read.
    for i, t in enumerate(range(int(END - days * 86400), int(END), 3 * 86400)):
        name = f"simulator|gpt-4o{'-mini' if i % 2 else ''}"
        history.event("breaker", name, "closed", "open", "5 consecutive failures (last: server_error)", ts=t)
        history.event("breaker", name, "open", "half-open", "reset timeout elapsed; probing", ts=t + 30)
        history.event("breaker", name, "half-open", "closed", "1 successful probe(s)", ts=t + 31)
    db.flush()
    print(f"  built {path.name}: {rows:,} rows over {days} days in {time.perf_counter() - began:.0f} s")
    return db


def measure(db: Database, runs: int) -> None:
    history = History(db)
    filters = Filters(END - WINDOW_DAYS * 86400, END, tz=TZ)
    queries = dict(page_queries(history, filters, "day"))
    queries["pickers (models, sources)"] = lambda: (history.distinct("model"), history.distinct("source"))
    in_window = history.totals(filters)["total_requests"]
    print(f"  {in_window:,} requests in the {WINDOW_DAYS}-day window ({TZ}, daily buckets)")
    medians = {}
    for name, query in queries.items():
        query()   # warm: page cache, first-use registrations
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            query()
            times.append((time.perf_counter() - began) * 1000)
        medians[name] = statistics.median(times)
        print(f"    {name:28} {medians[name]:8.1f} ms   (min {min(times):.1f}, max {max(times):.1f})")
    total = sum(medians.values())
    ok_total, ok_daily = total < BUDGET_TOTAL_MS, medians["daily_cost_by_model"] < BUDGET_DAILY_MS
    print(f"    {'total':28} {total:8.1f} ms   budget {BUDGET_TOTAL_MS:.0f} ms: {'PASS' if ok_total else 'FAIL'}; "
          f"daily cost by model {BUDGET_DAILY_MS:.0f} ms: {'PASS' if ok_daily else 'FAIL'}")
    gc.collect()
    tracemalloc.start()
    for query in queries.values():
        query()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    sample = list(history.rows(filters, limit=10_000))   # what loading the rows would cost
    per_row = tracemalloc.get_traced_memory()[1] / max(1, len(sample))
    tracemalloc.stop()
    print(f"    peak Python memory during the page's queries: {peak / 2**20:.1f} MiB "
          f"(loading the window's {in_window:,} rows as dicts: ~{in_window * per_row / 2**20:,.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="directory to keep and reuse the built files in")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="gyroscope-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Metrics page queries, {args.rows:,} rows, median of {args.runs} runs, Python {sys.version.split()[0]}")
    for label, days in (("spread over 365 days", 365), (f"worst case: all in the last {WINDOW_DAYS} days", WINDOW_DAYS)):
        print(f"\n{label}")
        db = build(folder / f"history-{args.rows}-{days}d.db", args.rows, days)
        try:
            measure(db, args.runs)
        finally:
            db.close()
    if not args.keep:
        for path in folder.glob("*"):
            path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
