"""Storage: cache keys, TTL/LRU, history rows under concurrency and SIGKILL, day buckets,
settings validation and audit, bad database files. Real SQLite files in a temp dir."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from zoneinfo import ZoneInfo

import pytest

from core.cache import ResponseCache, cache_key, normalize_whitespace
from core.db import Database, storage_error
from core.errors import InvalidParameter, StorageError
from core.history import Filters, History, RequestRecord, insert_fn
from core.settings import SETTINGS, SettingsStore
from tests.support import FakeClock

BASE = dict(provider="openai", base_url="https://api.example/v1", model="gpt-4o-mini",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            temperature=0.7, top_p=None, max_tokens=100, seed=None, stop=None,
            response_format=None, tools=None)


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "g.db")
    yield database
    database.close()


@pytest.fixture
def settings(db):
    return SettingsStore(db, ttl=0)


# -- cache keys: every parameter that can change the output changes the key ------------------
@pytest.mark.parametrize("field,value", [
    ("provider", "simulator"), ("base_url", "http://localhost:8000/v1"), ("model", "gpt-4o"),
    ("messages", [{"role": "system", "content": "Be long."}, {"role": "user", "content": "Hi"}]),
    ("messages", [{"role": "user", "content": "Hi"}]),
    ("messages", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]),
    ("temperature", 0.8), ("top_p", 0.9), ("max_tokens", 101), ("seed", 7), ("stop", ["\n"]),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
])
def test_cache_key_changes_with_every_parameter(field, value):
    assert cache_key(**{**BASE, field: value}) != cache_key(**BASE)


def test_cache_key_is_stable_and_ignores_dict_order():
    assert cache_key(**BASE) == cache_key(**dict(reversed(list(BASE.items()))))
    assert len(cache_key(**BASE)) == 64


def test_whitespace_normalisation_is_opt_in_and_keeps_code():
    a = {**BASE, "messages": [{"role": "user", "content": "Write  a\n\npoem ```x  =  1```"}]}
    b = {**BASE, "messages": [{"role": "user", "content": "Write a poem ```x  =  1```"}]}
    c = {**BASE, "messages": [{"role": "user", "content": "Write a poem ```x = 1```"}]}
    assert cache_key(**a) != cache_key(**b)
    assert cache_key(**a, normalize=True) == cache_key(**b, normalize=True)
    assert cache_key(**b, normalize=True) != cache_key(**c, normalize=True)
    assert normalize_whitespace(" a \t b `x  y` ") == "a b `x  y`"


def _answer(content="Hello there.", cost=0.001):
    return dict(provider="openai", model="gpt-4o-mini", content=content, finish_reason="stop",
                prompt_tokens=10, completion_tokens=3, cost=cost)


def test_cache_ttl_with_injected_clock(db, settings):
    clock = FakeClock()
    cache = ResponseCache(db, settings, clock=clock.time)
    settings.set("cache.ttl_s", 60)
    cache.put("k", **_answer())
    assert cache.get("k").content == "Hello there."
    clock.advance(59)
    assert cache.get("k") is not None
    clock.advance(2)
    assert cache.get("k") is None
    db.flush()
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 1, 1)


def test_cache_evicts_least_recently_used(db, settings):
    clock = FakeClock()
    cache = ResponseCache(db, settings, clock=clock.time)
    settings.set("cache.max_entries", 3)
    for key in "abc":
        cache.put(key, **_answer(content=key))
        clock.advance(1)
    assert cache.get("a") is not None       # a becomes the most recently used
    db.flush()
    clock.advance(1)
    cache.put("d", **_answer(content="d"))  # evicts b, the least recently used
    assert cache.get("b") is None
    assert [cache.get(k) is not None for k in "acd"] == [True, True, True]
    assert cache.stats()["entries"] == 3


def test_cache_clear_all_or_older_than(db, settings):
    clock = FakeClock()
    cache = ResponseCache(db, settings, clock=clock.time)
    cache.put("old", **_answer())
    clock.advance(100)
    cache.put("new", **_answer())
    assert cache.clear(before=clock.time() - 50) == 1
    assert cache.get("old") is None and cache.get("new") is not None
    assert cache.clear() == 1
    assert cache.stats()["entries"] == 0


# -- history ------------------------------------------------------------------------------
def _record(i: int, **kw) -> RequestRecord:
    return RequestRecord(ts=kw.pop("ts", time.time()), request_id=f"r{i}", model=kw.pop("model", "gpt-4o-mini"),
                         **kw)


def test_thousand_concurrent_writers_from_threads_and_an_event_loop(db):
    history = History(db)
    errors: list[BaseException] = []

    def worker(start: int) -> None:
        try:
            for i in range(start, start + 50):
                history.record(_record(i))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    async def loop_writers() -> None:
        await asyncio.gather(*(db.awrite(insert_fn(_record(i))) for i in range(500, 1000)))

    threads = [threading.Thread(target=worker, args=(n * 50,)) for n in range(10)]
    for t in threads:
        t.start()
    asyncio.run(loop_writers())
    for t in threads:
        t.join()
    assert errors == []
    assert db.query_one("SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM requests") == {"n": 1000, "d": 1000}


def test_two_processes_write_one_file_without_losing_rows(tmp_path):
    path = tmp_path / "shared.db"
    Database(path).close()
    script = textwrap.dedent(f"""
        import sys
        from core.db import Database, storage_error
        from core.history import History, RequestRecord
        db = Database({str(path)!r}); h = History(db)
        futs = [h.submit(RequestRecord(ts=1.0, request_id=sys.argv[1] + str(i))) for i in range(300)]
        [f.result() for f in futs]
        db.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("a", "b")]
    assert [p.wait(60) for p in procs] == [0, 0]
    db = Database(path)
    assert db.query_one("SELECT count(*) AS n FROM requests")["n"] == 600
    db.close()


def test_sigkill_mid_load_keeps_every_answered_row(tmp_path):
    path = tmp_path / "kill.db"
    ack = tmp_path / "acks.txt"
    script = textwrap.dedent(f"""
        import itertools
        from core.db import Database, storage_error
        from core.history import History, RequestRecord
        db = Database({str(path)!r}); h = History(db)
        with open({str(ack)!r}, "a", buffering=1) as out:
            for i in itertools.count():
                h.record(RequestRecord(ts=1.0, request_id=f"k{{i}}"))   # committed...
                out.write(f"k{{i}}\\n")                                  # ...then 'answered'
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and (not ack.exists() or len(ack.read_text().splitlines()) < 300):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    answered = [line for line in ack.read_text().splitlines() if line]
    assert len(answered) >= 300
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    assert set(answered) <= stored
    conn.close()
    Database(path).close()   # and it opens cleanly through the normal path


def test_day_buckets_follow_the_viewers_zone_far_from_utc(db):
    history = History(db)
    zone = ZoneInfo("Pacific/Kiritimati")   # UTC+14
    # 10:30 UTC on Nov 24 is 00:30 Nov 25 in Kiritimati; 09:30 UTC is still Nov 24 there.
    late = dt.datetime(2026, 11, 24, 10, 30, tzinfo=dt.timezone.utc).timestamp()
    early = dt.datetime(2026, 11, 24, 9, 30, tzinfo=dt.timezone.utc).timestamp()
    history.record(_record(1, ts=late, cost=1.0))
    history.record(_record(2, ts=early, cost=2.0))
    start = dt.datetime(2026, 11, 20, tzinfo=zone).timestamp()
    end = dt.datetime(2026, 11, 28, tzinfo=zone).timestamp()
    local = {r["bucket"]: r["cost"] for r in history.daily_cost_by_model(Filters(start, end, tz="Pacific/Kiritimati"))}
    assert local == {"2026-11-24": 2.0, "2026-11-25": 1.0}
    utc = {r["bucket"]: r["cost"] for r in history.daily_cost_by_model(Filters(start, end, tz="UTC"))}
    assert utc == {"2026-11-24": 3.0}


def test_day_buckets_across_a_dst_change(db):
    history = History(db)
    zone = ZoneInfo("America/New_York")   # DST ends 2026-11-01 02:00 local
    for day, hour in ((31, 23), (1, 23), (2, 0)):
        month = 10 if day == 31 else 11
        ts = dt.datetime(2026, month, day, hour, 30, tzinfo=zone).timestamp()
        history.record(_record(day * 100 + hour, ts=ts, cost=1.0))
    start = dt.datetime(2026, 10, 30, tzinfo=zone).timestamp()
    end = dt.datetime(2026, 11, 4, tzinfo=zone).timestamp()
    rows = history.daily_cost_by_model(Filters(start, end, tz="America/New_York"))
    assert {r["bucket"]: r["cost"] for r in rows} == {"2026-10-31": 1.0, "2026-11-01": 1.0, "2026-11-02": 1.0}


def test_totals_and_bad_filters(db):
    history = History(db)
    history.record(_record(1, cost=0.5, prompt_tokens=10, completion_tokens=5, latency_ms=100))
    history.record(_record(2, from_cache=True, cost=0.0, cost_saved=0.5, prompt_tokens=10,
                           completion_tokens=5, latency_ms=1))
    history.record(_record(3, outcome="error", error_kind="server_error", attempts=4))
    t = history.totals()
    assert (t["total_requests"], t["cached_requests"], t["failed_requests"]) == (3, 1, 1)
    assert t["total_cost"] == 0.5 and t["total_tokens"] == 30 and t["cost_saved"] == 0.5
    assert t["cache_hit_rate"] == 0.5 and t["average_cost"] == 0.25 and t["failure_rate"] == 1 / 3
    with pytest.raises(InvalidParameter, match="end of the range"):
        Filters(start=10, end=5)
    with pytest.raises(InvalidParameter, match="time zone"):
        Filters(tz="Mars/Olympus")
    # Filter values are parameters, never SQL.
    assert history.totals(Filters(models=("x' OR 1=1 --",)))["total_requests"] == 0


# -- settings -----------------------------------------------------------------------------
def test_every_setting_has_help_group_and_a_valid_default():
    names = {s.name for s in SETTINGS}
    for required in ("retry.max_retries", "retry.base_delay_s", "retry.max_delay_s", "retry.multiplier",
                     "retry.jitter", "retry.deadline_s", "breaker.fail_max", "breaker.reset_timeout_s",
                     "breaker.half_open_max_calls", "breaker.success_threshold", "timeout.connect_s",
                     "timeout.read_s", "cache.enabled", "cache.ttl_s", "cache.max_entries",
                     "optimizer.enabled", "provider.default_model"):
        assert required in names
    for s in SETTINGS:
        assert s.help and s.group
        assert s.parse(s.default) == s.default


@pytest.mark.parametrize("name,value,message", [
    ("retry.max_retries", 11, "at most 10"), ("retry.max_retries", -1, "at least 0"),
    ("retry.max_retries", "three", "whole number"), ("retry.max_retries", 2.5, "whole number"),
    ("cache.enabled", "maybe", "true or false"), ("retry.jitter", "nan", "a number"),
    ("timeout.read_s", True, "a number"), ("no.such", 1, "Unknown setting"),
])
def test_invalid_settings_are_refused_and_change_nothing(settings, name, value, message):
    before = dict(settings.snapshot())
    with pytest.raises(InvalidParameter, match=message):
        settings.set(name, value)
    assert dict(settings.snapshot()) == before
    assert settings.audit() == []


def test_settings_changes_are_versioned_and_audited(settings):
    v1 = settings.set("retry.max_retries", "5", actor="alice")
    v2 = settings.set_many({"breaker.fail_max": 3, "cache.enabled": "false"}, actor="bob")
    assert v2 == v1 + 1
    snap = settings.snapshot()
    assert (snap["retry.max_retries"], snap["breaker.fail_max"], snap["cache.enabled"]) == (5, 3, False)
    audit = settings.audit()
    assert [(a["name"], a["old"], a["new"], a["actor"]) for a in audit] == [
        ("cache.enabled", "true", "false", "bob"), ("breaker.fail_max", "5", "3", "bob"),
        ("retry.max_retries", "3", "5", "alice")]


def test_a_batch_with_one_bad_value_is_not_half_applied(settings):
    with pytest.raises(InvalidParameter):
        settings.set_many({"retry.max_retries": 1, "breaker.fail_max": 0})
    assert settings.get("retry.max_retries") == 3


def test_a_second_process_sees_a_change(tmp_path):
    path = tmp_path / "s.db"
    db = Database(path)
    store = SettingsStore(db, ttl=0.2)
    assert store.get("breaker.fail_max") == 5
    subprocess.run([sys.executable, "-m", "core", "settings", "set", "breaker.fail_max", "9"],
                   env={**os.environ, "GYROSCOPE_DB": str(path)}, check=True, capture_output=True)
    deadline = time.time() + 2
    while store.get("breaker.fail_max") != 9 and time.time() < deadline:
        time.sleep(0.05)
    assert store.get("breaker.fail_max") == 9
    db.close()


# -- bad database files -------------------------------------------------------------------
def test_corrupt_file_gets_a_clear_message(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match=r"corrupt\.db.*not a valid SQLite database.*Move it aside"):
        Database(path)
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_read_only_file_gets_a_clear_message(tmp_path):
    path = tmp_path / "ro.db"
    Database(path).close()
    # Root ignores file modes, so provoke SQLite's own read-only error through a read-only open.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as info:
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
    err = storage_error(info.value, path)
    assert "ro.db cannot be written" in err.user_message and "GYROSCOPE_DB" in err.user_message


def test_locked_file_fails_the_write_with_a_message_and_no_half_row(tmp_path):
    db = Database(tmp_path / "locked.db", busy_timeout_s=0.1)
    history = History(db)
    blocker = sqlite3.connect(db.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError, match=r"locked\.db is locked by another program"):
            history.record(_record(1))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert db.query_one("SELECT count(*) AS n FROM requests")["n"] == 0
    history.record(_record(2))       # and the writer recovers once the lock is gone
    assert db.query_one("SELECT count(*) AS n FROM requests")["n"] == 1
    db.close()


def test_a_cancelled_write_is_skipped_and_the_writer_survives(db):
    gate = threading.Event()
    busy = db.submit(lambda conn: gate.wait(5))
    ran = []
    cancelled = db.submit(lambda conn: ran.append(1))
    assert cancelled.cancel()
    gate.set()
    busy.result(5)
    db.write(lambda conn: conn.execute("INSERT INTO meta (key, value) VALUES ('alive', '1')"))
    assert ran == [] and db.query_one("SELECT value FROM meta WHERE key = 'alive'") == {"value": "1"}


def test_concurrent_edits_of_one_setting_last_write_wins_and_all_are_audited(tmp_path):
    path = tmp_path / "edits.db"
    stores = [SettingsStore(Database(path), ttl=0) for _ in range(2)]   # two "processes"
    def edit(store, values, actor):
        for v in values:
            store.set("retry.max_retries", v, actor=actor)
    threads = [threading.Thread(target=edit, args=(stores[0], [1, 2, 3, 4, 5] * 4, "alice")),
               threading.Thread(target=edit, args=(stores[1], [6, 7, 8, 9, 10] * 4, "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit = list(reversed(stores[0].audit(limit=100)))       # oldest first
    assert len(audit) == 40
    assert [int(a["version"]) for a in audit] == list(range(1, 41))
    for before, after in zip(audit, audit[1:]):               # a chain: nothing half-applied
        assert after["old"] == before["new"]
    final = int(audit[-1]["new"])
    assert stores[0].get("retry.max_retries") == stores[1].get("retry.max_retries") == final
    for s in stores:
        s.db.close()


# -- lazy writes: the request path's rows share commits and never wait for one ----------------
def test_a_lone_row_commits_at_once_and_rows_of_concurrent_requests_share_the_writers_commit(tmp_path):
    db = Database(tmp_path / "lazy.db", linger_s=60)     # no test waits that long
    history = History(db)
    history.begin_run()
    ticket = history.add(_record(0))              # alone, the writer idle: committed right here
    assert ticket.done and ticket.error is None
    assert db.query_one("SELECT count(*) AS n FROM requests")["n"] == 1
    for _ in range(20):                           # twenty requests in flight at once
        history.begin_run()
    tickets = [history.add(_record(i)) for i in range(1, 21)]
    for t in tickets:
        history.wait(t)                           # each settles once its batch is committed
    assert db.query_one("SELECT count(*) AS n FROM requests")["n"] == 21
    inline = db._inline_commits
    assert inline <= 2                 # the first request's, and perhaps the last of the twenty
    assert history._running == []      # (alone by then, if the writer was idle); the rest shared
    history.begin_run()                # one request after another: each row commits at once
    history.add(_record(21))
    history.begin_run()
    history.add(_record(22))
    assert db._inline_commits == inline + 2
    db.close()


def test_a_bad_lazy_row_is_counted_and_logged_and_its_batch_is_kept(tmp_path, caplog):
    db = Database(tmp_path / "bad.db", linger_s=60)
    history = History(db)
    history.add(_record(1))
    history.add(_record(1))                               # same request_id: the unique index refuses it
    history.add(_record(2))
    db.flush()
    assert sorted(r["request_id"] for r in db.query("SELECT request_id FROM requests")) == ["r1", "r2"]
    assert history.lost_rows == 1 and "UNIQUE constraint failed" in history.last_loss
    assert "history row(s) were not saved" in caplog.text
    db.close()


def test_rows_still_queued_when_the_process_exits_are_committed(tmp_path):
    path = tmp_path / "exit.db"
    script = textwrap.dedent(f"""
        from core.db import Database
        from core.history import History, RequestRecord
        History(Database({str(path)!r}, linger_s=60)).add(RequestRecord(ts=1.0, request_id="at-exit"))
    """)                                                  # no close(): the exit hook commits it
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT request_id FROM requests").fetchall() == [("at-exit",)]
    conn.close()
