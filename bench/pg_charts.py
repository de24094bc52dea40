"""The Metrics page's queries on the PostgreSQL history (core/storage/pg_history.py).

    python bench/pg_charts.py [--rows 200000] [--runs 5] [--url postgresql://...]

Creates a fresh database on the server (the machine's 127.0.0.1:5432 by default, or --url to
its maintenance database), fills it with core.demo.fill_history (the rows inside the 30-day
window the page shows by default: the worst case), times every query the page runs for that
window (core.charts.page_queries) and prints each one's median over --runs runs and their
total, then drops the database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from core.charts import page_queries  # noqa: E402
from core.demo import fill_history  # noqa: E402
from core.history import Filters  # noqa: E402
from core.storage.pg_history import PgHistory, _pct, _sum  # noqa: E402
from core.storage.postgres import PgDatabase  # noqa: E402

END = dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc).timestamp()
WINDOW_DAYS = 30
TZ = "Europe/Berlin"
PAGE = ("totals", "series", "daily_cost_by_model", "errors_by_kind", "events")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--url", default=os.environ.get("GYROSCOPE_TEST_PG",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    name = f"gyro_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = args.url.rsplit("/", 1)[0] + "/" + name
    db = PgDatabase(url)
    try:
        began = time.perf_counter()
        fill_history(db, rows=args.rows, days=WINDOW_DAYS, end=END, chunk=20_000)
        db.write(lambda conn: conn.execute("ANALYZE requests"))
        print(f"PostgreSQL history: {args.rows:,} rows in the last {WINDOW_DAYS} days, filled in "
              f"{time.perf_counter() - began:.0f} s; median of {args.runs} runs; load {os.getloadavg()[0]:.2f}")
        history = PgHistory(db, Path(f"/tmp/{name}-spill.jsonl"))
        filters = Filters(END - WINDOW_DAYS * 86400, END, tz=TZ)
        queries = dict(page_queries(history, filters, "day"))
        queries["series (hourly)"] = lambda: history.series(filters, "hour", by_model=False)
        # What an hourly rollup could serve (the sums) and what it could not (exact percentiles
        # over the raw rows), for the daily series the page draws.
        sums = ", ".join(_sum(n) for n in ("requests", "ok", "cached", "prompt_tokens", "cost"))
        pcts = ", ".join((_pct(50, alias="p50"), _pct(95, alias="p95"), _pct(50, "ttft_ms", "t50")))
        queries["  series: its sums alone"] = lambda: history._grouped(filters, "day", False, sums)
        queries["  series: its percentiles alone"] = lambda: history._grouped(filters, "day", False, pcts)
        total = 0.0
        for label, query in queries.items():
            query()
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                query()
                times.append((time.perf_counter() - t0) * 1000)
            med = statistics.median(times)
            total += med if label in PAGE else 0.0
            print(f"    {label:28} {med:8.1f} ms   (min {min(times):.1f}, max {max(times):.1f})")
        print(f"    {'total (the page, daily)':28} {total:8.1f} ms")
    finally:
        db.close()
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
