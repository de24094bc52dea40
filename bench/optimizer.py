"""Prompt optimizer: token savings on the prompt corpus, protected spans, and speed.

    python bench/optimizer.py [--model gpt-4o-mini] [--sizes 1000000,2000000]

Exits 1 when the goals are missed: at least 10% fewer tokens (mean) on the verbose part of
the corpus, and not one protected span changed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.optimizer import RULES, optimize  # noqa: E402
from tests.data.prompts import CORPUS_FILE, big_prompt, load_corpus  # noqa: E402

GOAL_VERBOSE_MEAN = 0.10


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="count tokens for this model")
    ap.add_argument("--sizes", default="1000000,2000000", help="big-prompt sizes in characters")
    args = ap.parse_args()

    corpus = load_corpus()
    reports, elapsed = [], 0.0
    for rec in corpus:
        start = time.perf_counter()
        reports.append(optimize(rec["prompt"], model=args.model))
        elapsed += time.perf_counter() - start

    def stats(sel):
        ratios = [rep.saved_ratio for rec, rep in zip(corpus, reports) if sel(rec)]
        before = sum(rep.tokens_before for rec, rep in zip(corpus, reports) if sel(rec))
        after = sum(rep.tokens_after for rec, rep in zip(corpus, reports) if sel(rec))
        return len(ratios), statistics.mean(ratios), statistics.median(ratios), before, after

    changed_spans = total_spans = 0
    for rec, rep in zip(corpus, reports):
        for span in rec["protected"]:
            total_spans += 1
            changed_spans += span not in rep.optimized
    idempotent = sum(optimize(rep.optimized, model=args.model).optimized == rep.optimized
                     for rep in reports)
    unchanged = sum(not rep.changed for rep in reports)
    per_rule = {name: sum(rep.rule_savings[name] for rep in reports) for name in RULES}

    print(f"Prompt optimizer bench (tokens: {args.model or 'cl100k_base'}; corpus: "
          f"{CORPUS_FILE.relative_to(ROOT)})")
    print(f"prompts: {len(corpus)} ({sum(r['verbose'] for r in corpus)} verbose, "
          f"{sum(not r['verbose'] for r in corpus)} not)")
    for label, sel in (("verbose", lambda r: r["verbose"]), ("not verbose", lambda r: not r["verbose"]),
                       ("all", lambda r: True)):
        n, mean, median, before, after = stats(sel)
        print(f"  {label:<12} n={n:<3} mean saving {pct(mean):>6}   median {pct(median):>6}   "
              f"tokens {before} -> {after} ({pct((before - after) / before)} overall)")
    print(f"unchanged prompts: {unchanged}/{len(corpus)} ({pct(unchanged / len(corpus))})")
    tight = [rep for rec, rep in zip(corpus, reports) if rec["category"] == "tight"]
    print(f"already-tight prompts unchanged: {sum(not r.changed for r in tight)}/{len(tight)}")
    print(f"protected spans changed: {changed_spans} of {total_spans}")
    print(f"idempotent: {idempotent}/{len(corpus)}")
    print("tokens saved per rule: " + ", ".join(f"{k} {v}" for k, v in per_rule.items()))
    print(f"corpus time: {1000 * elapsed:.0f} ms ({1000 * elapsed / len(corpus):.1f} ms per prompt)")

    timings = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        text = big_prompt(corpus, size)
        start = time.perf_counter()
        rep = optimize(text, model=args.model)
        took = time.perf_counter() - start
        timings.append((size, took))
        print(f"{size / 1e6:.0f} MB prompt: {took:.2f} s ({took / (size / 1e6):.2f} s/MB), "
              f"{rep.tokens_before} -> {rep.tokens_after} tokens ({pct(rep.saved_ratio)})")
    if len(timings) >= 2:
        (s1, t1), (s2, t2) = timings[0], timings[-1]
        print(f"time ratio {s2 // s1}x size: {t2 / t1:.2f}x (linear = {s2 / s1:.2f}x)")

    _, verbose_mean, *_ = stats(lambda r: r["verbose"])
    ok = verbose_mean >= GOAL_VERBOSE_MEAN and changed_spans == 0 and idempotent == len(corpus)
    print(f"goal (>= {pct(GOAL_VERBOSE_MEAN)} on verbose, 0 protected spans changed, idempotent): "
          f"{'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
