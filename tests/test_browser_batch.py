"""End to end in a real Chromium: the Generate page's Batch tab under `streamlit run`:
upload a CSV, see the preview, start, watch the live progress, read the results, download."""

from __future__ import annotations

import csv
import io

from core.simulator import Simulator, start_in_background
from tests.browser import chromium, needs_chromium, streamlit_app, wait_idle

pytestmark = needs_chromium

CSV = ("prompt,max_tokens\n"
       "A tagline for a bakery,30\n"
       "A tagline for a bike shop,30\n"
       ",\n"
       "A tagline for a florist,30\n"
       "A tagline for a library,30\n").encode()


def test_upload_preview_start_progress_results_download(tmp_path):
    from playwright.sync_api import expect

    # The app on a simulator this test controls: each row waits 2 s for its answer until the
    # page has shown the job running, then answers at once (the job cannot end unseen).
    sim = start_in_background(Simulator(ttft_ms=2000, tokens_per_s=None))
    try:
        with streamlit_app(tmp_path, OPENAI_BASE_URL=sim.base_url, OPENAI_API_KEY="sk-test-browser") as url, \
                chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 1200}, accept_downloads=True)
            page.goto(url, wait_until="domcontentloaded")
            wait_idle(page)
            page.get_by_role("tab", name="Batch").click()
            page.get_by_text("Upload CSV or JSONL").click()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
                files=[{"name": "prompts.csv", "mimeType": "text/csv", "buffer": CSV}])
            expect(page.get_by_text("1 row(s) will be skipped")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("line 4: is empty.")).to_be_visible()
            rows = page.locator('[data-testid="stMetric"]').filter(has_text="Rows")
            expect(rows).to_contain_text("4")
            expect(page.locator('[data-testid="stMetric"]').filter(has_text="Max cost")).to_contain_text("$")
            page.get_by_label("Rows at once").fill("1")
            page.get_by_label("Rows at once").press("Enter")
            wait_idle(page)
            page.locator(".st-key-batch_start button").click()
            # Live progress: the bar moves while the job runs (one row at a time).
            progress = page.locator('[data-testid="stProgress"]')
            expect(progress).to_contain_text("left", timeout=30_000)
            expect(page.locator('[data-testid="stMetric"]').filter(has_text="Status")).to_contain_text(
                "running", timeout=30_000)
            assert sim.sim.stats()["completions"] < 4
            sim.sim.set_latency(ttft_ms=0)
            expect(progress).to_contain_text("4 done · 0 failed · 0 left", timeout=60_000)
            expect(page.locator('[data-testid="stMetric"]').filter(has_text="Status")).to_contain_text(
                "done", timeout=30_000)
            expect(page.locator(".st-key-batch_csv button")).to_be_visible(timeout=30_000)
            with page.expect_download() as got:
                page.locator(".st-key-batch_csv button").click()
            download = got.value
            assert download.suggested_filename.startswith("batch-") and download.suggested_filename.endswith(".csv")
            records = list(csv.DictReader(io.StringIO(open(download.path(), encoding="utf-8").read())))
            assert [r["row"] for r in records] == ["2", "3", "5", "6"]
            assert all(r["status"] == "done" and r["content"] for r in records)
            page.screenshot(path=str(tmp_path / "batch-done.png"), full_page=True)
    finally:
        sim.stop()
    assert (tmp_path / "batch-done.png").stat().st_size > 10_000
