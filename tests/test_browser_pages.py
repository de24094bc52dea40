"""Every page in a real Chromium, as its people see it: screenshots at 1280x800 and
1920x1080 (saved under tmp/artifacts/), no exception box, no headline number cut off; the
Metrics page in a zone far from UTC; a rehearsal outage that counts down and is confirmed.

One app server for the module (the built-in simulator, with demo history), one browser."""

from __future__ import annotations

import csv
import datetime as dt
import re
import sqlite3
from pathlib import Path

import pytest

from core.db import Database
from core.demo import fill_history
from tests.browser import ROOT, chromium, needs_chromium, streamlit_app, wait_idle

pytestmark = needs_chromium
ARTIFACTS = ROOT / "tmp" / "artifacts"
SIZES = ((1280, 800), (1920, 1080))
READY = {   # what shows that a page has drawn its content
    "generate": '.st-key-go button',
    "metrics": '[data-testid="stPlotlyChart"] .main-svg',
    "settings": '[data-testid="stTab"]',
}
# Text cut off in its box: wider content than the box (ellipsis or hidden overflow).
CUT_OFF = """() => [...document.querySelectorAll(
    '[data-testid="stMetricValue"], [data-testid="stMetricValue"] *, [data-testid="stMetricLabel"] *, '
    + '[data-testid^="stBaseButton"] *')]
    .filter(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
    .map(e => e.innerText.trim()).filter(t => t)"""


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    db = Database(tmp / "app.db")
    fill_history(db, rows=3000, days=30)
    db.close()
    return tmp


@pytest.fixture(scope="module")
def url(app_dir):
    with streamlit_app(app_dir, GYROSCOPE_SIM_TTFT_MS="0", GYROSCOPE_SIM_TOKENS_PER_S="0") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def visit(browser, url: str, page_name: str, width: int = 1280, height: int = 800, **context):
    page = browser.new_context(viewport={"width": width, "height": height}, **context).new_page()
    page.goto(f"{url}/{'' if page_name == 'generate' else page_name}", wait_until="domcontentloaded")
    page.wait_for_selector(READY[page_name], state="visible", timeout=60_000)
    wait_idle(page, 60_000)
    # Elements whose component is still loading show as grey skeletons: wait them out.
    page.wait_for_function("!document.querySelector('[data-testid=\"stSkeleton\"], "
                           "[data-testid=\"stSkeletonElement\"]')", timeout=60_000)
    return page


@pytest.mark.parametrize("width,height", SIZES)
def test_every_page_looks_right(browser, url, width, height):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name in READY:
        page = visit(browser, url, name, width, height)
        if name == "metrics":
            page.wait_for_function("document.querySelectorAll('[data-testid=\"stMetricValue\"]').length >= 9")
        if name == "generate":    # the page as a writer sees it after an answer
            page.get_by_label("Prompt", exact=True).fill(f"A short welcome note for a pottery class of {width} people")
            page.locator(".st-key-go button").click()
            page.get_by_text(re.compile(r"· first try$")).first.wait_for(timeout=60_000)
            wait_idle(page, 60_000)
        page.wait_for_timeout(300)       # let the last chart finish its layout before the picture
        shot = ARTIFACTS / f"{name}-{width}x{height}.png"
        page.screenshot(path=str(shot))                       # what the screen shows
        assert shot.stat().st_size > 10_000
        exceptions = page.locator('[data-testid="stException"]')
        assert exceptions.count() == 0, f"{name}: {exceptions.first.inner_text()}"
        cut = page.evaluate(CUT_OFF)
        assert cut == [], f"{name} at {width}x{height}: text cut off: {cut}"
        # The whole page too: the app scrolls inside its main section, so grow the window to it.
        tall = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
        page.set_viewport_size({"width": width, "height": min(max(tall, height), 6000)})
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / f"{name}-{width}x{height}-whole.png"))
        page.context.close()


def test_metrics_uses_the_browsers_zone_far_from_utc(browser, url):
    from playwright.sync_api import expect

    page = visit(browser, url, "metrics", timezone_id="Pacific/Kiritimati")
    expect(page.get_by_text(re.compile(r"\(Pacific/Kiritimati\), by day\."))).to_be_visible()
    assert "combobox \"Time zone (days are days here)\": Pacific/Kiritimati" in \
        page.locator(".st-key-metrics_tz").aria_snapshot()
    page.context.close()


def test_a_rehearsal_outage_is_confirmed_and_counts_down(browser, url):
    from playwright.sync_api import expect

    page = visit(browser, url, "settings")
    page.get_by_role("tab", name="Outage rehearsal").click()
    page.get_by_role("button", name="Start outage").click()
    expect(page.locator('[data-testid="stToast"]').filter(has_text="Every request gets 503 for 60 s.")) \
        .to_be_visible(timeout=15_000)
    countdown = page.get_by_text(re.compile(r"Full outage running: \d+ s left"))
    expect(countdown).to_be_visible(timeout=15_000)
    first = int(re.search(r"(\d+) s left", countdown.inner_text()).group(1))
    # The fragment redraws every second: the number goes down without touching the page.
    expect(countdown).not_to_contain_text(f"{first} s left", timeout=10_000)
    later = int(re.search(r"(\d+) s left", countdown.inner_text()).group(1))
    assert 0 < later < first <= 60
    page.get_by_role("button", name="Clear all faults").click()
    expect(page.get_by_text("No outage running")).to_be_visible(timeout=15_000)
    page.context.close()


def test_the_requests_csv_downloads_in_the_viewers_zone_with_money_rounded(browser, url, app_dir):
    """The requests CSV as a manager gets it: clicked in the page, saved by the browser."""
    from playwright.sync_api import expect

    page = visit(browser, url, "metrics", timezone_id="Pacific/Kiritimati")
    page.get_by_text("Technical details").click()          # the page's exact range, to count rows
    command = page.locator('[data-testid="stCode"]').filter(has_text="python -m core stats")
    expect(command).to_be_visible(timeout=30_000)
    since, until = re.search(r"--since (\S+) --until (\S+)", command.inner_text()).groups()
    start, end = dt.datetime.fromisoformat(since), dt.datetime.fromisoformat(until)
    assert start.utcoffset() == end.utcoffset() == dt.timedelta(hours=14)
    requests_shown = int(page.locator('[data-testid="stMetric"]').filter(has_text="Requests").first
                         .locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))
    wait_idle(page, 60_000)
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name=re.compile(r"^Requests \(CSV, newest ")).click()
    saved = Path(download.value.path())
    assert download.value.suggested_filename.startswith("gyroscope-requests-")
    rows = list(csv.DictReader(saved.read_text(encoding="utf-8").splitlines()))

    with sqlite3.connect(app_dir / "app.db") as conn:
        conn.row_factory = sqlite3.Row
        stored = {r["request_id"]: r for r in conn.execute(
            "SELECT request_id, ts, cost, cost_saved FROM requests WHERE ts >= ? AND ts < ?",
            (start.timestamp(), end.timestamp()))}
    assert len(rows) == len(stored) == requests_shown > 100          # every request of the range
    for row in rows:
        db = stored[row["request_id"]]
        ts = dt.datetime.fromisoformat(row["ts"])
        assert row["ts"].endswith("+14:00") and ts.utcoffset() == dt.timedelta(hours=14)
        assert abs(ts.timestamp() - db["ts"]) < 0.001 and start <= ts < end
        for col in ("cost", "cost_saved"):
            if db[col] is None:
                assert row[col] == ""
            else:
                assert re.fullmatch(r"\d+\.\d{6}", row[col]), row[col]       # no 5.4e-05, no ...0000001
                assert abs(float(row[col]) - db[col]) <= 5e-7 + 1e-12    # rounded to a millionth
    page.context.close()
