"""No answered request without its row: commits before answers, the spill journal, SIGKILL.

Real SQLite files, the simulator over real HTTP; the small filesystem is a real tmpfs
(mounted where this user may mount, skipped with the reason elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest

from core.config import Config
from core.db import Database
from core.errors import StorageError
from core.journal import SpillJournal
from core.models import GenerationRequest
from core.providers.simulator_provider import SimulatorProvider
from core.service import Gyroscope

ROOT = Path(__file__).resolve().parents[1]


def req(i: int, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=f"A tagline for bakery number {i}", max_tokens=8, cache=False, **kw)


def service(tmp_path: Path, simulator, db_path: Path | None = None, spill: Path | None = None) -> Gyroscope:
    db_path = db_path or tmp_path / "g.db"
    cfg = Config(provider="simulator", base_url=None, db_path=db_path, spill_path=spill)
    # A short lock wait keeps the locked-file cases quick; the default is 0.5 s.
    return Gyroscope(cfg, provider=SimulatorProvider(simulator),
                     db=Database(db_path, write_timeout_s=0.05))


def committed_ids(db_path: Path) -> set[str]:
    """Request ids committed in the file, read by a connection of its own (no flush)."""
    conn = sqlite3.connect(db_path)
    try:
        return {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    finally:
        conn.close()


def journal_ids(path: Path) -> set[str]:
    rows, _ = SpillJournal(path).read()
    return {r["request_id"] for r in rows}


@contextlib.contextmanager
def foreign_lock(db_path: Path):
    """Another program holding the file's write lock."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


# -- the answer waits for its commit ---------------------------------------------------------------
def test_every_kind_of_answer_leaves_only_after_its_row_is_committed(tmp_path, simulator):
    gyro = service(tmp_path, simulator)
    sync = gyro.generate(req(1))                                    # blocking path, no loop
    assert sync.request_id in committed_ids(tmp_path / "g.db")

    async def run_async() -> list[str]:
        plain = await gyro.agenerate(req(2))
        assert plain.request_id in committed_ids(tmp_path / "g.db")
        stream = gyro.astream(req(3))
        text = "".join([piece async for piece in stream])
        assert text and stream.result.request_id in committed_ids(tmp_path / "g.db")
        many = await asyncio.gather(*(gyro.agenerate(req(10 + i)) for i in range(50)))
        return [r.request_id for r in many]

    ids = asyncio.run(run_async())
    assert set(ids) <= committed_ids(tmp_path / "g.db")             # one batch or several
    with gyro.stream(req(4)) as stream:                              # the page's sync stream
        assert "".join(p for p in stream if isinstance(p, str))
    assert stream.result.request_id in committed_ids(tmp_path / "g.db")
    gyro.close()


def test_an_error_is_reported_after_its_row_is_committed(tmp_path, simulator):
    gyro = service(tmp_path, simulator)
    simulator.sim.set_faults(auth_error=True)
    with pytest.raises(Exception) as err:
        gyro.generate(req(1))
    result = err.value.result
    assert result.outcome == "error" and result.request_id in committed_ids(tmp_path / "g.db")
    gyro.close()


# -- the spill journal -------------------------------------------------------------------------------
def test_rows_for_a_locked_database_are_spooled_and_replayed(tmp_path, simulator):
    gyro = service(tmp_path, simulator)
    gyro.generate(req(0))                                            # the file exists, works
    with foreign_lock(tmp_path / "g.db"):
        answered = [gyro.generate(req(i)).request_id for i in range(1, 6)]
        status = gyro.history.status()
        assert status["history"] == "spilling" and status["spilled_rows_waiting"] == 5
        assert "locked" in status["history_message"]
        assert set(answered) == journal_ids(tmp_path / "g.db-spill.jsonl")
        gyro.history.replay()                                        # still locked: stays put
        with pytest.raises(StorageError):
            gyro.db.flush()
        assert gyro.history.status()["spilled_rows_waiting"] == 5
    gyro.history.replay()
    gyro.db.flush()
    assert set(answered) <= committed_ids(tmp_path / "g.db")
    assert gyro.history.status() == {"history": "ok", "spilled_rows_waiting": 0, "history_rows_lost": 0}
    assert (tmp_path / "g.db-spill.jsonl").stat().st_size == 0
    gyro.generate(req(9))                                            # and rows go to the file again
    assert gyro.stats()["total_requests"] == 7
    gyro.close()


def test_replaying_twice_inserts_each_row_once(tmp_path, simulator):
    gyro = service(tmp_path, simulator)
    with foreign_lock(tmp_path / "g.db"):
        answered = {gyro.generate(req(i)).request_id for i in range(3)}
    journal = tmp_path / "g.db-spill.jsonl"
    saved = journal.read_bytes()
    gyro.history.replay()
    gyro.db.flush()
    journal.write_bytes(saved + b'{"torn": ')         # as if killed between commit and truncate
    gyro.close()
    again = service(tmp_path, simulator)                             # a restart replays at once
    again.db.flush()
    assert again.stats()["total_requests"] == 3 and committed_ids(tmp_path / "g.db") == answered
    assert again.history.journal.pending == 0
    again.close()


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_row(tmp_path):
    path = tmp_path / "spill.jsonl"
    SpillJournal(path).append([{"request_id": "a"}])
    with path.open("ab") as fh:
        fh.write(b'{"request_id": "to')                 # the process died mid-write
    after_restart = SpillJournal(path)
    after_restart.append([{"request_id": "b"}])
    rows, end = after_restart.read()
    assert [r["request_id"] for r in rows] == ["a", "b"] and end == path.stat().st_size
    after_restart.consume(end)
    assert path.stat().st_size == 0 and after_restart.pending == 0


def test_when_the_journal_fails_too_requests_are_refused_with_what_to_do(tmp_path, simulator):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the journal's folder should be")
    gyro = service(tmp_path, simulator, spill=blocker / "spill.jsonl")
    with foreign_lock(tmp_path / "g.db"):
        with pytest.raises(StorageError) as first:                   # answered by the upstream,
            gyro.generate(req(1))                                    # but not handed out
        assert "spill journal" in first.value.user_message and "locked" in first.value.user_message
        sent = simulator.sim.stats()["chat_requests"]
        with pytest.raises(StorageError) as refused:
            gyro.generate(req(2))
        assert "refused" in refused.value.user_message and "Free space" in refused.value.user_message
        assert simulator.sim.stats()["chat_requests"] == sent       # refused before the upstream
        assert gyro.history.status()["history"] == "refusing"
    gyro.history.replay()                                            # the file takes rows again
    gyro.db.flush()
    assert gyro.generate(req(3)).outcome == "ok"
    assert gyro.history.status()["history"] == "ok"
    gyro.close()


def test_health_says_degraded_and_how_many_rows_wait(tmp_path, simulator, app_env):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    import core.service
    from core.api import routes
    core.service._default = gyro = service(tmp_path, simulator)
    client = TestClient(Starlette(routes=routes()))
    assert client.get("/api/health").json()["status"] == "ok"
    with foreign_lock(tmp_path / "g.db"):
        gyro.generate(req(1))
        health = client.get("/api/health").json()
    assert health["status"] == "degraded" and health["spilled_rows_waiting"] == 1
    gyro.history.replay()
    gyro.db.flush()
    assert client.get("/api/health").json()["status"] == "ok"


# -- a small filesystem ---------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs for the database."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the full-disk case needs one")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=10)


def fill(directory: Path) -> Path:
    """Fill the filesystem to the last byte; returns the filler to delete."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0"):
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_spools_rows_elsewhere_and_replays_them(tmp_path, simulator, small_fs):
    spill = tmp_path / "spill.jsonl"                                 # on another filesystem
    gyro = service(tmp_path, simulator, db_path=small_fs / "g.db", spill=spill)
    gyro.generate(req(0))
    filler = fill(small_fs)
    answered = {gyro.generate(req(i)).request_id for i in range(1, 300)}   # none refused
    waiting = gyro.history.status()["spilled_rows_waiting"]
    assert waiting > 0 and gyro.history.status()["history"] == "spilling"
    assert "full" in gyro.history.status()["history_message"]
    filler.unlink()
    gyro.history.replay()
    gyro.db.flush()
    assert answered <= committed_ids(small_fs / "g.db")
    assert gyro.history.status()["spilled_rows_waiting"] == 0 and gyro.history.lost_rows == 0
    gyro.close()


def test_a_full_disk_with_the_journal_beside_the_database_refuses_requests(tmp_path, simulator, small_fs):
    gyro = service(tmp_path, simulator, db_path=small_fs / "g.db")  # journal beside it (default)
    gyro.generate(req(0))
    filler = fill(small_fs)
    answered, refused = set(), []
    for i in range(1, 300):
        try:
            answered.add(gyro.generate(req(i)).request_id)
        except StorageError as exc:
            refused.append(exc.user_message)
    assert refused and "full" in refused[-1] and "GYROSCOPE_SPILL" in refused[-1]
    filler.unlink()
    gyro.history.replay()
    gyro.db.flush()
    gyro.generate(req(999))                                          # accepted again
    assert answered <= committed_ids(small_fs / "g.db") | journal_ids(small_fs / "g.db-spill.jsonl")
    gyro.close()


def immutable(paths: list[Path], on: bool) -> None:
    """chattr +i / -i: no writes to these files, not even through open descriptors, not even root's."""
    try:
        subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        if on:
            pytest.skip(f"cannot make files immutable here ({exc}); the read-only case needs it")


def test_a_database_that_turned_read_only_spools_and_replays(tmp_path, simulator):
    # A read-only remount is refused while files are open for writing ("busy"), so the
    # files themselves are made unwritable: the database and its write-ahead log.
    gyro = service(tmp_path, simulator)
    gyro.generate(req(0))
    files = [tmp_path / "g.db", tmp_path / "g.db-wal"]
    immutable(files, True)
    try:
        answered = {gyro.generate(req(i)).request_id for i in range(1, 4)}
        assert gyro.history.status()["spilled_rows_waiting"] == 3
        gyro.history.replay()                                        # still read-only: stays put
        with contextlib.suppress(StorageError):     # raises unless the replay failed already
            gyro.db.flush()
        assert gyro.history.status()["spilled_rows_waiting"] == 3
        assert not answered & committed_ids(tmp_path / "g.db")
    finally:
        immutable(files, False)
    gyro.history.replay()
    gyro.db.flush()
    assert answered <= committed_ids(tmp_path / "g.db") and gyro.history.status()["history"] == "ok"
    gyro.close()


# -- SIGKILL under load ------------------------------------------------------------------------------
SERVER = """
import socket, uvicorn
from starlette.applications import Starlette
from core.api import routes, lifespan
sock = socket.socket(); sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(Starlette(routes=routes(), lifespan=lifespan), log_level="error")).run(sockets=[sock])
"""

CLI_RUN = """
import os, sys, threading
from core.models import GenerationRequest
from core.service import Gyroscope
gyro = Gyroscope()
def work(t):
    for i in range(100000):
        r = GenerationRequest(prompt=f"cli {t} {i}", max_tokens=8, cache=False, source="cli")
        if i % 2:
            result = gyro.generate(r)                       # the blocking path
        else:
            with gyro.stream(r) as s:                       # the portal loop's path
                "".join(p for p in s if isinstance(p, str))
            result = s.result
        os.write(1, (result.request_id + "\\n").encode())   # only now is it answered
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def child_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GYROSCOPE_PROVIDER", "GYROSCOPE_API_TOKEN")}
    env.update(GYROSCOPE_DB=str(tmp_path / "kill.db"), GYROSCOPE_SIM_TTFT_MS="1",
               GYROSCOPE_SIM_TOKENS_PER_S="0", PYTHONPATH=str(ROOT))
    return env


async def load_api(base: str, answered: list[str], stop: asyncio.Event) -> None:
    """64 clients sending plain and streamed requests until the server dies."""
    async with httpx2.AsyncClient(base_url=base, timeout=10,
                                  limits=httpx2.Limits(max_connections=64)) as client:
        async def one(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"prompt": f"kill test {n} {i}", "max_tokens": 8, "cache": False}
                try:
                    if i % 2:
                        resp = await client.post("/api/generate", json=body)
                        if resp.status_code == 200:
                            answered.append(resp.json()["request_id"])
                    else:
                        body["stream"] = True
                        async with client.stream("POST", "/api/generate", json=body) as resp:
                            text = "".join([chunk async for chunk in resp.aiter_text()])
                        if "event: done" in text:
                            done = text.split("event: done\ndata: ", 1)[1].split("\n", 1)[0]
                            answered.append(json.loads(done)["request_id"])
                except (httpx2.HTTPError, ValueError, IndexError):
                    if stop.is_set():
                        return                               # the server is gone (mid-answer)
                    await asyncio.sleep(0.05)                # slow under load: again (not killed yet)
        await asyncio.gather(*(one(n) for n in range(64)))


@pytest.mark.parametrize("run", range(5))
def test_sigkill_of_the_api_server_under_load_loses_no_answered_row(tmp_path, run):
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=tmp_path, env=child_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the API server did not answer its health check in 60 s"
            time.sleep(0.02)
        answered: list[str] = []

        async def main() -> None:
            stop = asyncio.Event()
            loader = asyncio.create_task(load_api(base, answered, stop))
            while len(answered) < 60 + 10 * run:                       # under load, then...
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)                          # ...killed mid-flight
            stop.set()
            await loader
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        proc.kill()
        proc.wait()
    lost = unrecorded(tmp_path, answered)
    assert len(answered) >= 60 and not lost, f"{len(lost)} of {len(answered)} answered rows lost"


def unrecorded(tmp_path: Path, answered: list[str]) -> set[str]:
    """Answered request ids with a row neither in the killed process's database nor its journal."""
    db = tmp_path / "kill.db"
    return set(answered) - committed_ids(db) - journal_ids(db.with_name("kill.db-spill.jsonl"))


@pytest.mark.parametrize("run", range(5))
def test_sigkill_of_a_cli_run_under_load_loses_no_answered_row(tmp_path, run):
    proc = subprocess.Popen([sys.executable, "-c", CLI_RUN], cwd=tmp_path, env=child_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    answered: list[str] = []
    try:
        def read() -> None:
            for line in proc.stdout:
                answered.append(line.decode().strip())
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while len(answered) < 40 + 10 * run and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()                                                    # SIGKILL mid-run
        reader.join(10)
    finally:
        proc.kill()
        proc.wait()
    lost = unrecorded(tmp_path, answered)
    assert len(answered) >= 40 and not lost, f"{len(lost)} of {len(answered)} answered rows lost"
