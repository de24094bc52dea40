"""The pipeline against the simulator over real HTTP with the real openai SDK.
Waits go through an injected clock: no test sleeps for a backoff or a breaker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import openai
import pytest

from core import errors
from core.config import Config
from core.db import Database
from core.models import GenerationRequest
from core.providers.base import Provider
from core.providers.openai_provider import OpenAIProvider
from core.providers.simulator_provider import SimulatorProvider
from core.service import Gyroscope
from core.simulator import Simulator, start_in_background
from tests.support import FakeClock


def make_gyro(tmp_path, running, clock: FakeClock, **settings) -> Gyroscope:
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db")
    gyro = Gyroscope(cfg, provider=SimulatorProvider(running), clock=clock.as_clock())
    gyro.settings.ttl = 0
    defaults = {"retry.jitter": 0, "retry.base_delay_s": 1, "retry.multiplier": 2,
                "retry.max_delay_s": 5, "retry.max_retries": 3}
    gyro.settings.set_many({**defaults, **settings}, actor="test")
    return gyro


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def gyro(tmp_path, simulator, clock):
    g = make_gyro(tmp_path, simulator, clock)
    yield g
    g.close()


def req(prompt="Write a tagline for a small bakery", **kw) -> GenerationRequest:
    kw.setdefault("source", "test")
    return GenerationRequest(prompt=prompt, **kw)


def rows(gyro) -> list[dict]:
    gyro.db.flush()
    return gyro.db.query("SELECT * FROM requests ORDER BY id")


def breaker_events(gyro) -> list[tuple[str, str]]:
    gyro.db.flush()
    return [(e["old"], e["new"]) for e in gyro.history.events("breaker")]


# -- the happy path -----------------------------------------------------------------------
def test_plain_generation_records_usage_and_cost_as_the_server_reported(gyro, simulator):
    result = gyro.generate(req(seed=3))
    raw = openai.OpenAI(base_url=simulator.base_url, api_key="x", max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Write a tagline for a small bakery"}],
        max_tokens=512, temperature=0.7, seed=3)
    assert result.outcome == "ok" and result.content == raw.choices[0].message.content
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        raw.usage.prompt_tokens, raw.usage.completion_tokens)
    expected_cost = raw.usage.prompt_tokens * 0.15e-6 + raw.usage.completion_tokens * 0.6e-6
    assert result.cost == pytest.approx(expected_cost)
    [row] = rows(gyro)
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"], row["tokens_estimated"]) == (
        "ok", raw.usage.prompt_tokens, raw.usage.completion_tokens, 0)
    assert row["cost"] == pytest.approx(expected_cost) and row["source"] == "test"


def test_streaming_yields_text_and_the_usage_chunk(gyro):
    stream = gyro.stream(req())
    pieces = list(stream)
    assert len(pieces) > 5 and "".join(pieces) == stream.result.content
    plain = gyro.generate(req(cache=False))
    assert stream.result.usage == plain.usage and not stream.result.tokens_estimated
    assert stream.result.finish_reason == "stop"


def test_async_callers_share_the_pipeline(gyro):
    async def main():
        results = await asyncio.gather(*(gyro.agenerate(req(f"Topic number {i}")) for i in range(20)))
        stream = gyro.astream(req("Async streaming about rivers"))
        text = "".join([p async for p in stream])
        return results, text, stream.result
    results, text, sresult = asyncio.run(main())
    assert all(r.outcome == "ok" for r in results) and text == sresult.content
    assert len(rows(gyro)) == 21


# -- cache --------------------------------------------------------------------------------
def test_second_identical_request_is_served_from_cache_and_saves_its_cost(gyro, simulator):
    first = gyro.generate(req())
    second = gyro.generate(req())
    assert simulator.sim.stats()["chat_requests"] == 1
    assert second.from_cache and second.content == first.content and second.cost == 0
    assert second.cost_saved == pytest.approx(first.cost)
    assert second.usage == first.usage
    r = rows(gyro)
    assert [x["from_cache"] for x in r] == [0, 1] and r[1]["cost_saved"] == pytest.approx(first.cost)


def test_streamed_request_is_replayed_from_cache_as_a_stream(gyro, simulator):
    first = gyro.generate(req())
    stream = gyro.stream(req())
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == first.content and stream.result.from_cache
    assert simulator.sim.stats()["chat_requests"] == 1


def test_cache_false_bypasses_and_refresh_replaces(gyro, simulator):
    gyro.generate(req())
    assert not gyro.generate(req(cache=False)).from_cache
    assert not gyro.generate(req(refresh=True)).from_cache
    assert simulator.sim.stats()["chat_requests"] == 3
    assert gyro.generate(req()).from_cache


def test_cut_stream_is_never_cached_and_keeps_partial_text(gyro, simulator):
    simulator.sim.set_faults(drop_after_chunks=4)
    stream = gyro.stream(req())
    got = []
    with pytest.raises(errors.StreamInterrupted):
        for piece in stream:
            got.append(piece)
    assert got and stream.result.content == "".join(got)
    simulator.sim.clear_faults()
    assert not gyro.generate(req()).from_cache
    row = rows(gyro)[0]
    assert (row["outcome"], row["error_kind"], row["tokens_estimated"]) == ("error", "stream_interrupted", 1)
    assert row["completion_tokens"] > 0


# -- retries ------------------------------------------------------------------------------
def test_backoff_sequence_and_cap(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"retry.max_retries": 4})
    simulator.sim.set_faults(fail_next=4, fail_status=503)
    notices = []
    result = gyro.generate(req(), on_retry=notices.append)
    assert result.outcome == "ok" and result.attempts == 5
    assert clock.slept == [1, 2, 4, 5]          # 1, 2, 4, then capped at 5
    assert result.retry_wait_s == 12
    assert [n.message for n in notices][:2] == [
        "Service error (503) — retrying in 1.0 s (attempt 2 of 5)",
        "Service error (503) — retrying in 2.0 s (attempt 3 of 5)"]
    assert rows(gyro)[0]["attempts"] == 5 and rows(gyro)[0]["retry_wait_s"] == 12
    gyro.close()


def test_jitter_stays_within_the_computed_wait(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"retry.jitter": 1, "retry.max_retries": 3})
    simulator.sim.set_faults(fail_next=3, fail_status=500)
    gyro.generate(req())
    assert len(clock.slept) == 3
    assert all(0 <= s <= cap for s, cap in zip(clock.slept, [1, 2, 4]))
    gyro.close()


@pytest.mark.parametrize("faults,expected", [
    ({"retry_after_ms": 1500}, 1.5),
    ({"retry_after_s": 3}, 3.0),
    ({"retry_after_s": 4, "retry_after_http_date": True}, 4.0),
])
def test_retry_after_sets_the_wait(gyro, simulator, clock, faults, expected):
    simulator.sim.set_faults(fail_next=1, fail_status=429, **faults)
    notices = []
    result = gyro.generate(req(), on_retry=notices.append)
    assert result.attempts == 2
    assert clock.slept[0] == pytest.approx(expected, abs=1.01 if "retry_after_http_date" in faults else 0.001)
    assert notices[0].message.startswith("Rate limited — retrying in")


def test_retry_after_beyond_the_deadline_fails_at_once_saying_when(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"retry.deadline_s": 10})
    simulator.sim.set_faults(fail_next=1, fail_status=429, retry_after_s=30)
    with pytest.raises(errors.RetryLater) as info:
        gyro.generate(req())
    assert info.value.retry_in_s == 30 and clock.slept == []
    assert "Try again in 30 s" in info.value.user_message
    assert rows(gyro)[0]["attempts"] == 1 and rows(gyro)[0]["error_kind"] == "retry_later"
    gyro.close()


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(gyro, simulator, status):
    simulator.sim.set_faults(fail_next=1, fail_status=status)
    assert gyro.generate(req()).attempts == 2


@pytest.mark.parametrize("status,error", [
    (400, errors.BadRequest), (401, errors.AuthFailed), (403, errors.AuthFailed),
    (404, errors.BadRequest), (422, errors.BadRequest)])
def test_client_errors_are_not_retried(gyro, simulator, status, error):
    simulator.sim.set_faults(fail_next=1, fail_status=status)
    with pytest.raises(error):
        gyro.generate(req())
    assert simulator.sim.stats()["chat_requests"] == 1
    assert rows(gyro)[0]["attempts"] == 1 and rows(gyro)[0]["http_status"] == status


def test_quota_exhausted_is_not_retried(gyro, simulator):
    simulator.sim.set_faults(quota_exhausted=True)
    with pytest.raises(errors.QuotaExhausted, match="run out of quota"):
        gyro.generate(req())
    assert simulator.sim.stats()["chat_requests"] == 1


def test_timeouts_are_retried_then_reported(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"timeout.read_s": 0.2, "retry.max_retries": 1})
    simulator.sim.set_faults(slow_s=5)
    with pytest.raises(errors.UpstreamTimeout):
        gyro.generate(req())
    assert rows(gyro)[0]["attempts"] == 2 and rows(gyro)[0]["error_kind"] == "timeout"
    gyro.close()


# -- circuit breaker ------------------------------------------------------------------------
def test_open_breaker_fails_fast_without_reaching_the_server(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 3, "retry.max_retries": 0,
                                                    "breaker.reset_timeout_s": 30})
    simulator.sim.set_faults(error_rate=1.0, error_status=503)
    for _ in range(3):
        with pytest.raises(errors.ServerError):
            gyro.generate(req(cache=False))
    reached = simulator.sim.stats()["chat_requests"]
    clock.advance(12)
    for _ in range(5):
        with pytest.raises(errors.CircuitOpen) as info:
            gyro.generate(req(cache=False))
    assert info.value.retry_in_s == pytest.approx(18)
    assert "next try in 18 s" in info.value.user_message
    assert simulator.sim.stats()["chat_requests"] == reached == 3
    outcomes = [r["outcome"] for r in rows(gyro)]
    assert outcomes == ["error"] * 3 + ["circuit_open"] * 5
    assert breaker_events(gyro) == [("closed", "open")]
    gyro.close()


def test_recovers_by_itself_after_an_outage(tmp_path, clock):
    running = start_in_background(Simulator(clock=clock.monotonic))
    gyro = make_gyro(tmp_path, running, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 2, "retry.max_retries": 0,
                                                  "breaker.reset_timeout_s": 30})
    try:
        running.sim.outage_for(60)
        for _ in range(2):
            with pytest.raises(errors.ServerError):
                gyro.generate(req(cache=False))
        clock.advance(31)                      # probe while the outage still runs: re-opens
        with pytest.raises(errors.ServerError):
            gyro.generate(req(cache=False))
        clock.advance(31)                      # outage over, next probe closes it
        assert gyro.generate(req(cache=False)).outcome == "ok"
        assert gyro.generate(req(cache=False)).outcome == "ok"
        assert breaker_events(gyro) == [("closed", "open"), ("open", "half-open"), ("half-open", "open"),
                                        ("open", "half-open"), ("half-open", "closed")]
        causes = [e["cause"] for e in gyro.history.events("breaker")]
        assert "2 consecutive failures" in causes[0] and "probe failed" in causes[2]
    finally:
        gyro.close()
        running.stop()


def test_half_open_admits_exactly_the_configured_probes_under_concurrency(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.half_open_max_calls": 2,
                                                    "breaker.success_threshold": 2, "retry.max_retries": 0})
    breaker = gyro.breakers.get("simulator", "gpt-4o-mini")
    breaker.force_open(actor="test")
    clock.advance(31)
    simulator.sim.set_latency(ttft_ms=300, tokens_per_s=0)

    async def one(i):
        try:
            return (await gyro.agenerate(req(f"probe {i}", cache=False))).outcome
        except errors.CircuitOpen:
            return "circuit_open"
    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))
    outcomes = asyncio.run(main())
    assert sorted(outcomes).count("ok") == 2 and outcomes.count("circuit_open") == 6
    assert simulator.sim.stats()["chat_requests"] == 2
    assert breaker.info()["state"] == "closed"    # two successful probes close it
    gyro.close()


def test_half_open_probes_are_limited_across_processes(tmp_path, simulator, clock):
    # Two services on one file stand for two processes: separate writers, caches and views.
    a = make_gyro(tmp_path, simulator, clock, **{"breaker.half_open_max_calls": 1,
                                                 "breaker.success_threshold": 1, "retry.max_retries": 0})
    b = Gyroscope(Config(provider="simulator", base_url=None, db_path=tmp_path / "g.db"),
                  provider=SimulatorProvider(simulator), clock=clock.as_clock(),
                  db=Database(tmp_path / "g.db"))
    a.breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    a.db.flush()
    clock.advance(31)
    simulator.sim.set_latency(ttft_ms=300, tokens_per_s=0)

    async def one(gyro, i):
        try:
            return (await gyro.agenerate(req(f"probe {i}", cache=False))).outcome
        except errors.CircuitOpen:
            return "circuit_open"

    async def main():
        return await asyncio.gather(*(one(g, i) for i, g in enumerate([a, b, a, b, b, a])))
    outcomes = asyncio.run(main())
    assert outcomes.count("ok") == 1 and outcomes.count("circuit_open") == 5
    assert simulator.sim.stats()["chat_requests"] == 1
    a.close(), b.close()


def test_client_errors_and_cancellations_do_not_move_the_breaker(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 2, "retry.max_retries": 0})
    breaker = gyro.breakers.get("simulator", "gpt-4o-mini")
    simulator.sim.set_faults(fail_next=1, fail_status=500)
    with pytest.raises(errors.ServerError):
        gyro.generate(req(cache=False))
    assert breaker.info()["fail_counter"] == 1
    for status in (400, 401, 404, 422):
        simulator.sim.set_faults(fail_next=1, fail_status=status)
        with pytest.raises(errors.UpstreamError):
            gyro.generate(req(cache=False))
    simulator.sim.set_latency(ttft_ms=0, tokens_per_s=200)
    stream = gyro.stream(req(cache=False))
    next(stream)
    stream.close()
    info = breaker.info()
    assert info["fail_counter"] == 1 and info["state"] == "closed"
    assert (info["window_calls"], info["window_failures"]) == (1, 1)   # the rate rule's view too
    gyro.close()


def test_breaker_state_is_shared_through_the_file(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock)
    gyro.breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    gyro.db.flush()                       # breaker writes are queued, never waited on
    out = subprocess.run([sys.executable, "-m", "core", "stats", "--json"], capture_output=True, text=True,
                         env={**os.environ, "GYROSCOPE_DB": str(tmp_path / "g.db")}, check=True)
    assert json.loads(out.stdout)["breakers"] == {"simulator|gpt-4o-mini": "open"}
    gyro.close()


# -- streaming: Stop and mid-stream failures --------------------------------------------------
def test_stop_closes_the_upstream_connection_and_records_cancelled(gyro, simulator):
    simulator.sim.set_latency(ttft_ms=0, tokens_per_s=50)
    stream = gyro.stream(req())
    got = [next(stream), next(stream), next(stream)]
    stream.close()
    deadline = time.time() + 3
    while simulator.sim.stats()["streams_disconnected"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert simulator.sim.stats()["streams_disconnected"] == 1
    assert simulator.sim.stats()["streams_completed"] == 0
    [row] = rows(gyro)
    assert row["outcome"] == "cancelled" and row["completion_tokens"] >= 1 and row["tokens_estimated"] == 1
    assert stream.result.content == "".join(got)
    assert not gyro.generate(req(cache=True, max_tokens=512)).from_cache


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    ({"prompt": "   "}, "prompt is empty"), ({"max_tokens": 0}, "max_tokens must be"),
    ({"max_tokens": -5}, "max_tokens must be"), ({"temperature": 3}, "temperature must be"),
    ({"top_p": 0}, "top_p must be"), ({"prompt": "word " * 130_000}, "accepts 128,000"),
])
def test_bad_requests_are_refused_before_any_network_call(gyro, simulator, kw, message):
    with pytest.raises(errors.RequestRejected, match=message):
        gyro.generate(req(**kw))
    assert simulator.sim.stats()["chat_requests"] == 0
    assert rows(gyro)[0]["outcome"] == "rejected"


def test_unknown_model_is_the_providers_404_in_plain_words_not_retried(gyro, simulator):
    with pytest.raises(errors.ModelNotFound, match="'gpt-9' was not found"):
        gyro.generate(req(model="gpt-9"))
    assert simulator.sim.stats()["chat_requests"] == 1


def test_unreachable_server_names_the_url(tmp_path, clock):
    from core.providers.openai_provider import OpenAIProvider
    cfg = Config(provider="openai", base_url="http://127.0.0.1:9/v1", db_path=tmp_path / "g.db")
    gyro = Gyroscope(cfg, provider=OpenAIProvider("sk-x", "http://127.0.0.1:9/v1"), clock=clock.as_clock())
    gyro.settings.set("retry.max_retries", 0)
    with pytest.raises(errors.ConnectionFailed, match=r"http://127.0.0.1:9/v1"):
        gyro.generate(req())
    gyro.close()


# -- CLI ----------------------------------------------------------------------------------
def test_cli_generate_json_and_failure(tmp_path):
    env = {**os.environ, "GYROSCOPE_DB": str(tmp_path / "cli.db")}
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    out = subprocess.run([sys.executable, "-m", "core", "generate", "Name three rivers", "--json",
                          "--max-tokens", "40"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"content", "model", "finish_reason", "usage", "cost", "from_cache", "attempts",
                         "outcome", "latency_ms"}
    assert data["outcome"] == "ok" and data["usage"]["completion_tokens"] <= 40
    bad = subprocess.run([sys.executable, "-m", "core", "generate", " ", "--json"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["kind"] == "invalid_parameter"
    assert bad.stderr.strip().startswith("error: The prompt is empty")
    text = subprocess.run([sys.executable, "-m", "core", "generate", "Name three rivers", "--max-tokens", "40"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert text.returncode == 0 and text.stdout.strip() == data["content"].strip()


def test_an_optimized_request_records_the_tokens_saved_and_their_price(gyro):
    verbose = ("Hello! Could you please kindly write a short poem about the sea? "
               "Thank you so much in advance!")
    result = gyro.generate(req(verbose, optimize=True))
    assert result.optimizer["tokens_saved"] > 0 and result.prompt_sent != verbose
    row = rows(gyro)[0]
    assert row["optimizer_tokens_saved"] == result.optimizer["tokens_saved"]
    assert row["optimizer_cost_saved"] == pytest.approx(row["optimizer_tokens_saved"] * 0.15e-6)
    plain = gyro.generate(req(verbose, optimize=False))
    assert plain.optimizer is None and rows(gyro)[1]["optimizer_tokens_saved"] == 0


# -- regressions found in review -------------------------------------------------------------
class _OddProvider(SimulatorProvider):
    """The simulator, except for answers a real server might send by mistake."""

    def __init__(self, running, mode):
        super().__init__(running)
        self.mode = mode

    async def complete(self, params, timeout):
        done = await super().complete(params, timeout)
        if self.mode == "crash":
            raise IndexError("list index out of range")
        done.finish_reason = None
        return done


@pytest.mark.parametrize("mode", ["crash", "no_finish_reason"])
def test_odd_answers_are_plain_errors_or_uncached(tmp_path, simulator, clock, mode):
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "odd.db")
    gyro = Gyroscope(cfg, provider=_OddProvider(simulator, mode), clock=clock.as_clock())
    if mode == "crash":
        with pytest.raises(errors.UpstreamError, match="Something unexpected went wrong"):
            gyro.generate(req())
        assert rows(gyro)[0]["outcome"] == "error"
    else:
        gyro.generate(req())
        assert not gyro.generate(req()).from_cache   # not known to be complete: never cached
    gyro.close()


def test_request_ids_are_uuid7_unique_and_sort_by_time(monkeypatch):
    import uuid
    from core import models
    ids = [models.new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids[:100])
    now = 1_800_000_000_000_000_000
    monkeypatch.setattr(models.time, "time_ns", lambda: now)
    earlier = models.new_request_id()
    monkeypatch.setattr(models.time, "time_ns", lambda: now + 1_000_000)    # a millisecond later
    assert models.new_request_id() > earlier and earlier[:12] == f"{now // 1_000_000:012x}"


def test_the_same_request_object_twice_leaves_two_rows(gyro):
    r = req(cache=False)
    first, second = gyro.generate(r), gyro.generate(r)
    assert first.request_id != second.request_id and len(rows(gyro)) == 2


def test_a_409_is_retried_but_does_not_count_against_the_upstream(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 1, "retry.max_retries": 0})
    simulator.sim.set_faults(fail_next=1, fail_status=409)
    with pytest.raises(errors.Conflict):
        gyro.generate(req(cache=False))
    assert gyro.breakers.get("simulator", "gpt-4o-mini").info()["state"] == "closed"
    gyro.close()


def test_retries_stop_as_soon_as_the_breaker_opens(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive", "breaker.fail_max": 2, "retry.max_retries": 3})
    simulator.sim.set_faults(error_rate=1.0, error_status=503)
    with pytest.raises(errors.ServerError):
        gyro.generate(req(cache=False))
    assert clock.slept == [1] and simulator.sim.stats()["chat_requests"] == 2
    row = rows(gyro)[0]
    assert (row["attempts"], row["outcome"], row["error_kind"]) == (2, "error", "server_error")
    gyro.close()


def test_a_stopped_probe_frees_its_slot(tmp_path, simulator, clock):
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.half_open_max_calls": 1})
    breaker = gyro.breakers.get("simulator", "gpt-4o-mini")
    breaker.force_open(actor="test")
    clock.advance(31)
    simulator.sim.set_latency(ttft_ms=0, tokens_per_s=100)
    stream = gyro.stream(req(cache=False))
    next(stream)
    stream.close()
    assert breaker.info()["state"] == "half-open"
    assert gyro.generate(req(cache=False)).outcome == "ok"     # the slot was released
    assert breaker.info()["state"] == "closed"
    gyro.close()


def test_a_breaker_write_never_waits_for_a_locked_file(tmp_path, simulator, clock):
    import sqlite3
    gyro = make_gyro(tmp_path, simulator, clock, **{"breaker.mode": "consecutive"})  # counts in the file
    breaker = gyro.breakers.get("simulator", "gpt-4o-mini")
    blocker = sqlite3.connect(gyro.db.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")        # the file is locked by someone else...
    try:
        permit = breaker.acquire()
        breaker.failure(permit, "server_error")  # ...yet this returns (it would hang otherwise)
        assert breaker.info()["fail_counter"] == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    gyro.db.flush()
    assert gyro.db.query_one("SELECT fail_counter FROM breakers")["fail_counter"] == 1
    gyro.close()


# -- sync callers: the same pipeline on the provider's blocking client ------------------------
class _CompleteOnly(SimulatorProvider):
    async def complete(self, params, timeout):
        return await super().complete(params, timeout)


class _NoBlocking(Provider):
    async def complete(self, params, timeout): ...
    async def stream(self, params, timeout): ...
    async def models(self): return []


def test_sync_callers_get_the_blocking_client_only_where_complete_is_its_twin(simulator):
    assert OpenAIProvider("k", "http://x/v1").blocking and SimulatorProvider(simulator).blocking
    assert not _NoBlocking().blocking                    # driven on an event loop instead
    assert not _CompleteOnly(simulator).blocking         # its own complete() must not be bypassed


class _AsyncOnly(Provider):
    """A third-party style provider: only the three required methods (here over the
    simulator's real HTTP), no complete_blocking, no context_window."""

    name = "async-only"

    def __init__(self, running):
        self.inner = SimulatorProvider(running)

    async def complete(self, params, timeout):
        return await self.inner.complete(params, timeout)

    async def stream(self, params, timeout):
        return await self.inner.stream(params, timeout)

    async def models(self):
        return await self.inner.models()


def test_a_provider_with_only_the_required_methods_serves_sync_and_async_callers(tmp_path, simulator, clock):
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "a.db")
    gyro = Gyroscope(cfg, provider=_AsyncOnly(simulator), clock=clock.as_clock())
    assert gyro.generate(req(cache=False)).outcome == "ok"            # on this thread's own loop
    assert asyncio.run(gyro.agenerate(req(cache=False))).outcome == "ok"
    assert "".join(gyro.stream(req(cache=False)))
    assert [r["outcome"] for r in rows(gyro)] == ["ok"] * 3
    gyro.close()


def test_sync_generate_runs_without_an_event_loop(gyro, simulator):
    simulator.sim.set_faults(fail_next=2, fail_status=503)
    result = gyro.generate(req(cache=False))
    assert result.outcome == "ok" and result.attempts == 3
    assert len(gyro.provider._clients) == 0              # no AsyncOpenAI: no loop was needed
    assert simulator.sim.stats()["chat_requests"] == 3


class _CtrlC(SimulatorProvider):
    def complete_blocking(self, params, timeout):
        super().complete_blocking(params, timeout)       # the server answers, but the user
        raise KeyboardInterrupt                          # pressed Ctrl-C before it arrived


def test_ctrl_c_in_a_sync_call_is_recorded_as_cancelled_and_spares_the_breaker(tmp_path, simulator, clock):
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "c.db")
    gyro = Gyroscope(cfg, provider=_CtrlC(simulator), clock=clock.as_clock())
    with pytest.raises(KeyboardInterrupt):
        gyro.generate(req())
    [row] = rows(gyro)
    assert row["outcome"] == "cancelled" and row["attempts"] == 1
    info = gyro.breakers.get("simulator", "gpt-4o-mini").info()
    assert info["fail_counter"] == 0 and info["window_calls"] == 0
    gyro.close()


def test_a_lazy_cache_entry_rides_along_with_the_answers_row(tmp_path, simulator, clock):
    cfg = Config(provider="simulator", base_url=None, db_path=tmp_path / "p.db")
    gyro = Gyroscope(cfg, provider=SimulatorProvider(simulator), clock=clock.as_clock(),
                     db=Database(tmp_path / "p.db", linger_s=60))   # lazy writes would linger
    first = gyro.generate(req())
    # The answer waited for its row's commit, which carried the queued cache entry along.
    assert gyro.db.query_one("SELECT count(*) AS n FROM cache")["n"] == 1
    assert gyro.db.query_one("SELECT count(*) AS n FROM requests")["n"] == 1
    second = gyro.generate(req())
    assert second.from_cache and second.content == first.content
    assert simulator.sim.stats()["chat_requests"] == 1
    assert gyro.stats()["total_requests"] == 2 and gyro.stats()["cache"]["entries"] == 1
    gyro.close()


def test_a_probe_slot_held_by_a_crashed_process_expires(tmp_path):
    from core.breaker import SQLiteBreakerStorage
    db = Database(tmp_path / "lease.db")
    storage = SQLiteBreakerStorage(db, "upstream|model")
    held = storage.lease_probe(1, ttl_s=10, now=100.0)        # then its process dies
    assert held is not None and storage.lease_probe(1, ttl_s=10, now=105.0) is None
    assert storage.lease_probe(1, ttl_s=10, now=111.0) is not None   # expired: free again
    storage.clear_probes()
    assert storage.lease_probe(1, ttl_s=10, now=111.0) is not None
    db.close()


def test_answered_is_called_once_the_row_is_handed_over_and_only_on_success(gyro, simulator):
    """core.pipeline.answered (what frees a batch slot) is called for a run with an answer,
    once its history row is with the writer, and never for a failure."""
    from core import pipeline

    calls: list[str] = []

    async def run(request):
        token = pipeline.answered.set(lambda: calls.append("answered"))
        try:
            return await gyro.agenerate(request)
        finally:
            calls.append("returned")
            pipeline.answered.reset(token)

    result = asyncio.run(run(req(cache=False)))
    assert result.outcome == "ok" and calls == ["answered", "returned"]
    assert len(rows(gyro)) == 1
    gyro.settings.set_many({"retry.max_retries": 0}, actor="test")
    simulator.sim.set_faults(fail_next=1, fail_status=400)
    with pytest.raises(errors.GyroscopeError):
        asyncio.run(run(req("another prompt", cache=False)))
    assert calls == ["answered", "returned", "returned"] and len(rows(gyro)) == 2
