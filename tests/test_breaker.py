"""The breaker's trip rules, fed outcomes with a fake clock (as resilience4j's tests do), on a
real SQLite file; then, at the default settings, a 503 storm and a full outage from the
simulator over real HTTP with the real openai client. Nothing sleeps: waits go through a
FakeClock."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from core import errors
from core.breaker import CLOSED, HALF_OPEN, OPEN, OPEN_FOR_BOUNDS_S, Breakers
from core.config import Config
from core.db import Database
from core.history import History
from core.models import GenerationRequest
from core.providers.simulator_provider import SimulatorProvider
from core.service import Gyroscope
from core.settings import BY_NAME, SettingsStore
from core.simulator import Simulator, start_in_background
from tests.support import FakeClock


class Upstream:
    """One breaker on a real file, fed outcomes by hand."""

    def __init__(self, path, clock: FakeClock, db: Database | None = None, **settings) -> None:
        self.db = db or Database(path)
        self.settings = SettingsStore(self.db, ttl=0)
        if settings:
            self.settings.set_many(settings, actor="test")
        self.breakers = Breakers(self.db, self.settings, History(self.db), clock=clock.time)
        self.breaker = self.breakers.get("https://upstream.test/v1", "model-a")

    def ok(self, n: int = 1) -> None:
        for _ in range(n):
            self.breaker.success(self.breaker.acquire())

    def fail(self, n: int = 1, retry_in_s: float | None = None) -> None:
        for _ in range(n):
            self.breaker.failure(self.breaker.acquire(), "server_error", retry_in_s)

    def feed(self, pattern: str, times: int = 1) -> None:
        """'F' a failed attempt, '.' a successful one."""
        for _ in range(times):
            for c in pattern:
                self.fail() if c == "F" else self.ok()

    @property
    def state(self) -> str:
        return self.breaker.info()["state"]

    def events(self) -> list[dict]:
        self.db.flush()
        return self.db.query("SELECT old, new, cause FROM events WHERE kind = 'breaker' ORDER BY id")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def up(tmp_path, clock):
    u = Upstream(tmp_path / "b.db", clock)
    yield u
    u.db.close()


# -- the rate rule (the default) --------------------------------------------------------------
def test_defaults_are_a_rate_of_half_the_last_100_attempts_once_50_were_seen():
    assert [BY_NAME[n].default for n in ("breaker.mode", "breaker.failure_rate_threshold",
                                         "breaker.window_size", "breaker.minimum_calls")] == [
        "rate", 50.0, 100, 50]


def test_nothing_opens_before_the_minimum_number_of_attempts(up):
    up.fail(49)
    assert up.state == CLOSED
    up.fail()
    assert up.state == OPEN
    [event] = up.events()
    assert (event["old"], event["new"]) == (CLOSED, OPEN)
    assert event["cause"] == "50 of the last 50 attempts failed (100% >= 50%; last: server_error)"


def test_a_rate_below_the_threshold_never_opens_however_long_it_lasts(up):
    up.feed("F..F..F...", times=300)        # 30 % of 3000 attempts
    assert up.state == CLOSED and up.events() == []
    info = up.breaker.info()
    assert (info["window_calls"], info["window_failures"]) == (100, 30)


def test_the_threshold_is_reached_at_exactly_that_rate(up):
    up.feed(".F", times=24)                 # 24 of 48: half, but below the minimum
    up.ok()
    up.fail()                               # 25 of 50 = 50 %
    assert up.state == OPEN


def test_just_under_the_threshold_stays_closed(up):
    up.feed(".", times=51)
    up.fail(49)                             # 49 of the last 100
    assert up.state == CLOSED
    up.fail()                               # the window slides: 50 of the last 100
    assert up.state == OPEN


def test_fast_failures_in_a_burst_are_weighed_against_the_attempts_still_running(up):
    burst = [up.breaker.acquire() for _ in range(100)]     # 100 attempts sent at once
    for permit in burst[:30]:                               # the 503s come back first
        up.breaker.failure(permit, "server_error")
    for permit in burst[30:50]:
        up.breaker.success(permit)
    up.fail()                           # of the last 100 sent, 50 finished and 30 failed
    info = up.breaker.info()
    assert up.state == CLOSED and (info["window_calls"], info["window_failures"], info["window_running"]) == (
        50, 30, 50)                     # 60 % of those finished, 30 % of those sent


def test_old_outcomes_slide_out_of_the_window(up):
    up.fail(40)
    up.ok(100)                              # the 40 failures are gone from the last 100
    up.fail(40)
    assert up.state == CLOSED and up.breaker.info()["window_failures"] == 40


def test_threshold_window_and_minimum_are_live_settings(up):
    up.settings.set_many({"breaker.failure_rate_threshold": 25, "breaker.window_size": 20,
                          "breaker.minimum_calls": 8}, actor="test")
    up.feed("...F", times=2)                # 2 of 8: 25 %, at the new threshold
    assert up.state == OPEN


def test_every_transition_starts_a_new_window(up, clock):
    up.fail(50)
    clock.advance(31)
    up.ok()                                 # the probe closes it
    assert up.state == CLOSED and up.breaker.info()["window_calls"] == 0
    up.fail()                               # one failure after recovery is 1 of 1, below the minimum
    assert up.state == CLOSED


def test_a_window_is_started_again_when_another_process_opened_and_closed_the_breaker(tmp_path, clock):
    a = Upstream(tmp_path / "b.db", clock)
    b = Upstream(tmp_path / "b.db", clock, db=Database(tmp_path / "b.db"))   # another process
    b.fail(45)                              # b has seen failures, not yet enough
    a.fail(50)
    a.db.flush()
    clock.advance(31)
    a.ok()                                  # a probes and closes it
    a.db.flush()
    b.breaker.storage.READ_TTL_S = 0        # b reads the file now rather than within 0.1 s
    b.breaker.storage._read_at = float("-inf")
    b.fail()                                # its window began before that opening: dropped
    assert b.state == CLOSED and b.breaker.info()["window_failures"] == 1
    a.db.close(), b.db.close()


def test_a_success_in_the_closed_state_takes_no_lock_and_writes_nothing(up):
    up.fail(3)
    permit = up.breaker.acquire()
    done = threading.Event()
    with up.breaker._lock:                  # held: a success that needed it would wait
        worker = threading.Thread(target=lambda: (up.breaker.success(permit), done.set()))
        worker.start()
        worker.join(timeout=5)
        assert done.is_set()
    assert up.breaker.storage._pending == 0 and up.breaker.info()["window_calls"] == 4


# -- the consecutive rule -------------------------------------------------------------------
def test_consecutive_mode_opens_after_fail_max_failures_in_a_row(tmp_path, clock):
    up = Upstream(tmp_path / "c.db", clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 5})
    up.feed("FFFF.FFFF.", times=20)         # 80 % failures, never five in a row
    assert up.state == CLOSED
    up.fail(5)
    assert up.state == OPEN
    assert up.events()[0]["cause"] == "5 consecutive failures (last: server_error)"
    up.db.close()


def test_switching_the_mode_applies_at_the_next_failure(up):
    up.settings.set("breaker.mode", "consecutive", actor="test")
    up.fail(5)                              # five in a row: open at once (the rate needs 50)
    assert up.state == OPEN
    up.breaker.reset("test")
    up.settings.set("breaker.mode", "rate", actor="test")
    up.fail(10)
    assert up.state == CLOSED               # 10 attempts are below the rate's minimum


def test_mode_and_window_settings_are_checked(up):
    with pytest.raises(errors.InvalidParameter, match="breaker.mode must be one of rate, consecutive"):
        up.settings.set("breaker.mode", "sometimes")
    with pytest.raises(errors.InvalidParameter, match="minimum_calls must not exceed breaker.window_size"):
        up.settings.set_many({"breaker.window_size": 20, "breaker.minimum_calls": 30})
    assert up.settings.get("breaker.mode") == "rate" and up.settings.get("breaker.window_size") == 100


# -- how long it stays open -------------------------------------------------------------------
def test_without_retry_after_it_stays_open_for_the_reset_timeout(up, clock):
    up.fail(50)
    with pytest.raises(errors.CircuitOpen) as info:
        up.breaker.acquire()
    assert info.value.retry_in_s == pytest.approx(30)
    clock.advance(30)
    assert up.breaker.acquire().probe


def test_the_upstreams_retry_after_sets_the_open_period(up, clock):
    up.fail(49)
    up.fail(retry_in_s=5)                   # the failure that opens it said "wait 5 s"
    with pytest.raises(errors.CircuitOpen) as info:
        up.breaker.acquire()
    assert info.value.retry_in_s == pytest.approx(5)
    clock.advance(5)
    probe = up.breaker.acquire()
    assert probe.probe and up.state == HALF_OPEN
    up.breaker.failure(probe, "server_error", 12)   # the probe failed and said "12 s"
    assert up.breaker.info()["retry_in_s"] == pytest.approx(12)
    clock.advance(12)
    up.ok()
    assert up.state == CLOSED


@pytest.mark.parametrize("said,period", [(0.0, OPEN_FOR_BOUNDS_S[0]), (0.2, OPEN_FOR_BOUNDS_S[0]),
                                         (1e9, OPEN_FOR_BOUNDS_S[1]), (math.inf, OPEN_FOR_BOUNDS_S[1]),
                                         (math.nan, 30.0), (-3.0, OPEN_FOR_BOUNDS_S[0])])
def test_the_open_period_is_clamped_to_sane_bounds(up, said, period):
    up.fail(49)
    up.fail(retry_in_s=said)
    assert up.breaker.info()["retry_in_s"] == pytest.approx(period)


def test_the_open_period_is_shared_with_other_processes(tmp_path, clock):
    a = Upstream(tmp_path / "b.db", clock)
    a.fail(49)
    a.fail(retry_in_s=8)
    a.db.flush()
    b = Upstream(tmp_path / "b.db", clock, db=Database(tmp_path / "b.db"))
    with pytest.raises(errors.CircuitOpen) as info:
        b.breaker.acquire()
    assert info.value.retry_in_s == pytest.approx(8)
    a.db.close(), b.db.close()


def test_a_forced_opening_lasts_the_reset_timeout_even_after_a_retry_after(up, clock):
    up.fail(49)
    up.fail(retry_in_s=5)
    up.breaker.reset("test")
    up.breaker.force_open("test")
    assert up.breaker.info()["retry_in_s"] == pytest.approx(30)


# -- at the defaults, over real HTTP -------------------------------------------------------
def _service(tmp_path, running, clock: FakeClock) -> Gyroscope:
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db")
    return Gyroscope(cfg, provider=SimulatorProvider(running), clock=clock.as_clock())


async def _workload(gyro: Gyroscope, n: int, concurrent: int) -> list:
    gate = asyncio.Semaphore(concurrent)

    async def one(i: int):
        async with gate:
            try:
                return await gyro.agenerate(GenerationRequest(prompt=f"Tagline number {i} for a bakery",
                                                              cache=False, source="test"))
            except errors.GyroscopeError as exc:
                return exc
    return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.fixture
def seeded_simulator():
    # A seeded fault draw makes a run repeatable; the rule's odds at other seeds are in
    # docs/architecture.md ("Circuit breaker").
    running = start_in_background(Simulator(fault_seed=13))
    yield running
    running.stop()


def test_a_30_percent_503_storm_at_100_concurrent_is_absorbed_at_the_defaults(tmp_path, seeded_simulator, clock):
    gyro = _service(tmp_path, seeded_simulator, clock)
    seeded_simulator.sim.set_faults(error_rate=0.3, error_status=503)
    results = asyncio.run(_workload(gyro, 400, 100))
    answered = [r for r in results if not isinstance(r, Exception)]
    stats = seeded_simulator.sim.stats()
    assert 0.25 <= stats["errors"] / stats["chat_requests"] <= 0.35      # the storm really was 30 %
    assert len(answered) >= 0.97 * 400
    assert not any(isinstance(r, errors.CircuitOpen) for r in results)
    info = gyro.breakers.get("simulator", "gpt-4o-mini").info()
    assert info["state"] == CLOSED and info["window_calls"] == 100
    gyro.db.flush()
    assert gyro.history.events("breaker") == []
    gyro.close()


def test_a_full_outage_opens_it_within_seconds_and_bounds_what_is_sent_at_the_defaults(tmp_path, simulator,
                                                                                          clock):
    gyro = _service(tmp_path, simulator, clock)
    simulator.sim.set_faults(error_rate=1.0, error_status=503)
    results = asyncio.run(_workload(gyro, 100, 20))
    sent = simulator.sim.stats()["chat_requests"]
    assert sent < 80                        # every attempt upstream, probes included
    assert all(isinstance(r, (errors.CircuitOpen, errors.ServerError)) for r in results)
    # Requests start in order, the 21st when one of the first 20 is done. None from the 21st on
    # reached the upstream, so it opened before any of the first 20 had used up its retries:
    # within one request's backoff at the defaults (0.5 + 1 + 2 s at most).
    assert [i for i, r in enumerate(results) if r.result.attempts] == list(range(20))
    assert gyro.breakers.get("simulator", "gpt-4o-mini").info()["state"] == OPEN
    gyro.db.flush()
    [event] = gyro.history.events("breaker")
    assert event["new"] == OPEN and "attempts failed" in event["cause"]
    gyro.close()


def test_a_retry_after_on_the_failure_that_opens_it_sets_the_open_period(tmp_path, simulator, clock):
    gyro = _service(tmp_path, simulator, clock)
    gyro.settings.set_many({"breaker.minimum_calls": 2, "retry.max_retries": 0}, actor="test")
    simulator.sim.set_faults(rate_limit_rate=1.0, retry_after_s=7)
    for _ in range(2):
        with pytest.raises(errors.RateLimited):
            gyro.generate(GenerationRequest(prompt="Tagline for a bakery", cache=False, source="test"))
    with pytest.raises(errors.CircuitOpen) as info:
        gyro.generate(GenerationRequest(prompt="Tagline for a bakery", cache=False, source="test"))
    assert info.value.retry_in_s == pytest.approx(7) and simulator.sim.stats()["chat_requests"] == 2
    clock.advance(7)
    simulator.sim.clear_faults()
    assert gyro.generate(GenerationRequest(prompt="Tagline for a bakery", cache=False, source="test")).outcome == "ok"
    gyro.close()


def test_a_flood_of_model_names_keeps_a_bounded_number_of_breakers(tmp_path, clock):
    """Every model name a caller sends makes a breaker; past the bound the oldest idle ones
    are forgotten, never one that is open or has an attempt in flight, and a forgotten one
    comes back from its shared row with its state."""
    up = Upstream(tmp_path / "g.db", clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 3})
    breakers = up.breakers
    breakers.max_in_memory = 20
    opened = breakers.get("https://upstream.test/v1", "down")
    for _ in range(3):
        opened.failure(opened.acquire(), "server_error")
    busy = breakers.get("https://upstream.test/v1", "busy")
    running = busy.acquire()                       # an attempt in flight
    counted = breakers.get("https://upstream.test/v1", "counted")
    counted.failure(counted.acquire(), "server_error")   # one failure in the shared counter
    up.db.flush()
    for i in range(200):
        b = breakers.get("https://upstream.test/v1", f"typo-{i}")
        b.success(b.acquire())
        up.db.flush()
    assert len(breakers._breakers) <= 20
    assert breakers._breakers["https://upstream.test/v1|down"] is opened
    assert breakers._breakers["https://upstream.test/v1|busy"] is busy
    assert "https://upstream.test/v1|counted" not in breakers._breakers
    again = breakers.get("https://upstream.test/v1", "counted")
    assert again is not counted and again.info()["fail_counter"] == 1   # its row kept it
    with pytest.raises(errors.CircuitOpen):
        opened.acquire()
    busy.success(running)
    listed = {b["name"]: b["state"] for b in breakers.all_info()}
    assert listed["https://upstream.test/v1|down"] == "open"
    assert listed["https://upstream.test/v1|counted"] == "closed"
    assert len(breakers._breakers) <= 20            # listing brought none of them back
