"""Response cache: hit lookup speed at 100,000 entries, and what a realistic workload saves.

    python bench/cache.py [--entries 100000] [--requests 1000] [--distinct 400]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cache import ResponseCache, cache_key  # noqa: E402
from core.config import Config  # noqa: E402
from core.db import Database  # noqa: E402
from core.models import GenerationRequest  # noqa: E402
from core.providers.simulator_provider import SimulatorProvider  # noqa: E402
from core.service import Gyroscope  # noqa: E402
from core.settings import SettingsStore  # noqa: E402
from core.simulator import Simulator, start_in_background  # noqa: E402

TOPICS = ["bakery", "yoga studio", "bike shop", "dentist", "bookshop", "coffee roaster", "law firm",
          "plant nursery", "music school", "coworking space"]
TASKS = ["Write a tagline for a {t}.", "Draft a welcome email for new customers of a {t}.",
         "List five blog post ideas for a {t}.", "Write a short Instagram caption for a {t} sale.",
         "Summarise why people choose a local {t} in three sentences."]


def lookup_speed(entries: int, tmp: Path) -> None:
    db = Database(tmp / "lookup.db")
    settings = SettingsStore(db)
    settings.set("cache.max_entries", max(entries, 1))
    cache = ResponseCache(db, settings)
    now = time.time()
    keys = [cache_key(provider="simulator", base_url="simulator", model="gpt-4o-mini",
                      messages=[{"role": "user", "content": f"prompt {i}"}], max_tokens=256)
            for i in range(entries)]
    body = "A plausible answer of a few sentences. " * 12
    rows = [(k, now, now, 0, "simulator", "gpt-4o-mini", body, "stop", 20, 120, 0.0001, len(body))
            for k in keys]
    db.write(lambda conn: conn.executemany(
        "INSERT INTO cache (key, created_at, last_used_at, hits, provider, model, content, "
        "finish_reason, prompt_tokens, completion_tokens, cost, bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        rows), timeout=None)
    rng = random.Random(1)
    sample = [rng.choice(keys) for _ in range(5000)]
    for k in sample[:500]:
        cache.get(k)
    times = []
    for k in sample:
        t = time.perf_counter()
        hit = cache.get(k)
        times.append(time.perf_counter() - t)
        assert hit is not None
    miss = []
    for i in range(2000):
        t = time.perf_counter()
        cache.get(f"missing-{i}")
        miss.append(time.perf_counter() - t)
    db.flush()
    times.sort()
    print(f"cache hit lookup, {entries:,} entries, {len(times):,} lookups")
    print(f"  hit  p50 {statistics.median(times) * 1000:.4f} ms  p95 {times[int(len(times) * .95)] * 1000:.4f} ms"
          f"  p99 {times[int(len(times) * .99)] * 1000:.4f} ms")
    print(f"  miss p50 {statistics.median(miss) * 1000:.4f} ms")
    db.close()


def prompts(distinct: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < distinct:
        base = TASKS[i % len(TASKS)].format(t=TOPICS[(i // len(TASKS)) % len(TOPICS)])
        variant = i // (len(TASKS) * len(TOPICS))
        text = base if variant == 0 else f"{base} Variant {variant}."
        # Every fifth prompt is the same text as the previous one with different whitespace.
        if len(out) % 5 == 4:
            text = "  " + out[-1].replace(" ", "   ", 2) + "\n"
        out.append(text)
        i += 1
    return out


def workload(requests: int, distinct: int, tmp: Path, normalize: bool) -> None:
    rng = random.Random(7)
    pool = prompts(distinct, rng)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(distinct)]   # Zipf-like popularity
    draws = rng.choices(pool, weights, k=requests)
    running = start_in_background(Simulator())
    gyro = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp / f"work-{normalize}.db"),
                     provider=SimulatorProvider(running))
    gyro.settings.set_many({"cache.normalize_whitespace": normalize}, actor="bench")
    t = time.perf_counter()
    for text in draws:
        gyro.generate(GenerationRequest(prompt=text, max_tokens=200, seed=1, source="bench"))
    elapsed = time.perf_counter() - t
    calls = running.sim.stats()["chat_requests"]
    totals = gyro.history.totals()
    spent, saved = totals["total_cost"], totals["cost_saved"]
    label = "on " if normalize else "off"
    print(f"workload: {requests:,} requests, Zipf over {distinct} prompts (1 in 5 differ only in whitespace),"
          f" whitespace matching {label}")
    print(f"  API calls made {calls:,} of {requests:,}: cache avoided {1 - calls / requests:.1%}"
          f" ({totals['cached_requests']:,} answers from cache)")
    print(f"  spent ${spent:.4f}, saved ${saved:.4f} ({saved / (spent + saved):.1%} of what it would have cost)"
          f"; {elapsed:.1f} s")
    gyro.close()
    running.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--distinct", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        lookup_speed(args.entries, Path(d))
        workload(args.requests, args.distinct, Path(d), normalize=False)
        workload(args.requests, args.distinct, Path(d), normalize=True)


if __name__ == "__main__":
    main()
