"""The Generate page's Batch tab under AppTest, on the app's own simulator over real HTTP:
upload, preview, start, progress, results, download; jobs found again after a restart."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import core.service
from tests.conftest import drop_service
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[1]
CSV = ("prompt,model,max_tokens\n"
       "A tagline for a bakery,gpt-4o-mini,40\n"
       "A tagline for a bike shop,,30\n"
       ",,\n"
       "A tagline for a florist,gpt-4o,hot\n"
       "A tagline for a library,,20\n").encode()


@pytest.fixture
def app(app_env):
    at = AppTest.from_file(str(ROOT / "pages" / "generate.py"), default_timeout=30)
    at.session_state["generate_tab"] = "Batch"     # the tab a click would open
    at.run()
    assert not at.exception
    yield at


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info]
    return "\n".join(str(p) for p in parts)


def metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def wait_done(at, job_id: str, timeout: float = 30) -> None:
    gyro = core.service.default_service()
    runner = gyro.batch.runner(job_id)
    if runner is not None:
        assert runner.finished.wait(timeout)
    at.run()


def upload(at, name="prompts.csv", data=CSV):
    at.radio(key="batch_how").set_value("Upload CSV or JSONL").run()
    at.file_uploader(key="batch_file").upload(name, data, "text/csv").run()
    assert not at.exception
    return at


def test_upload_preview_start_progress_results_download(app):
    at = upload(app)
    shown = texts(at)
    assert "2 row(s) will be skipped" in shown
    assert "line 4: is empty." in shown and "line 5: max_tokens must be a number (got 'hot')." in shown
    m = metrics(at)
    assert m["Rows"] == "3" and int(m["Prompt tokens (est.)"]) > 0 and m["Max cost"].startswith("$")
    at.button(key="batch_start").click().run()
    assert not at.exception
    job_id = at.session_state["batch_job"]
    wait_done(at, job_id)
    assert metrics(at)["Status"] == "done"
    assert "3 done · 0 failed · 0 left" in at.get("progress")[0].proto.text
    gyro = core.service.default_service()
    gyro.db.flush()
    rows = gyro.db.query("SELECT source, job_id FROM requests")
    assert rows and all(r == {"source": "batch", "job_id": job_id} for r in rows)
    table = at.dataframe[-1].value
    assert list(table["row"]) == [2, 3, 6] and set(table["status"]) == {"done"}
    downloads = at.get("download_button")
    assert [d.proto.label for d in downloads] == ["Download CSV", "Download JSONL"]
    out = list(csv.DictReader(io.StringIO(gyro.batch.export(job_id, "csv"))))
    assert [r["status"] for r in out] == ["done"] * 3 and all(r["content"] for r in out)
    assert [json.loads(x)["row"] for x in gyro.batch.export(job_id, "jsonl").splitlines()] == [2, 3, 6]


def test_pasted_lines_and_a_refused_file(app):
    at = app
    at.text_area(key="batch_text").input("First prompt\n\nSecond prompt\n").run()
    assert metrics(at)["Rows"] == "2"
    at.radio(key="batch_how").set_value("Upload CSV or JSONL").run()
    at.file_uploader(key="batch_file").upload("sheet.csv", b"PK\x03\x04" + bytes(100), "text/csv").run()
    assert "looks like a binary file" in texts(at)
    assert "Rows" not in metrics(at)               # nothing to start
    at.file_uploader(key="batch_file").upload("x.csv", "prompt\ncafé\n".encode("latin-1"), "text/csv").run()
    assert "not UTF-8 text" in texts(at)
    at.file_uploader(key="batch_file").upload("x.csv", b"text\nhello\n", "text/csv").run()
    assert 'no "prompt" column' in texts(at)
    assert not at.exception


def test_a_job_left_by_a_restart_is_listed_with_resume(app):
    at = upload(app)
    gyro = core.service.default_service()
    sim = gyro.provider.sim
    sim.set_latency(ttft_ms=60_000)               # no row can finish before the restart
    at.number_input(key="batch_concurrency").set_value(1).run()
    at.button(key="batch_start").click().run()
    job_id = at.session_state["batch_job"]
    assert wait_for(lambda: gyro.batch.progress(job_id)["running"] >= 1)    # a row is out, waiting
    drop_service()                                 # the app restarts: its runner stops
    progress = core.service.default_service().batch.progress(job_id)
    assert progress["done"] == 0 and progress["left"] == 3         # the row out went back
    sim.set_latency(ttft_ms=0)
    at = AppTest.from_file(str(ROOT / "pages" / "generate.py"), default_timeout=30)
    at.session_state["generate_tab"] = "Batch"
    at.run()
    assert at.selectbox(key="batch_job").value == job_id
    status = metrics(at)["Status"]
    assert status in ("paused", "stopped")        # a clean stop pauses; a crash reads as stopped
    at.button(key="batch_resume").click().run()
    wait_done(at, job_id)
    assert metrics(at)["Status"] == "done"
    assert core.service.default_service().batch.progress(job_id)["done"] == 3
    assert not at.exception
