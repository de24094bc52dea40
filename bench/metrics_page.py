"""The Metrics page in a real browser, over 20,000 requests: time to usable, and to charts.

    python bench/metrics_page.py [--rows 20000] [--days 30] [--visits 3] [--click mouse|locator]

Fills a fresh SQLite file with core.demo.fill_history, starts `streamlit run` on it (the way
the browser tests do, tests/browser.py) and drives Debian's Chromium at 1280x800, range
"Last 7 days". Three ways to arrive, each timed --visits times:

  cold     the /metrics URL in a new browser context: empty HTTP cache, new app session
  warm     the /metrics URL in a new tab of a context that has seen the page (HTTP cache warm)
  in-app   a click on "Metrics" in the sidebar of the Generate page (warm cache), the way
           people go there; timed from the click

For each visit it prints, from navigation (or the click):
  headline  all nine headline numbers and the range filter drawn
  usable    ... and the page answers: a click on the range filter's chosen option, made at
            the headline's spot as a person's would be (mouse events sent to the browser,
            no Playwright waits before them), has reached the page's handler; a busy main
            thread delays it. The click picks what is already picked: nothing reruns.
            (--click locator: Playwright's locator click instead, timed until it returns;
            its selector and stability checks cost 0.1-0.4 s of round trips of their own
            when the machine is busy. This was the bench's definition before 2026-12-03.)
  chart     the first chart drawn;  all  every chart of the open tab drawn, page idle
  freeze    the longest main-thread task after the headline (a click then waits that long)

Each cold and warm visit is followed by the same kind of visit to an empty Streamlit page
(one st.metric, the app's config): Streamlit's own boot in this browser at that moment, the
floor under any page. Goal: usable within 2 s. The load average is printed with each line;
on this shared machine the figures scale with it, and with what the other processes are
doing at that second, hence the empty page beside each visit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.db import Database  # noqa: E402
from core.demo import fill_history  # noqa: E402
from tests.browser import chromium, streamlit_app  # noqa: E402

GOAL_S = 2.0
HEADLINE_COUNT = 9
VIEWPORT = {"width": 1280, "height": 800}
# Marks (ms from the document's time origin) set by the page itself as things appear.
MARKS = """
window.__t = {}; window.__long = [];
const mark = (k) => { if (!(k in window.__t)) window.__t[k] = performance.now(); };
const check = () => {
  const heads = document.querySelectorAll('[data-testid="stMetricValue"]').length;
  const range = document.querySelector('.st-key-metrics_range input[type=radio]');
  if (heads >= %d && range && !('headline' in window.__t)) {
    // Where a person would click: the centre of the chosen range option, as drawn now.
    const option = [...document.querySelectorAll('.st-key-metrics_range label')]
      .find(l => l.innerText.includes('Last 7 days'));
    if (option) { const r = option.getBoundingClientRect(); window.__box = [r.x + r.width / 2, r.y + r.height / 2]; }
    mark('headline');
  }
  if (document.querySelector('[data-testid="stMetricValue"]') && !range) mark('metric');  // empty page
  if (!('headline' in window.__t)) return;
  const boxes = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
  const charts = boxes.length, drawn = boxes.filter(e => e.querySelector('.main-svg')).length;
  if (drawn) mark('chart');
  if (!charts || drawn < charts) return;
  const app = document.querySelector('[data-testid="stApp"]');
  const idle = app && app.getAttribute('data-test-script-state') === 'notRunning';
  // textContent, not innerText: no layout forced on the page being measured.
  const waiting = document.body.textContent.includes('Drawing the charts');
  if (idle && !waiting) mark('all');
};
// Checked once per frame after a change (as the frame is drawn), not on every mutation: the
// check itself would otherwise take main-thread time from the page it measures.
let queued = false;
new MutationObserver(() => {
  if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; check(); }); }
}).observe(document, {subtree: true, childList: true, attributes: true});
// The page answered a click on the range filter (one that landed anywhere else does not count).
document.addEventListener('mousedown', (e) => {
  if (e.target.closest && e.target.closest('.st-key-metrics_range')) mark('input');
}, true);
try {
  new PerformanceObserver(l => { for (const e of l.getEntries()) window.__long.push([e.startTime, e.duration]); })
    .observe({type: 'longtask', buffered: true});
} catch (e) {}
""" % HEADLINE_COUNT


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def measure(page, since_ms: float, wall0: float, click: str) -> dict[str, float]:
    """Wait for the page's marks after an arrival that started at ``since_ms`` (page clock)."""
    box = page.wait_for_function("'headline' in window.__t && window.__box", timeout=120_000,
                                 polling=10).json_value()
    if click == "mouse":
        page.mouse.click(*box)
        page.wait_for_function("'input' in window.__t", timeout=120_000, polling=10)
        usable = None
    else:
        page.locator(".st-key-metrics_range label").filter(has_text="Last 7 days").click(timeout=120_000)
        usable = time.perf_counter() - wall0
    page.wait_for_function("'all' in window.__t", timeout=120_000, polling=20)
    t = page.evaluate("window.__t")
    if usable is None:
        usable = (t["input"] - since_ms) / 1000
    longest = page.evaluate("(h) => Math.max(0, ...window.__long.filter(([s, d]) => s + d > h)"
                            ".map(([s, d]) => d))", t["headline"])
    return {"headline": (t["headline"] - since_ms) / 1000, "usable": usable,
            "chart": (t["chart"] - since_ms) / 1000, "all": (t["all"] - since_ms) / 1000,
            "freeze": longest / 1000}


def by_url(context, url: str, click: str) -> dict[str, float]:
    page = context.new_page()
    wall0 = time.perf_counter()
    page.goto(url + "/metrics", wait_until="commit")
    out = measure(page, 0.0, wall0, click)
    page.close()
    return out


def in_app(context, url: str, click: str) -> dict[str, float]:
    page = context.new_page()
    page.goto(url, wait_until="commit")
    page.locator(".st-key-go button").wait_for(timeout=120_000)
    page.wait_for_function("!document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=120_000)
    page.wait_for_timeout(500)
    link = page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Metrics")
    since = page.evaluate("window.__t = {}; window.__long = []; performance.now()")
    wall0 = time.perf_counter()
    link.click()
    out = measure(page, since, wall0, click)
    page.close()
    return out


def empty_visit(context, url: str) -> float:
    """Seconds to the empty page's one metric."""
    page = context.new_page()
    wall0 = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.locator('[data-testid="stMetricValue"]').wait_for(timeout=120_000)
    took = time.perf_counter() - wall0
    page.close()
    return took


def show(kind: str, r: dict[str, float], empty: float | None) -> None:
    floor = f"   empty page {empty:5.2f} s" if empty is not None else " " * 22
    print(f"  {kind:<10} headline {r['headline']:5.2f} s  usable {r['usable']:5.2f} s  "
          f"chart {r['chart']:5.2f} s  all {r['all']:5.2f} s  freeze {r['freeze']:4.2f} s{floor}   "
          f"load {load()}")


def summary(kind: str, rows: list[dict[str, float]], empty: list[float]) -> str:
    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)
    floor = f"   empty page {statistics.median(empty):5.2f} s" if empty else ""
    return (f"  {kind:<10} usable {med('usable'):5.2f} s (max {max(r['usable'] for r in rows):.2f})   "
            f"headline {med('headline'):5.2f} s   first chart {med('chart'):5.2f} s   "
            f"all charts {med('all'):5.2f} s   freeze {med('freeze'):.2f} s{floor}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--visits", type=int, default=3, help="visits of each kind")
    ap.add_argument("--click", choices=("mouse", "locator"), default="mouse",
                    help="how 'usable' clicks: mouse events at the option's spot (default), or "
                         "Playwright's locator click (the definition before 2026-12-03)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db = Database(tmp / "app.db")
        t = time.perf_counter()
        fill_history(db, rows=args.rows, days=args.days)
        db.close()
        empty_script = tmp / "empty" / "empty_page.py"
        empty_script.parent.mkdir()
        empty_script.write_text("import streamlit as st\n\nst.metric('Requests', '1')\n")
        print(f"Metrics page bench: {args.rows:,} requests over {args.days} days "
              f"(written in {time.perf_counter() - t:.1f} s); Chromium 1280x800; range 'Last 7 days'; click: {args.click}; "
              f"load average at start {load()} on {os.cpu_count()} cores")
        print("Each Metrics visit is followed by the same kind of visit to an empty Streamlit page "
              "(one st.metric, same config): Streamlit's own boot at that moment.")
        results: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "in-app": []}
        empties: dict[str, list[float]] = {"cold": [], "warm": [], "in-app": []}
        with chromium() as browser, streamlit_app(tmp) as url, \
                streamlit_app(empty_script.parent, script=empty_script) as empty_url:
            warm = warm_empty = None
            for i in range(args.visits):
                context, context_empty = browser.new_context(viewport=VIEWPORT), browser.new_context(viewport=VIEWPORT)
                context.add_init_script(MARKS)
                results["cold"].append(by_url(context, url, args.click))
                empties["cold"].append(empty_visit(context_empty, empty_url))
                show("cold" + (" (1st)" if i == 0 else ""), results["cold"][-1], empties["cold"][-1])
                if i == 0:
                    warm, warm_empty = context, context_empty     # their caches are warm now
                else:
                    context.close()
                    context_empty.close()
            for _ in range(args.visits):
                results["warm"].append(by_url(warm, url, args.click))
                empties["warm"].append(empty_visit(warm_empty, empty_url))
                show("warm", results["warm"][-1], empties["warm"][-1])
            for _ in range(args.visits):
                results["in-app"].append(in_app(warm, url, args.click))
                show("in-app", results["in-app"][-1], None)
    print("medians:")
    for kind, rows in results.items():
        print(summary(kind, rows, empties[kind]))
    print(f"load average (1, 5, 15 min) at the end: {load()} on {os.cpu_count()} cores")
    for kind, rows in results.items():
        worst = max(r["usable"] for r in rows)
        print(f"goal (usable within {GOAL_S:.0f} s), {kind}: {'MET' if worst <= GOAL_S else 'NOT MET'} "
              f"(worst {worst:.2f} s)")


if __name__ == "__main__":
    main()
