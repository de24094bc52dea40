"""Bad input found from outside (issue 13, point 5): every case gets a clear message saying
what to do — never a 500, an "unexpected" error or a traceback — and changes nothing.

The API cases go over real HTTP to the API on the simulator; the CLI cases run
`python -m core` in a subprocess on a real SQLite file in a tmp dir; the password pause
runs the Settings page under AppTest with the gate's clock injected."""

from __future__ import annotations

import getpass
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import admin
from core.cli import main as cli_main
from core.demo import fill_history
from core.errors import InvalidParameter
from core.models import MAX_MODEL_CHARS
from core.pipeline import MAX_TOKENS
from core.service import Gyroscope
from core.signin import PasswordGate
from tests.support import FakeClock
from tests.test_foundation import _post, api  # noqa: F401 - the API over real HTTP, as a fixture

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_PAGE = str(ROOT / "pages" / "settings.py")
PASSWORD = "correct horse battery staple"


# -- helpers ---------------------------------------------------------------------------------
def refused(url: str, body, field: str) -> dict:
    """POST ``body``; assert a 400 whose message names ``field``; return the error."""
    status, raw = _post(url + "/api/generate", body)
    error = json.loads(raw)["error"]
    assert status == 400, (status, raw[:300])
    assert field in error["message"] and "unexpected" not in error["message"].lower(), error
    return error


def nothing_happened(gyro) -> None:
    """No row, no upstream call, no breaker beyond the default model's, nothing lost."""
    assert gyro.db.query_one("SELECT count(*) AS n FROM requests")["n"] == 0
    assert gyro.provider.sim.stats()["chat_requests"] == 0
    assert gyro.history.lost_rows == 0
    assert {i["name"] for i in gyro.breakers.all_info()} <= {"simulator|gpt-4o-mini"}


def cli(*args: str | bytes, db: Path, stdin: str | None = None, **env: str):
    """Run `python -m core ARGS` in a subprocess on ``db``; bytes args go as they are."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_ADMIN_PASSWORD")}
    environ.update(GYROSCOPE_DB=str(db), GYROSCOPE_PROVIDER="simulator", **env)
    proc = subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, cwd=db.parent,
                          env=environ, input=(stdin or "").encode(), timeout=120)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return proc.returncode, out, err


# -- /api/generate ---------------------------------------------------------------------------
def test_json_nested_2000_deep_is_a_400(api):
    url, gyro = api
    deep = b'{"prompt": "Hi", "stop": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    refused(url, deep, "nested too deeply")
    nothing_happened(gyro)


def test_an_integer_of_6000_digits_is_a_400(api):
    url, gyro = api
    refused(url, b'{"prompt": "Hi", "max_tokens": ' + b"7" * 6000 + b"}", "too many digits")
    nothing_happened(gyro)


@pytest.mark.parametrize("field", ["prompt", "system", "model"])
def test_lone_surrogates_are_a_400_naming_the_field(api, field):
    url, gyro = api
    body = {"prompt": "Hello", "max_tokens": 5, field: "bad \ud800 text"}
    raw = json.dumps(body).encode()          # ensure_ascii: the surrogate goes as "\ud800"
    assert b"\\ud800" in raw
    error = refused(url, raw, field)
    assert "lone surrogate" in error["message"]
    nothing_happened(gyro)


def test_lone_surrogates_in_cli_arguments_are_named(tmp_path, capsys):
    db = tmp_path / "settings.db"
    code, out, err = cli("generate", b"caf\xe9 au lait", db=db)      # Latin-1, not UTF-8
    assert code == 1 and "prompt contains a character that is not valid Unicode" in err
    # What Python makes of those bytes in sys.argv, without another subprocess.
    for option, field in (("--model", "model"), ("--system", "system")):
        assert cli_main(["generate", "Hello", option, os.fsdecode(b"x\xff")]) == 1
        assert f"{field} contains a character that is not valid Unicode" in capsys.readouterr().err
    assert sqlite3.connect(db).execute("SELECT count(*) FROM requests").fetchone()[0] == 0


@pytest.mark.parametrize("field, value, words", [
    ("stream", "false", "stream must be true or false"),
    ("cache", "no", "cache must be true or false"),
    ("refresh", 1, "refresh must be true or false"),
    ("optimize", "yes", "optimize must be true or false or null"),
    ("top_p", True, "top_p must be a number"),
    ("temperature", "0.5", "temperature must be a number"),
    ("max_tokens", 5.0, "max_tokens must be a whole number"),
    ("seed", False, "seed must be a whole number"),
    ("prompt", ["Hi"], "prompt must be a string (got a list)"),
    ("stop", "END", "stop must be a list of strings"),
    ("prompt", None, "prompt must be a string (got null)"),
])
def test_types_are_strict_not_truthy(api, field, value, words):
    url, gyro = api
    body = {"prompt": "Hello", "max_tokens": 5, field: value}
    refused(url, body, words)
    nothing_happened(gyro)


def test_a_body_without_a_prompt_is_a_400(api):
    url, gyro = api
    refused(url, {"max_tokens": 5}, 'needs a "prompt"')
    nothing_happened(gyro)


def test_max_tokens_is_bounded_for_a_model_with_no_known_window(api):
    url, gyro = api
    assert gyro.provider.context_window("my-local-model") is None
    error = refused(url, {"prompt": "Hello", "model": "my-local-model", "max_tokens": 10**30},
                    f"from 1 to {MAX_TOKENS:,}")
    assert error["kind"] == "invalid_parameter"
    assert gyro.provider.sim.stats()["chat_requests"] == 0       # never sent upstream


def test_a_model_name_of_100000_characters_adds_no_breaker_and_no_row(api):
    url, gyro = api
    error = refused(url, {"prompt": "Hello", "model": "m" * 100_000}, "model")
    assert f"at most {MAX_MODEL_CHARS}" in error["message"] and len(error["message"]) < 300
    nothing_happened(gyro)


# -- settings --------------------------------------------------------------------------------
def test_an_empty_default_model_is_refused_and_minus_zero_is_stored_as_zero(tmp_path):
    db = tmp_path / "settings.db"
    code, out, err = cli("settings", "set", "retry.base_delay_s", "-0", db=db)
    assert code == 0 and "= 0.0" in out
    gyro = Gyroscope()
    try:
        for empty in ("", "  "):
            with pytest.raises(InvalidParameter, match="must name a model"):
                gyro.settings.set("provider.default_model", empty)
        gyro.settings.set("retry.max_retries", "-0")
        gyro.settings.set("retry.jitter", -0.0)
    finally:
        gyro.close()
    rows = dict(sqlite3.connect(db).execute("SELECT name, value FROM settings").fetchall())
    assert rows == {"retry.base_delay_s": "0.0", "retry.max_retries": "0", "retry.jitter": "0.0"}


@pytest.fixture(autouse=True)
def _db_env(monkeypatch, tmp_path):
    # In-process services in this file use the test's own file, like the CLI subprocesses.
    monkeypatch.setenv("GYROSCOPE_DB", str(tmp_path / "settings.db"))
    monkeypatch.setenv("GYROSCOPE_PROVIDER", "simulator")


# -- CLI ---------------------------------------------------------------------------------------
def test_demo_history_runs_again_with_the_same_seed(tmp_path):
    db = tmp_path / "settings.db"
    assert cli_main(["demo-history", "--rows", "300", "--days", "2", "--seed", "7"]) == 0
    code, out, err = cli("demo-history", "--rows", "300", "--days", "2", "--seed", "7", db=db)
    assert code == 0 and "wrote 300 synthetic history rows" in out, err
    assert sqlite3.connect(db).execute("SELECT count(*) FROM requests").fetchone()[0] == 600


def test_simulator_on_an_impossible_port_is_a_message(tmp_path):
    code, out, err = cli("simulator", "--port", "99999", db=tmp_path / "sim.db")
    assert code == 2 and "'99999' is not a TCP port; pick one from 1024 to 65535" in err


def test_stats_on_a_database_corrupted_in_its_middle_pages_is_a_message(tmp_path, monkeypatch):
    db = tmp_path / "damaged.db"
    monkeypatch.setenv("GYROSCOPE_DB", str(db))
    gyro = Gyroscope()
    fill_history(gyro.db, rows=8_000, days=30, end=1_800_000_000.0)
    gyro.close()
    with sqlite3.connect(db) as conn:              # the rows into the main file, out of the WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = db.stat().st_size // page_size
    assert pages > 100
    with open(db, "r+b") as f:                     # garbage over 20 pages in the middle
        for page in range(pages // 2, pages // 2 + 20):
            f.seek(page * page_size)
            f.write(bytes((page * 37 + i) % 251 for i in range(page_size)))
    code, out, err = cli("stats", db=db)
    assert code == 1 and f"The database file {db} is not a valid SQLite database" in err
    assert "Move it aside" in err


def test_settings_set_needs_the_admin_password_and_audits_who(tmp_path, capsys):
    db = tmp_path / "settings.db"
    env = {"GYROSCOPE_ADMIN_PASSWORD": PASSWORD}
    with pytest.MonkeyPatch.context() as mp:     # not a terminal, no --password-stdin
        mp.setenv("GYROSCOPE_ADMIN_PASSWORD", PASSWORD)
        mp.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
        assert cli_main(["settings", "set", "retry.max_retries", "1"]) == 1
    err = capsys.readouterr().err
    assert "needs the admin password" in err and "--password-stdin" in err
    code, out, err = cli("settings", "set", "retry.max_retries", "2", "--password-stdin",
                         db=db, stdin=PASSWORD + "\n", **env)
    assert code == 0 and "retry.max_retries = 2" in out, err
    rows = sqlite3.connect(db).execute(
        "SELECT subject, old, new, actor FROM events WHERE kind = 'setting'").fetchall()
    assert rows == [("retry.max_retries", "3", "2", f"cli:{getpass.getuser()}")]
    assert PASSWORD not in out + err


def test_a_wrong_cli_password_changes_nothing_and_pauses(tmp_path, monkeypatch, capsys):
    db = tmp_path / "settings.db"
    clock = FakeClock()
    monkeypatch.setattr(admin, "PASSWORD_GATE", PasswordGate(
        delay_s=1.0, clock=clock.monotonic, sleep=clock.sleep_blocking))
    monkeypatch.setenv("GYROSCOPE_ADMIN_PASSWORD", PASSWORD)
    monkeypatch.setattr(sys, "stdin", io.StringIO("guess\n"))
    assert cli_main(["settings", "set", "retry.max_retries", "1", "--password-stdin"]) == 1
    assert "Wrong password. Nothing was changed." in capsys.readouterr().err
    assert clock.slept == [1.0]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM settings").fetchone()[0] == 0


# -- the wrong-password pause is per client ----------------------------------------------------
def test_parallel_attempts_from_one_client_get_one_check_per_pause():
    clock = FakeClock()
    gate = PasswordGate(delay_s=1.0, clock=clock.monotonic, sleep=lambda s: None)
    start = threading.Barrier(10)
    verdicts = []

    def guess(i: int) -> None:
        start.wait()
        verdicts.append(gate.attempt("203.0.113.7", f"guess {i}", PASSWORD))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    checked = [v for v in verdicts if v.wait_s == 0]
    assert len(checked) == 1 and not checked[0].ok
    assert all(v.wait_s == pytest.approx(1.0) for v in verdicts if v not in checked)
    assert gate.attempt("198.51.100.2", PASSWORD, PASSWORD).ok       # another client: no pause
    assert not gate.attempt("203.0.113.7", PASSWORD, PASSWORD).ok     # still paused
    clock.advance(1.0)
    assert gate.attempt("203.0.113.7", PASSWORD, PASSWORD).ok


def test_settings_page_sessions_share_the_pause(app_env, monkeypatch):
    monkeypatch.setenv("GYROSCOPE_ADMIN_PASSWORD", PASSWORD)
    clock = FakeClock()
    # Sessions arriving together: the pause does not end while they are answered.
    monkeypatch.setattr(admin, "PASSWORD_GATE", PasswordGate(
        delay_s=1.0, clock=clock.monotonic, sleep=lambda s: None))
    sessions = [AppTest.from_file(SETTINGS_PAGE, default_timeout=30).run() for _ in range(4)]
    errors = []
    for at in sessions:
        at.text_input(key="admin_password_input").set_value("guess")
        at = at.button(key="sign_in_button").click().run()
        assert not at.exception
        errors += [e.value for e in at.error]
    assert errors[0] == "Wrong password."
    assert errors[1:] == ["Too many password attempts from your address; try again in 1.0 s."] * 3
    clock.advance(1.0)
    at = sessions[1]
    at.text_input(key="admin_password_input").set_value(PASSWORD)
    at = at.button(key="sign_in_button").click().run()
    assert any("Signed in as admin" in s.value for s in at.success)
