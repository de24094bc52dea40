"""The Metrics page in a real browser, over 20,000 requests: time to usable, and to charts.

    python bench/metrics_page.py [--rows 20000] [--days 30] [--visits 3]
                                 [--driver cdp|playwright] [--click mouse|locator]

Fills a fresh SQLite file with core.demo.fill_history, starts `streamlit run` on it (the way
the browser tests do, tests/browser.py) and opens Debian's Chromium at 1280x800, range
"Last 7 days". Three ways to arrive, each timed --visits times:

  cold     the /metrics URL in a new browser context: empty HTTP cache, new app session
  warm     the /metrics URL in a new tab of a context that has seen the page (HTTP cache warm)
  in-app   a click on "Metrics" in the sidebar of the Generate page (warm cache), the way
           people go there; timed from the click

For each visit it prints, from navigation (or the click):
  headline  all nine headline numbers and the range filter drawn
  usable    ... and the page answers: a click on the range filter's chosen option, made at
            the headline's spot as a person's would be (mouse events sent to the browser,
            no waits before them), has reached the page's handler; a busy main thread
            delays it. The click picks what is already picked: nothing reruns.
            (--click locator: Playwright's locator click instead, timed until it returns;
            its selector and stability checks cost 0.1-0.4 s of round trips of their own
            when the machine is busy. This was the bench's definition before 2026-12-03.)
  chart     the first chart drawn;  all  every chart of the open tab drawn, page idle
  freeze    the longest main-thread task after the headline (a click then waits that long)

The page marks these itself (a script run in each document, MARKS below); the bench only
waits for the marks. --driver cdp (the default) drives Chromium over the DevTools protocol
with nothing else attached (bench/_cdp.py). --driver playwright drives it with Playwright,
whose bookkeeping of every request and frame is work a person's browser does not do: on this
2-core machine a cold visit is CPU-bound, and that cost it ~0.4 s. Both drivers make the
same visits with the same marks and mouse clicks. (Until the fourth round of
docs/benchmarks.md the bench used Playwright only, timed the empty page and the in-app click
with Playwright's locators, and polled the marks every 10 ms: its earlier figures for those
two are not comparable with either driver now.)

Each cold and warm visit is followed by the same kind of visit to an empty Streamlit page
(one st.metric, the app's config): Streamlit's own boot in this browser at that moment, the
floor under any page. Goal: usable within 2 s. The load average is printed with each line;
on this shared machine the figures scale with it, and with what the other processes are
doing at that second, hence the empty page beside each visit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.db import Database  # noqa: E402
from core.demo import fill_history  # noqa: E402
from bench._cdp import bare_chromium  # noqa: E402
from tests.browser import CHROMIUM_ARGS, chromium, streamlit_app  # noqa: E402

GOAL_S = 2.0
HEADLINE_COUNT = 9
VIEWPORT = {"width": 1280, "height": 800}
# Marks (ms from the document's time origin) set by the page itself as things appear;
# window.__when(name) is a promise of a mark (rejected after two minutes), so the bench waits
# without asking the page again and again.
MARKS = """
window.__t = {}; window.__long = [];
const waiting = {};
const mark = (k) => {
  if (k in window.__t) return;
  window.__t[k] = performance.now();
  for (const resolve of waiting[k] || []) resolve(window.__t[k]);
  delete waiting[k];
};
window.__when = (k) => new Promise((resolve, reject) => {
  if (k in window.__t) return resolve(window.__t[k]);
  (waiting[k] = waiting[k] || []).push(resolve);
  setTimeout(() => reject(new Error('no ' + k + ' mark in 120 s')), 120000);
});
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
# Outside the timed part only (getting the in-app visit ready): poll a condition every 50 ms.
UNTIL = """new Promise((resolve, reject) => { const t0 = performance.now(); const f = () => {
  const v = (%s); if (v) resolve(v);
  else if (performance.now() - t0 > 120000) reject(new Error('timed out')); else setTimeout(f, 50); };
  f(); })"""
SIDEBAR_METRICS = """(() => { const a = [...document.querySelectorAll('[data-testid="stSidebarNav"] a')]
  .find(a => a.textContent.includes('Metrics')); if (!a) return null;
  const r = a.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"""


class PlaywrightPage:
    """A Playwright page with the few calls the bench makes (bench/_cdp.py's Page has them too)."""

    def __init__(self, page) -> None:
        self.page = page

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="commit")

    def evaluate(self, expression: str):
        return self.page.evaluate(expression)

    def click(self, x: float, y: float) -> None:
        self.page.mouse.click(x, y)

    def close(self) -> None:
        self.page.close()


class PlaywrightContext:
    def __init__(self, context) -> None:
        self.context = context

    def add_init_script(self, source: str) -> None:
        self.context.add_init_script(source)

    def new_page(self) -> PlaywrightPage:
        return PlaywrightPage(self.context.new_page())

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def browser_for(driver: str):
    """A function making fresh browser contexts (empty cache, 1280x800), with the driver asked for."""
    if driver == "cdp":
        with bare_chromium(CHROMIUM_ARGS) as browser:
            yield lambda: browser.new_context(VIEWPORT["width"], VIEWPORT["height"])
    else:
        with chromium() as browser:
            yield lambda: PlaywrightContext(browser.new_context(viewport=VIEWPORT))


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def measure(page, since_ms: float, wall0: float, click: str) -> dict[str, float]:
    """Wait for the page's marks after an arrival that started at ``since_ms`` (page clock)."""
    box = page.evaluate("window.__when('headline').then(() => window.__box)")
    if click == "mouse":
        page.click(*box)
        page.evaluate("window.__when('input')")
        usable = None
    else:
        page.page.locator(".st-key-metrics_range label").filter(has_text="Last 7 days").click(timeout=120_000)
        usable = time.perf_counter() - wall0
    page.evaluate("window.__when('all')")
    t = page.evaluate("window.__t")
    if usable is None:
        usable = (t["input"] - since_ms) / 1000
    longest = page.evaluate("Math.max(0, ...window.__long.filter(([s, d]) => s + d > %f).map(([s, d]) => d))"
                            % t["headline"])
    return {"headline": (t["headline"] - since_ms) / 1000, "usable": usable,
            "chart": (t["chart"] - since_ms) / 1000, "all": (t["all"] - since_ms) / 1000,
            "freeze": longest / 1000}


def by_url(context, url: str, click: str) -> dict[str, float]:
    page = context.new_page()
    wall0 = time.perf_counter()
    page.goto(url + "/metrics")
    out = measure(page, 0.0, wall0, click)
    page.close()
    return out


def in_app(context, url: str, click: str) -> dict[str, float]:
    """From a click on "Metrics" in the Generate page's sidebar (mouse events at the link)."""
    page = context.new_page()
    page.goto(url + "/")
    page.evaluate(UNTIL % ("document.querySelector('.st-key-go button') && "
                           "!document.querySelector('[data-testid=\"stSkeleton\"]')"))
    time.sleep(0.5)
    link = page.evaluate(UNTIL % SIDEBAR_METRICS)
    since = page.evaluate("window.__t = {}; window.__long = []; performance.now()")
    wall0 = time.perf_counter()
    page.click(*link)
    out = measure(page, since, wall0, click)
    page.close()
    return out


def empty_visit(context, url: str) -> float:
    """Seconds from navigation to the empty page's one metric (its own mark, as above)."""
    page = context.new_page()
    page.goto(url + "/")
    took = page.evaluate("window.__when('metric')") / 1000
    page.close()
    return took


def show(kind: str, r: dict[str, float], empty: float | None) -> None:
    floor = f"   empty page {empty:5.2f} s" if empty is not None else " " * 22
    print(f"  {kind:<10} headline {r['headline']:5.2f} s  usable {r['usable']:5.2f} s  "
          f"chart {r['chart']:5.2f} s  all {r['all']:5.2f} s  freeze {r['freeze']:4.2f} s{floor}   "
          f"load {load()}", flush=True)


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
    ap.add_argument("--driver", choices=("cdp", "playwright"), default="cdp",
                    help="how Chromium is driven: over the DevTools protocol with nothing but the "
                         "timing attached (default), or by Playwright, whose own bookkeeping of "
                         "each page costs a cold visit ~0.4 s here (the same visits, marks and clicks; "
                         "before 2026-12-03 the bench was Playwright's only)")
    ap.add_argument("--click", choices=("mouse", "locator"), default="mouse",
                    help="how 'usable' clicks: mouse events at the option's spot (default), or "
                         "Playwright's locator click (the definition before 2026-12-03; "
                         "needs --driver playwright)")
    args = ap.parse_args()
    if args.click == "locator" and args.driver != "playwright":
        ap.error("--click locator is Playwright's: add --driver playwright")
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
              f"(written in {time.perf_counter() - t:.1f} s); Chromium 1280x800 driven by {args.driver}; "
              f"range 'Last 7 days'; click: {args.click}; load average at start {load()} on {os.cpu_count()} cores")
        print("Each Metrics visit is followed by the same kind of visit to an empty Streamlit page "
              "(one st.metric, same config): Streamlit's own boot at that moment.")
        results: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "in-app": []}
        empties: dict[str, list[float]] = {"cold": [], "warm": [], "in-app": []}
        with browser_for(args.driver) as new_context, streamlit_app(tmp) as url, \
                streamlit_app(empty_script.parent, script=empty_script) as empty_url:
            warm = warm_empty = None
            for i in range(args.visits):
                context, context_empty = new_context(), new_context()
                context.add_init_script(MARKS)
                context_empty.add_init_script(MARKS)
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
