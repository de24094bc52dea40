"""The Generate page's Batch tab: Streamlit glue over core.batch (the page only calls
``render``). Jobs run on the service's background loop, not in the page's script, so they
go on across reruns and reloads; the tab reads their state from the database."""

from __future__ import annotations

import time

import streamlit as st

from .batch import InputRefused, files
from .errors import StorageError

ACTIVE = ("starting", "running", "waiting")
PREVIEW_ROWS = 20
RESULT_ROWS = 500       # rows shown in the table; the downloads have every row


def render(gyro) -> None:
    """Input, preview and start; then the jobs with their progress and results."""
    jobs = gyro.batch
    state = st.session_state
    parsed, name = _input(jobs)
    if parsed is not None:
        _preview_and_start(gyro, parsed, name)
    st.divider()
    try:
        listed = jobs.ledger.jobs(30)
    except StorageError as exc:
        st.warning(f"{exc.user_message} Jobs running here pause and go on by themselves when it answers.")
        return
    if not listed:
        st.caption("No batch jobs yet.")
        return
    ids = [j["id"] for j in listed]
    if state.get("batch_job") not in ids:
        state.batch_job = next((j["id"] for j in listed if j["status"] in ACTIVE + ("paused", "capped")),
                               ids[0])
    by_id = {j["id"]: j for j in listed}
    job_id = st.selectbox("Job", ids, key="batch_job",
                          format_func=lambda i: _label(by_id[i]))
    # Just started here, the runner may not have taken the job yet ('pending'): live already.
    active = jobs.running_here(job_id) or (by_id[job_id]["status"] in ACTIVE and by_id[job_id]["alive"])
    st.fragment(run_every=1.0 if active else None)(_progress)(gyro, job_id)
    _results(gyro, job_id)


def _label(job: dict) -> str:
    status = _status(job)
    name = f" · {job['name']}" if job["name"] else ""
    return f"{job['id']}{name} · {status} · {job['done']}/{job['total']} done"


def _status(job: dict) -> str:
    """A job left 'running' by a process that is gone (an app restart) reads as stopped."""
    if job["status"] in ACTIVE and not job["alive"]:
        return "stopped"
    return job["status"]


def _input(jobs) -> tuple[files.ParsedInput | None, str]:
    """The rows pasted or uploaded (None when there is nothing, or it was refused) and a name."""
    how = st.radio("Prompts", ["Paste, one per line", "Upload CSV or JSONL"], horizontal=True,
                   key="batch_how")
    try:
        if how.startswith("Paste"):
            text = st.text_area("One prompt per line", key="batch_text", height=160,
                                placeholder="A tagline for a bakery\nA tagline for a bike shop")
            return (jobs.parse(text.encode("utf-8"), "pasted.txt") if text.strip() else None), "pasted"
        up = st.file_uploader("CSV or JSONL with a prompt column (optional: model, system, "
                              "temperature, max_tokens, messages)", key="batch_file",
                              type=["csv", "jsonl", "ndjson", "json", "txt"])
        if up is None:
            return None, ""
        limit = int(jobs.gyro.settings.get("batch.max_file_mb") * 1e6)
        if up.size > limit:   # refused by its size, before its bytes are read
            raise InputRefused(f"{up.name} is {up.size / 1e6:,.1f} MB; a batch input may be at most "
                               f"{limit / 1e6:,.1f} MB (setting batch.max_file_mb). Split it.")
        return jobs.parse(up.getvalue(), up.name), up.name
    except InputRefused as exc:
        st.error(exc.user_message)
        return None, ""


def _preview_and_start(gyro, parsed: files.ParsedInput, name: str) -> None:
    for note in parsed.notes:
        st.info(note)
    if parsed.problems:
        shown = "\n".join(f"- {p}" for p in parsed.problems[:50])
        more = f"\n- … and {len(parsed.problems) - 50} more" if len(parsed.problems) > 50 else ""
        st.warning(f"{len(parsed.problems)} row(s) will be skipped:\n{shown}{more}")
    if not parsed.rows:
        return
    est = gyro.batch.estimate(parsed.rows)
    c1, c2, c3 = st.columns(3)
    c1.metric("Rows", f"{est['rows']:,}")
    c2.metric("Prompt tokens (est.)", f"{est['prompt_tokens']:,}")
    c3.metric("Max cost", f"${est['max_cost']:.4f}",
              help="If every answer used all its max tokens; most cost far less.")
    if est["unpriced_rows"]:
        st.caption(f"{est['unpriced_rows']} row(s) use a model with no known price (not counted).")
    st.dataframe([{"line": r["line"], "prompt": r.get("prompt") or "(messages)",
                   "model": r.get("model", ""), "est. prompt tokens": r["_estimate"][0]}
                  for r in parsed.rows[:PREVIEW_ROWS]], hide_index=True)
    c1, c2 = st.columns(2)
    concurrency = c1.number_input("Rows at once", 1, 256, int(gyro.settings.get("batch.concurrency")),
                                  key="batch_concurrency")
    cap = c2.number_input("Cost cap in $ (0 = none)", 0.0, 1e6,
                          float(gyro.settings.get("batch.max_cost_usd")), key="batch_cap",
                          help="The job stops before it would pass this, counting the most "
                               "each row in flight can cost.")
    if st.button("Start batch", type="primary", key="batch_start"):
        job_id = gyro.batch.create(parsed, name=name, concurrency=int(concurrency),
                                   max_cost=float(cap) or None)
        gyro.batch.start(job_id)
        st.session_state.batch_job = job_id
        st.toast(f"Job {job_id} started.")


def _progress(gyro, job_id: str) -> None:
    jobs = gyro.batch
    try:
        p = jobs.progress(job_id)
    except StorageError as exc:     # the job pauses meanwhile; this view goes on when it is back
        st.warning(f"{exc.user_message} The job pauses and goes on by itself when it answers.")
        return
    if p is None:
        return
    status = _status(p)
    if status == "pending" and p["running_here"]:
        status = "starting"
    st.progress(p["finished"] / p["total"] if p["total"] else 1.0,
                text=f"{p['done']:,} done · {p['failed']:,} failed · {p['left']:,} left")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Status", status)
    c2.metric("Rate", f"{p['rate'] * 60:,.0f} rows/min" if p["rate"] else "–")
    c3.metric("Time left", _duration(p["eta_s"]) if status in ACTIVE else "–")
    c4.metric("Cost", f"${p['cost']:.4f}")
    if p["note"]:
        (st.warning if status in ("waiting", "capped", "paused") else st.caption)(p["note"])
    if status == "stopped":
        st.warning("This job stopped when the app (or the command that ran it) stopped. "
                   "Resume goes on where it left off; finished rows are not paid for again.")
    b1, b2, b3, b4 = st.columns(4)
    if status in ACTIVE:
        if b1.button("Pause", key="batch_pause"):
            jobs.pause(job_id)
            st.rerun()
    elif status in ("paused", "capped", "stopped", "pending") and p["left"]:
        if b1.button("Resume", key="batch_resume", type="primary"):
            jobs.start(job_id)
            time.sleep(0.2)       # let the runner take the job before the tab reads it
            st.rerun()
    if status not in ("done", "cancelled") and b2.button("Cancel", key="batch_cancel"):
        jobs.cancel(job_id)
        st.rerun()
    if p["failed"] and status not in ACTIVE and b3.button("Retry failed rows", key="batch_retry"):
        jobs.retry_failed(job_id)
        jobs.start(job_id)
        st.rerun()
    if st.session_state.get("batch_seen_active") == job_id and status not in ACTIVE:
        st.session_state.batch_seen_active = None
        st.rerun(scope="app")     # the job ended: redraw the results below
    if status in ACTIVE:
        st.session_state.batch_seen_active = job_id


def _results(gyro, job_id: str) -> None:
    records = gyro.batch.records(job_id)
    if not any(r["status"] in ("done", "failed") for r in records):
        return
    st.dataframe(records[:RESULT_ROWS], hide_index=True,
                 column_order=("row", "status", "prompt", "content", "error", "cost"))
    c1, c2 = st.columns(2)
    c1.download_button("Download CSV", files.to_csv(records), f"batch-{job_id}.csv", "text/csv",
                       key="batch_csv")
    c2.download_button("Download JSONL", files.to_jsonl(records), f"batch-{job_id}.jsonl",
                       "application/jsonl", key="batch_jsonl")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
