"""The event loop never waits on SQLite: another process locks the database file and the
API still answers (real HTTP, a real second process holding a real lock).

Two locks, because in WAL mode they block different things (checked on this machine):
- ``BEGIN EXCLUSIVE`` takes the write lock: readers go on, every writer waits. It can be
  taken while Gyroscope runs.
- ``PRAGMA locking_mode=EXCLUSIVE`` plus a write takes the whole file: readers wait too.
  SQLite grants it only while no other connection has the file open, so it meets a
  Gyroscope that is starting (or one whose connections are all closed).
The bounds below are generous (the locks last until the test releases them, the busy
timeout is 10 s); the measured latencies are in docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette

import core.service
from core import api
from core.breaker import SQLiteBreakerStorage
from core.cache import ResponseCache
from core.db import Database
from core.settings import SettingsStore
from support import FakeClock, hold_lock, release
from test_foundation import _post, _serve

BOUND_S = 2.0       # well under the busy timeout, far above the ~ms these take


def timed_get(url: str) -> tuple[int, dict, float]:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), time.perf_counter() - t
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), time.perf_counter() - t


def test_a_write_lock_holds_up_neither_health_nor_requests(app_env):
    gyro = core.service.default_service()
    url, server = _serve(Starlette(routes=api.routes()))
    try:
        assert _post(url + "/api/generate", {"prompt": "Warm up", "max_tokens": 5})[0] == 200
        assert timed_get(url + "/api/stats")[0] == 200
        sent = gyro.provider.sim.stats()["chat_requests"]
        holder = hold_lock(gyro.db.path, "write")
        try:
            t = time.perf_counter()
            status, body = _post(url + "/api/generate", {"prompt": "Name a river", "max_tokens": 8})
            assert status == 200 and json.loads(body)["outcome"] == "ok"
            assert json.loads(body)["from_cache"] is False      # the lookup missed: upstream
            assert time.perf_counter() - t < BOUND_S
            # The row could not wait for the file: it went to the spill journal, and health
            # (from memory, at once) says so while the lock is held.
            status, body, took = timed_get(url + "/api/health")
            assert status == 200 and took < BOUND_S and holder.poll() is None
            assert body["status"] == "degraded" and body["spilled_rows_waiting"] == 1
        finally:
            release(holder)
        # Once the file is free the journal is replayed (at most a second after the last
        # try, started by a request or a health probe): the row is in history, none lost.
        for _ in range(100):
            status, body, _ = timed_get(url + "/api/health")
            if body["spilled_rows_waiting"] == 0:
                break
            time.sleep(0.1)
        assert body["status"] == "ok" and body["history_rows_lost"] == 0
        status, body, _ = timed_get(url + "/api/stats")
        assert status == 200 and body["total_requests"] == 2     # it saw its row
        assert gyro.provider.sim.stats()["chat_requests"] == sent + 1
    finally:
        server.should_exit = True


def test_stats_answer_while_the_file_stays_locked_and_the_loop_goes_on(app_env):
    gyro = core.service.default_service()
    url, server = _serve(Starlette(routes=api.routes()))
    try:
        holder = hold_lock(gyro.db.path, "write")
        try:        # the request's row goes to the spill journal; nothing is left for
                    # stats to commit first, and reads go on beside a write lock (WAL)
            assert _post(url + "/api/generate", {"prompt": "A row to spool", "max_tokens": 5})[0] == 200
            status, body, took = timed_get(url + "/api/stats")
            assert status == 200 and took < BOUND_S and holder.poll() is None
            status, body, took = timed_get(url + "/api/health")
            assert status == 200 and took < BOUND_S and body["spilled_rows_waiting"] == 1
        finally:
            release(holder)
    finally:
        server.should_exit = True


def test_health_answers_while_a_locked_file_keeps_the_service_from_starting(app_env):
    path = app_env / "app.db"
    Database(path).close()                  # the file exists; nothing of ours holds it open
    url, server = _serve(Starlette(routes=api.routes()))
    try:
        holder = hold_lock(path, "file")
        try:
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(_post, url + "/api/generate", {"prompt": "Hello", "max_tokens": 5})
                time.sleep(0.2)
                status, body, took = timed_get(url + "/api/health")
                assert status == 200 and body["status"] == "starting" and took < BOUND_S
                assert body["provider"] == "simulator"
                assert holder.poll() is None
                release(holder)
                assert answer.result()[0] == 200       # served once the file opens
        finally:
            release(holder)
        status, body, _ = timed_get(url + "/api/health")
        assert status == 200 and body["status"] == "ok"
    finally:
        server.should_exit = True


def test_reads_on_the_loop_path_do_not_wait_for_a_locked_file(tmp_path):
    """Settings keep their last good snapshot, a cache lookup is a miss and a breaker keeps
    its view, at once, while the whole file is locked (not after the 10 s busy timeout)."""
    db = Database(tmp_path / "g.db")
    clock = FakeClock()
    settings = SettingsStore(db, clock=clock.monotonic)
    cache = ResponseCache(db, settings, clock=clock.time)
    breaker = SQLiteBreakerStorage(db, "sim|m")
    seen = {}

    def use_once() -> None:
        # Connections are per thread and close with it: this thread's go when it ends, so
        # the second process can take the whole file (SQLite grants that only to the sole user).
        settings.set("retry.max_retries", 5, actor="test")
        cache.put("k1", provider="simulator", model="m", content="cached answer", finish_reason="stop",
                  prompt_tokens=1, completion_tokens=2, cost=0.0)
        seen["retries"] = settings.snapshot()["retry.max_retries"]
        seen["hit"] = cache.get("k1").content
        seen["state"] = breaker.state
    worker = threading.Thread(target=use_once)
    worker.start()
    worker.join()
    gc.collect()            # a sqlite3 connection sits in a reference cycle (its statement cache)
    db.close()                              # the writer's connection too (nothing is queued)
    assert seen == {"retries": 5, "hit": "cached answer", "state": "closed"}

    holder = hold_lock(tmp_path / "g.db", "file")
    try:
        clock.advance(10)                   # past the settings' and the cache's re-read times
        t = time.perf_counter()
        assert settings.snapshot()["retry.max_retries"] == 5
        assert cache.get("k1") is None
        assert breaker.state == "closed"
        assert time.perf_counter() - t < BOUND_S
        assert holder.poll() is None
    finally:
        release(holder)


def test_a_half_open_probe_under_a_foreign_write_lock_refuses_at_once(tmp_path):
    """Taking a probe slot is a write on the event loop: under another program's write lock
    it gives up after PROBE_LOCK_WAIT_S and refuses (it never probes blind), instead of
    holding the loop for a busy timeout; once the lock is gone the probe goes ahead."""
    from core.breaker import PROBE_LOCK_WAIT_S
    from core.errors import CircuitOpen
    from test_breaker import Upstream

    clock = FakeClock()
    up = Upstream(tmp_path / "g.db", clock)
    up.fail(50)
    clock.advance(31)                       # past the reset timeout: the next call probes
    up.db.flush()
    holder = hold_lock(tmp_path / "g.db", "write")
    try:
        t = time.perf_counter()
        try:
            up.breaker.acquire()
            raise AssertionError("a probe went ahead without its slot")
        except CircuitOpen as exc:
            assert exc.retry_in_s is not None
        assert time.perf_counter() - t < 10 * PROBE_LOCK_WAIT_S + 0.5   # not the 1 s busy wait
        assert holder.poll() is None
    finally:
        release(holder)
    probe = up.breaker.acquire()
    assert probe.probe and probe.lease is not None
    up.breaker.success(probe)
    assert up.state == "closed"


def test_stats_past_their_time_limit_answer_503_saying_what_to_do(app_env, monkeypatch):
    """Stats run in the off-loop workers; while those are all busy (as they are while a
    locked file holds every read), the answer is a 503 that says to try again."""
    from core import portal
    url, server = _serve(Starlette(routes=api.routes()))
    release = threading.Event()
    try:
        assert _post(url + "/api/generate", {"prompt": "A row", "max_tokens": 5})[0] == 200
        monkeypatch.setattr(api, "STATS_TIMEOUT_S", 0.2)
        busy = [portal._blocking.submit(release.wait, 30) for _ in range(portal._blocking._max_workers)]
        status, body, took = timed_get(url + "/api/stats")
        assert status == 503 and body["error"]["kind"] == "storage"
        assert "Try again" in body["error"]["message"] and body["error"]["retry_in_s"] == 5.0
        release.set()
        assert all(b.result(10) for b in busy)
        status, body, _ = timed_get(url + "/api/stats")       # the stats left behind finished
        assert status == 200 and body["total_requests"] >= 1
    finally:
        release.set()
        server.should_exit = True
