"""Batch jobs: the ledger, the runner and the CLI against the simulator over real HTTP, with
real SQLite files. Retry and breaker waits go through an injected clock; the SIGKILL test
runs the real `python -m core batch` in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.batch import InputRefused, JobRunner
from core.batch.files import parse_lines
from core.config import Config
from core.providers.simulator_provider import SimulatorProvider
from core.service import Gyroscope
from core.simulator import Simulator, start_in_background
from tests.support import FakeClock, wait_for

ROOT = Path(__file__).resolve().parent.parent


def make_gyro(tmp_path, running, clock: FakeClock | None = None, **settings) -> Gyroscope:
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db")
    gyro = Gyroscope(cfg, provider=SimulatorProvider(running),
                     clock=clock.as_clock() if clock else None)
    gyro.settings.ttl = 0
    gyro.settings.set_many({"retry.jitter": 0, "retry.base_delay_s": 0.5, "retry.max_delay_s": 2,
                            **settings}, actor="test")
    return gyro


def job_of(gyro, n: int, **kw) -> str:
    parsed = parse_lines("\n".join(f"Write line number {i} of the batch" for i in range(n)))
    return gyro.batch.create(parsed, **kw)


def run(gyro, job_id: str, concurrency: int | None = None) -> JobRunner:
    runner = JobRunner(gyro, job_id, concurrency)
    asyncio.run(runner.run())
    return runner


@pytest.fixture
def clocked(tmp_path):
    """A simulator and a Gyroscope sharing one fake clock (outages and breakers in fake time)."""
    clock = FakeClock()
    running = start_in_background(Simulator(clock=clock.monotonic, fault_seed=7))
    gyro = make_gyro(tmp_path, running, clock)
    yield gyro, running.sim, clock
    gyro.close()
    running.stop()


def test_200_rows_with_20_percent_503s_and_a_429_storm_all_finish(clocked):
    gyro, sim, clock = clocked
    sim.set_faults(error_rate=0.2, error_status=503, fail_next=40, fail_status=429,
                   retry_after_ms=200)
    job = job_of(gyro, 200)
    runner = run(gyro, job, concurrency=16)
    p = gyro.batch.progress(job)
    assert (runner.final, p["done"], p["failed"], p["left"]) == ("done", 200, 0, 0)
    stats = sim.stats()
    assert stats["completions"] == 200
    assert stats["errors"] >= 40                    # the storm and the 503s really happened
    history = gyro.db.query("SELECT source, job_id, outcome, count(*) AS n FROM requests "
                            "WHERE outcome = 'ok' GROUP BY 1, 2, 3")
    assert history == [{"source": "batch", "job_id": job, "outcome": "ok", "n": 200}]


def test_an_outage_pauses_the_job_and_it_finishes_after_recovery(clocked):
    gyro, sim, clock = clocked
    gyro.settings.set_many({"breaker.mode": "consecutive", "breaker.fail_max": 3,
                            "breaker.reset_timeout_s": 5, "retry.max_retries": 1}, actor="test")
    job = job_of(gyro, 30)
    sim.outage_for(60)
    start = clock.now
    runner = run(gyro, job, concurrency=4)
    p = gyro.batch.progress(job)
    assert (runner.final, p["done"], p["failed"]) == ("done", 30, 0)   # no row burnt
    assert clock.now - start >= 60                  # it waited the outage out...
    refused = gyro.db.query_one("SELECT count(*) AS n FROM requests WHERE outcome = 'circuit_open'")
    assert refused["n"] >= 1                        # ...with the breaker open, not hammering
    # While open, the job sent only the breaker's probes: far fewer than rows x attempts.
    assert sim.stats()["errors"] < 30


def test_the_cost_cap_stops_before_it_would_be_passed(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        parsed = parse_lines("\n".join(f"Prompt {i}" for i in range(20)))
        est = gyro.batch.estimate(parsed.rows)
        per_row = est["max_cost"] / 20
        cap = per_row * 5.5                          # room for 5 rows at their worst
        job = gyro.batch.create(parsed, max_cost=cap)
        runner = run(gyro, job, concurrency=3)
        p = gyro.batch.progress(job)
        assert runner.final == "capped" and "cost cap" in p["note"]
        assert p["cost"] <= cap
        assert 5 <= p["done"] < 20 and p["failed"] == 0
        gyro.batch.set_cap(job, None)                # raise the cap: the rest runs
        assert run(gyro, job).final == "done"
        assert gyro.batch.progress(job)["done"] == 20
    finally:
        gyro.close()


def test_failed_rows_keep_the_reason_and_are_retried_alone(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        parsed = gyro.batch.parse(b'{"prompt": "good one"}\n{"prompt": "bad model", "model": "no-such"}\n'
                                  b'{"prompt": "good two"}\n', "in.jsonl")
        job = gyro.batch.create(parsed)
        run(gyro, job)
        rows = list(gyro.batch.ledger.rows(job))
        assert [r["status"] for r in rows] == ["done", "failed", "done"]
        assert rows[1]["error_kind"] == "model_not_found" and "no-such" in rows[1]["error"]
        before = simulator.sim.stats()["chat_requests"]
        assert gyro.batch.retry_failed(job) == 1
        run(gyro, job)
        assert simulator.sim.stats()["chat_requests"] - before == 1   # only the failed row
        out = gyro.batch.export(job, "jsonl").splitlines()
        assert [json.loads(line)["status"] for line in out] == ["done", "failed", "done"]
    finally:
        gyro.close()


def test_pause_from_elsewhere_stops_sending_and_resume_goes_on(tmp_path, simulator):
    # 300 ms a row: the rows left take seconds, so the job cannot end before the stop comes.
    simulator.sim.set_latency(ttft_ms=300)
    gyro = make_gyro(tmp_path, simulator)
    try:
        job = job_of(gyro, 40)
        runner = gyro.batch.start(job, concurrency=2)
        assert wait_for(lambda: gyro.batch.progress(job)["done"] >= 4)
        assert gyro.batch.pause(job)
        assert runner.finished.wait(20)
        p = gyro.batch.progress(job)
        assert p["status"] == "paused" and p["running"] == 0 and 4 <= p["done"] < 40
        asked = simulator.sim.stats()["chat_requests"]
        assert asked == p["done"]                    # nothing sent twice, nothing lost
        simulator.sim.set_latency(ttft_ms=0)
        gyro.batch.start(job).finished.wait(20)
        assert gyro.batch.progress(job)["done"] == 40
        assert simulator.sim.stats()["chat_requests"] == 40
    finally:
        gyro.close()


def test_cancel_stops_for_good(tmp_path, simulator):
    # 300 ms a row: the rows left take seconds, so the job cannot end before the stop comes.
    simulator.sim.set_latency(ttft_ms=300)
    gyro = make_gyro(tmp_path, simulator)
    try:
        job = job_of(gyro, 40)
        runner = gyro.batch.start(job, concurrency=2)
        assert wait_for(lambda: gyro.batch.progress(job)["done"] >= 2)
        gyro.batch.cancel(job)
        assert runner.finished.wait(20)
        p = gyro.batch.progress(job)
        assert p["status"] == "cancelled" and p["running"] == 0 and p["pending"] > 0
        assert gyro.batch.ledger.last_unfinished() is None
    finally:
        gyro.close()


@pytest.mark.parametrize("how", ["service closing", "cancel"])
def test_rows_waiting_for_a_slow_upstream_go_back_at_once_when_the_job_stops(tmp_path, simulator, how):
    """The service closing (an app restart, Ctrl-C) or a Cancel does not wait for answers
    that have not come: the rows out go back to pending, nothing is counted done or tried.
    (Before: cancelling the slots cancelled the futures their rows settle, so the rows looked
    answered and ran on; here each would have waited 60 s, and closing gave up after 10 s
    with the job left 'running'.)"""
    simulator.sim.set_latency(ttft_ms=60_000)
    gyro = make_gyro(tmp_path, simulator)
    try:
        job = job_of(gyro, 6)
        runner = gyro.batch.start(job, concurrency=3)
        assert wait_for(lambda: simulator.sim.stats()["chat_requests"] == 3)   # three rows out, waiting
        if how == "cancel":
            gyro.batch.cancel(job)
        else:
            gyro.batch.stop_all(timeout=30)
        assert runner.finished.wait(30)
        p = gyro.batch.progress(job)
        assert p["status"] == ("cancelled" if how == "cancel" else "paused"), p
        assert (p["running"], p["done"], p["pending"]) == (0, 0, 6)
        assert [r["tries"] for r in gyro.batch.ledger.rows(job)] == [0] * 6
        if how == "service closing":                                  # and it resumes
            simulator.sim.set_latency(ttft_ms=0)
            assert gyro.batch.start(job).finished.wait(30)
            assert gyro.batch.progress(job)["done"] == 6
    finally:
        gyro.close()


# -- the command line, killed and resumed -------------------------------------------------------
def _counts(db: Path, job: str) -> dict:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT status, count(*) FROM batch_rows WHERE job_id = ? "
                                 "GROUP BY status", (job,)).fetchall())
    finally:
        conn.close()


def test_sigkill_mid_run_then_resume_asks_again_only_the_rows_in_flight(tmp_path, simulator):
    sim = simulator.sim
    sim.set_latency(ttft_ms=60)
    db = tmp_path / "g.db"
    setup = make_gyro(tmp_path, simulator, **{"cache.enabled": False})   # exact request counts
    (tmp_path / "in.csv").write_text("prompt\n" + "".join(f"Row {i} please\n" for i in range(60)))
    env = {**os.environ, "GYROSCOPE_DB": str(db), "OPENAI_BASE_URL": simulator.base_url,
           "OPENAI_API_KEY": "sk-test", "GYROSCOPE_PROVIDER": "openai"}
    proc = subprocess.Popen([sys.executable, "-m", "core", "batch", "in.csv", "-o", "out.csv",
                             "--concurrency", "6", "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = proc.stdout.readline().strip()        # the job id comes first
        assert len(job) == 12
        # Once 18 rows reached the upstream (6 at a time: 12 of them answered), the rows sent
        # after wait for their answer until the kill: the job cannot end first, however slow
        # this machine is.
        assert wait_for(lambda: sim.stats()["chat_requests"] >= 18)
        sim.set_latency(ttft_ms=60_000)
        assert wait_for(lambda: _counts(db, job).get("done", 0) >= 12)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = _counts(db, job)
    done, running, pending = (at_kill.get(k, 0) for k in ("done", "running", "pending"))
    assert done >= 12 and running >= 1 and done + running + pending == 60
    while sim.stats()["in_flight"]:                 # the dead process's requests drain
        time.sleep(0.01)
    asked_before = sim.stats()["chat_requests"]
    assert done <= asked_before <= done + running
    assert not (tmp_path / "out.csv").exists()      # nothing half-written

    # Resume in this process, as `--resume last` would: only rows not done are asked.
    sim.set_latency(ttft_ms=0)
    try:
        assert setup.batch.ledger.last_unfinished() == job
        runner = run(setup, job)
        assert runner.requeued_at_start == running   # the rows the dead process left running
        assert sim.stats()["chat_requests"] - asked_before == running + pending
        assert setup.batch.progress(job)["done"] == 60
    finally:
        setup.close()


def test_cli_resume_last_writes_the_output_and_exit_code_says_all_finished(tmp_path, simulator):
    db = tmp_path / "g.db"
    env = {**os.environ, "GYROSCOPE_DB": str(db), "OPENAI_BASE_URL": simulator.base_url,
           "OPENAI_API_KEY": "sk-test", "GYROSCOPE_PROVIDER": "openai"}
    (tmp_path / "in.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two", "model": "no-such"}\n'
                                       '{"prompt": "three", "temperature": 9}\n')
    cli = [sys.executable, "-m", "core"]
    first = subprocess.run(cli + ["batch", "in.jsonl", "-o", "out.jsonl", "--no-progress"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1                     # a row failed: not everything finished
    job = first.stdout.splitlines()[0]
    assert "line 3: temperature must be between 0 and 2 (got 9)" in first.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["row"], r["status"]) for r in out] == [(1, "done"), (2, "failed")]
    listing = subprocess.run(cli + ["jobs"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
    assert job in listing.stdout and "done" in listing.stdout
    nothing = subprocess.run(cli + ["batch", "--resume", "last"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 2 and "no unfinished job" in nothing.stderr


# -- bad input: a clear message per problem, good rows still run, nothing half-written ---------
def test_a_csv_without_a_prompt_column_is_refused_naming_its_columns(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        with pytest.raises(InputRefused, match=r"no \"prompt\" column \(its columns: 'text', 'model'\)"):
            gyro.batch.parse(b"text,model\nhello,gpt-4o\n", "in.csv")
        assert gyro.batch.ledger.jobs() == []
    finally:
        gyro.close()


def test_empty_and_bad_rows_are_listed_by_line_and_good_rows_run(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        data = ("prompt,temperature,max_tokens,model,messages\n"
                "good one,0.5,50,,\n"
                ",,,,\n"
                "too hot,hot,,,\n"
                "no tokens,,0,,\n"
                "half tokens,,2.5,,\n"
                ",,,gpt-4o,\n"
                "bad messages,,,,not json\n"
                "good two,,,,\n").encode()
        parsed = gyro.batch.parse(data, "in.csv")
        assert [str(p) for p in parsed.problems] == [
            "line 3: is empty.",
            "line 4: temperature must be a number (got 'hot').",
            "line 5: max_tokens must be a whole number from 1 to 128,000 (got 0).",
            "line 6: max_tokens must be a whole number (got 2.5).",
            "line 7: has no prompt (the prompt cell is empty); fill it in or remove the row.",
            "line 8: messages must be a JSON list of {\"role\", \"content\"} objects."]
        assert [r["line"] for r in parsed.rows] == [2, 9]
        job = gyro.batch.create(parsed)
        run(gyro, job)
        assert gyro.batch.progress(job)["done"] == 2 and simulator.sim.stats()["chat_requests"] == 2
    finally:
        gyro.close()


def test_a_file_over_the_limit_is_refused_by_its_size_before_reading(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        big = tmp_path / "big.csv"
        with big.open("wb") as fh:                  # 100 MB, sparse: never really written
            fh.truncate(100 * 1024 * 1024)
        with pytest.raises(InputRefused, match=r"104\.9 MB; a batch input may be at most 20\.0 MB"):
            gyro.batch.parse_path(big)
        assert gyro.batch.ledger.jobs() == []
    finally:
        gyro.close()


def test_a_binary_file_and_a_wrong_encoding_are_refused_with_what_to_do(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        with pytest.raises(InputRefused, match="looks like a binary file"):
            gyro.batch.parse(b"PK\x03\x04\x14\x00\x06\x00" + bytes(200), "prompts.csv")
        with pytest.raises(InputRefused, match=r"not UTF-8 text \(byte 0xe9 on line 3\).*CSV UTF-8"):
            gyro.batch.parse("prompt\nhello\ncafé au lait\n".encode("latin-1"), "in.csv")
        with pytest.raises(InputRefused, match="no row to run"):
            gyro.batch.create(gyro.batch.parse(b"prompt\n,\n", "in.csv"))
        assert gyro.batch.ledger.jobs() == []
    finally:
        gyro.close()


def test_jsonl_rows_with_messages_and_overrides(tmp_path, simulator):
    gyro = make_gyro(tmp_path, simulator)
    try:
        data = (b'{"messages": [{"role": "system", "content": "Be brief."}, '
                b'{"role": "user", "content": "Name a colour"}], "model": "gpt-4o"}\n'
                b'{"prompt": "hi", "max_tokens": 20, "system": "terse"}\n'
                b'not json\n[1, 2]\n{"prompt": "x", "colour": "red"}\n')
        parsed = gyro.batch.parse(data, "in.jsonl")
        assert [p.line for p in parsed.problems] == [3, 4, 5]
        assert "unknown field(s) colour" in parsed.problems[2].message
        job = gyro.batch.create(parsed)
        run(gyro, job)
        rows = list(gyro.batch.ledger.rows(job))
        assert [r["status"] for r in rows] == ["done", "done"]
        assert rows[0]["result"]["model"] == "gpt-4o"
        assert rows[1]["result"]["usage"]["completion_tokens"] <= 20
    finally:
        gyro.close()


def test_ctrl_c_pauses_the_job_with_nothing_left_running_and_resume_finishes(tmp_path, simulator):
    sim = simulator.sim
    sim.set_latency(ttft_ms=60)
    db = tmp_path / "g.db"
    (tmp_path / "in.txt").write_text("".join(f"Line prompt {i}\n" for i in range(40)))
    env = {**os.environ, "GYROSCOPE_DB": str(db), "OPENAI_BASE_URL": simulator.base_url,
           "OPENAI_API_KEY": "sk-test", "GYROSCOPE_PROVIDER": "openai"}
    cli = [sys.executable, "-m", "core", "batch"]
    proc = subprocess.Popen(cli + ["in.txt", "-o", "out.jsonl", "--concurrency", "4", "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        job = proc.stdout.readline().strip()
        # Once 10 rows reached the upstream (4 at a time: 6 of them answered), the rows sent
        # after wait for their answer until Ctrl-C: the job cannot end first, however slow
        # this machine is.
        assert wait_for(lambda: sim.stats()["chat_requests"] >= 10)
        sim.set_latency(ttft_ms=60_000)
        assert wait_for(lambda: _counts(db, job).get("done", 0) >= 6)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"Ctrl-C did not end the CLI in 60 s; rows {_counts(db, job)}; "
                                 f"its stderr: {err[-2000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and f"--resume {job}" in err, (proc.returncode, err, _counts(db, job))
    counts = _counts(db, job)
    assert counts.get("running", 0) == 0 and counts.get("pending", 0) > 0
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(written) == 40                        # every row, whole, with its status so far
    sim.set_latency(ttft_ms=0)
    resumed = subprocess.run(cli + ["--resume", "last", "--no-progress"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and resumed.stdout.splitlines()[0] == job
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["status"] for r in out] == ["done"] * 40
    assert sim.stats()["chat_requests"] <= 40 + 4   # at most the rows in flight at Ctrl-C again


def test_csv_on_stdin_is_read_as_csv_and_format_overrides(tmp_path, simulator):
    env = {**os.environ, "GYROSCOPE_DB": str(tmp_path / "g.db"), "OPENAI_BASE_URL": simulator.base_url,
           "OPENAI_API_KEY": "sk-test", "GYROSCOPE_PROVIDER": "openai"}
    cli = [sys.executable, "-m", "core", "batch", "-", "--no-progress"]
    csv_text = 'prompt,max_tokens\n"Name a colour, then a fruit",7\nSay hello,5\n'
    done = subprocess.run(cli + ["-o", "out.jsonl"], input=csv_text, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Read as CSV" in done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in out] == ["Name a colour, then a fruit", "Say hello"]
    assert [r["status"] for r in out] == ["done", "done"]
    # Prompts that merely contain commas are prompts, one per line, and --format says so too.
    lines = "Write a tagline, short\nprompt,max_tokens\n"
    forced = subprocess.run(cli + ["-o", "lines.jsonl", "--format", "lines"], input=lines,
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    out = [json.loads(line) for line in (tmp_path / "lines.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in out] == ["Write a tagline, short", "prompt,max_tokens"]
    sniffed = subprocess.run(cli + ["-o", "s.jsonl"], input="Write a tagline, short\n",
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert sniffed.returncode == 0 and "one prompt per line" in sniffed.stderr
    bad = subprocess.run(cli + ["-o", "x.jsonl", "--format", "xml"], input="a\n", cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()
