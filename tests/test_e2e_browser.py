"""End to end: `streamlit run` serves the app; a real Chromium types, streams and stops."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser import wait_idle

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(GYROSCOPE_DB=str(tmp / "e2e.db"), GYROSCOPE_SIM_TTFT_MS="100",
               GYROSCOPE_SIM_TOKENS_PER_S="12")
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
                             "--server.port", str(port), "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("streamlit run did not serve /_stcore/health: " + (tmp / "streamlit.log").read_text())
    yield {"url": url, "db": tmp / "e2e.db", "tmp": tmp}
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_streamlit_run_serves_health_and_the_api(server):
    assert urllib.request.urlopen(server["url"] + "/_stcore/health", timeout=5).read() == b"ok"
    body = urllib.request.urlopen(server["url"] + "/api/health", timeout=5).read()
    assert b'"provider":"simulator"' in body


@pytest.mark.browser
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed")
def test_a_first_visit_straight_to_a_page_gets_the_apps_navigation(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server["url"] + "/metrics", wait_until="domcontentloaded")
        nav = page.locator('[data-testid="stSidebarNav"]')
        expect(nav.get_by_text("Generate", exact=True)).to_be_visible(timeout=30_000)
        expect(nav.get_by_text("Settings", exact=True)).to_be_visible()
        assert nav.get_by_text("streamlit app").count() == 0
        browser.close()


@pytest.mark.browser
@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed")
def test_type_generate_watch_it_grow_then_stop(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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
        browser.close()

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
