"""End to end: `streamlit run` serves the app; a real Chromium types, streams and stops."""

from __future__ import annotations

import shutil
import sqlite3
import time
import urllib.request

import pytest

from tests.browser import CHROMIUM, chromium, streamlit_app, wait_idle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # 5 tokens a second: the answer (~100 tokens) streams for ~20 s, so Stop always lands mid-answer.
    with streamlit_app(tmp, GYROSCOPE_SIM_TTFT_MS="100", GYROSCOPE_SIM_TOKENS_PER_S="5") as url:
        yield {"url": url, "db": tmp / "app.db", "tmp": tmp}


def test_streamlit_run_serves_health_and_the_api(server):
    assert urllib.request.urlopen(server["url"] + "/_stcore/health", timeout=5).read() == b"ok"
    body = urllib.request.urlopen(server["url"] + "/api/health", timeout=5).read()
    assert b'"provider":"simulator"' in body


@pytest.mark.browser
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed")
def test_a_first_visit_straight_to_a_page_gets_the_apps_navigation(server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        page.goto(server["url"] + "/metrics", wait_until="domcontentloaded")
        nav = page.locator('[data-testid="stSidebarNav"]')
        expect(nav.get_by_text("Generate", exact=True)).to_be_visible(timeout=30_000)
        expect(nav.get_by_text("Settings", exact=True)).to_be_visible()
        assert nav.get_by_text("streamlit app").count() == 0


@pytest.mark.browser
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed")
def test_type_generate_watch_it_grow_then_stop(server):
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server["url"], wait_until="domcontentloaded")
        expect(page.get_by_text("Simulated responses")).to_be_visible(timeout=30_000)
        wait_idle(page)
        box = page.get_by_label("Prompt", exact=True)
        box.fill("Write a long friendly welcome email for new members of a rowing club")
        page.locator(".st-key-go button").click()     # one click, straight after typing

        output = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="welcome email").last
        expect(output).to_be_visible(timeout=30_000)
        lengths = []
        for _ in range(6):
            lengths.append(len(output.inner_text()))
            page.wait_for_timeout(300)
        assert lengths[-1] > lengths[0], f"text did not grow: {lengths}"

        page.locator(".st-key-stop button").first.click()
        expect(page.get_by_text("Stopped — the text above is what arrived.")).to_be_visible(timeout=15_000)
        stopped = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="welcome email").first
        first = stopped.inner_text()
        page.wait_for_timeout(1200)
        assert stopped.inner_text() == first, "text kept growing after Stop"
        page.screenshot(path=str(server["tmp"] / "after-stop.png"), full_page=True)

    deadline = time.time() + 10
    outcome = None
    while time.time() < deadline:
        with sqlite3.connect(server["db"]) as conn:
            row = conn.execute("SELECT outcome, completion_tokens FROM requests WHERE source = 'page' "
                               "ORDER BY id DESC LIMIT 1").fetchone()
        if row:
            outcome = row
            break
        time.sleep(0.2)
    assert outcome is not None and outcome[0] == "cancelled" and outcome[1] > 0
    assert (server["tmp"] / "after-stop.png").stat().st_size > 10_000
