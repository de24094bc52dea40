"""Truthful cost: usage details from the simulator over real HTTP (the real openai SDK),
each part priced with genai-prices, prices per upstream, unknown prices flagged."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from genai_prices import Usage as PriceUsage, calc_price

from core import cost_charts, prices
from core.config import Config
from core.errors import InvalidParameter
from core.models import GenerationRequest
from core.providers.openai_provider import OpenAIProvider
from core.service import Gyroscope
from tests.support import FakeClock
from tests.test_pipeline import make_gyro, rows

LONG = "Summarise the history of bread baking in Europe, region by region. " * 90


def genai_cost(model: str, usage, provider_id: str = "openai") -> float:
    parts = PriceUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                       cache_read_tokens=usage.cached_tokens)
    return float(calc_price(parts, model_ref=model, provider_id=provider_id).total_price)


@pytest.fixture
def gyro(tmp_path, simulator):
    simulator.sim.prompt_cache.clear()
    g = make_gyro(tmp_path, simulator, FakeClock())
    yield g
    g.close()


def streamed(gyro, request: GenerationRequest):
    with gyro.stream(request) as stream:
        text = "".join(stream)
    return stream.result, text


def test_simulator_reports_cached_tokens_of_a_repeated_long_prefix_like_openai(simulator):
    simulator.sim.prompt_cache.clear()
    client = openai.OpenAI(api_key="sk-test", base_url=simulator.base_url, max_retries=0)
    messages = [{"role": "user", "content": LONG}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=20)
    again = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=20)
    assert first.usage.prompt_tokens >= 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 1024 and (cached - 1024) % 128 == 0 and cached <= again.usage.prompt_tokens
    short = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    short = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert short.usage.prompt_tokens_details.cached_tokens == 0   # under 1024 tokens: never cached


def test_simulator_reports_reasoning_tokens_of_a_reasoning_model_plain_and_streamed(simulator):
    client = openai.OpenAI(api_key="sk-test", base_url=simulator.base_url, max_retries=0)
    plain = client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "Hi"}])
    assert plain.usage.completion_tokens_details.reasoning_tokens == 32
    visible = plain.usage.completion_tokens - 32
    assert visible > 0
    chunks = list(client.chat.completions.create(
        model="o4-mini", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 32
    other = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert other.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_cost_equals_genai_prices_per_part_with_cached_tokens(gyro, stream):
    ask = lambda: GenerationRequest(prompt=LONG, model="gpt-4o-mini", cache=False, max_tokens=40,
                                    source="test")
    first = streamed(gyro, ask())[0] if stream else gyro.generate(ask())
    second = streamed(gyro, ask())[0] if stream else gyro.generate(ask())
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens >= 1024
    assert second.token_source == "reported" and not second.tokens_estimated
    assert second.cost == pytest.approx(genai_cost("gpt-4o-mini", second.usage), rel=1e-9)
    # cheaper than at the full input rate: the cached part costs half
    full = calc_price(PriceUsage(input_tokens=second.usage.prompt_tokens,
                                 output_tokens=second.usage.completion_tokens),
                      model_ref="gpt-4o-mini", provider_id="openai").total_price
    assert second.cost < float(full)
    row = rows(gyro)[-1]
    assert row["cached_tokens"] == second.usage.cached_tokens and row["reasoning_tokens"] == 0
    assert row["cost"] == pytest.approx(second.cost) and row["cost_unknown"] == 0
    assert row["token_source"] == "reported" and row["finish_reason"] in ("stop", "length")
    totals = gyro.stats()
    assert totals["cached_tokens"] == second.usage.cached_tokens
    assert totals["prompt_cache_hit_rate"] == pytest.approx(
        second.usage.cached_tokens / (first.usage.prompt_tokens + second.usage.prompt_tokens))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_reasoning_tokens_are_recorded_and_priced_as_output(gyro, stream):
    ask = GenerationRequest(prompt="Name a bread", model="o4-mini", cache=False, source="test")
    result = streamed(gyro, ask)[0] if stream else gyro.generate(ask)
    assert result.usage.reasoning_tokens == 32
    assert result.cost == pytest.approx(genai_cost("o4-mini", result.usage), rel=1e-9)
    assert rows(gyro)[-1]["reasoning_tokens"] == 32
    assert result.as_dict()["usage"]["reasoning_tokens"] == 32


def test_worked_example_of_docs_metrics():
    """14 prompt tokens, 6 of them cached, 12 completion tokens on gpt-4o-mini."""
    cost = prices.price("gpt-4o-mini", prices.OPENAI, 14, 12, cached_tokens=6)
    assert cost == pytest.approx(8 * 0.15e-6 + 6 * 0.075e-6 + 12 * 0.6e-6)
    assert round(cost, 10) == 0.00000885
    assert cost == pytest.approx(float(calc_price(
        PriceUsage(input_tokens=14, output_tokens=12, cache_read_tokens=6),
        model_ref="gpt-4o-mini", provider_id="openai").total_price))


# -- prices per upstream -------------------------------------------------------------------
def self_hosted(tmp_path, simulator, **settings) -> Gyroscope:
    """The simulator reached as a self-hosted OpenAI-compatible server on 127.0.0.1."""
    cfg = Config(provider="openai", base_url=simulator.base_url, db_path=tmp_path / "h.db")
    gyro = Gyroscope(cfg, provider=OpenAIProvider("sk-x", simulator.base_url),
                     clock=FakeClock().as_clock())
    gyro.settings.ttl = 0
    if settings:
        gyro.settings.set_many(settings, actor="test")
    return gyro


def test_default_rule_prices_known_hosts_by_their_table_and_others_unknown():
    assert prices.default_pricing("openai", "https://api.openai.com/v1").provider_id == "openai"
    assert prices.default_pricing("openai", "https://api.anthropic.com/v1").provider_id == "anthropic"
    assert prices.default_pricing("simulator", "http://127.0.0.1:9/v1").provider_id == "openai"
    local = prices.default_pricing("openai", "http://gpu-box:8000/v1")
    assert local.kind == "unknown" and local.rates("gpt-oss-20b") is None


def test_a_self_hosted_model_is_not_priced_as_openai_and_unknown_is_flagged_not_zero(tmp_path, simulator):
    gyro = self_hosted(tmp_path, simulator)
    try:
        asked = GenerationRequest(prompt="Name a bread", model="gpt-4o-mini", source="test")
        result = gyro.generate(asked)
        assert result.cost is None and result.cost_unknown
        hit = gyro.generate(GenerationRequest(prompt="Name a bread", model="gpt-4o-mini", source="test"))
        assert hit.from_cache and hit.cost_unknown and hit.cost_saved == 0.0
        got = rows(gyro)
        assert [(r["cost"], r["cost_unknown"], r["from_cache"]) for r in got] == [
            (None, 1, 0), (0.0, 1, 1)]
        assert gyro.stats()["unknown_cost_requests"] == 2
    finally:
        gyro.close()


def test_a_self_hosted_gpt_oss_20b_is_not_priced_as_openai_until_configured(tmp_path, simulator):
    assert prices.cost("gpt-oss-20b", 14, 10) is not None       # OpenAI's table does list it
    gyro = self_hosted(tmp_path, simulator)
    try:
        ask = lambda: GenerationRequest(prompt="Name a bread", model="gpt-oss-20b", source="test")
        first = gyro.generate(ask())
        assert first.cost is None and first.cost_unknown and first.usage.reasoning_tokens == 32
        again = gyro.generate(ask())
        assert again.from_cache and again.cost_unknown            # its cache hit is flagged too
        table = {simulator.base_url: {"gpt-oss-20b": {"input": 0.05, "output": 0.2}}}
        gyro.settings.set("prices.upstreams", json.dumps(table), actor="test")
        priced = gyro.generate(GenerationRequest(prompt="Name a bread", model="gpt-oss-20b",
                                                 cache=False, source="test"))
        u = priced.usage
        assert priced.cost == pytest.approx((u.prompt_tokens * 0.05 + u.completion_tokens * 0.2) / 1e6)
        assert [r["cost_unknown"] for r in rows(gyro)] == [1, 1, 0]
    finally:
        gyro.close()


def test_self_hosted_free_and_custom_prices_apply_to_answers_and_cache_hits(tmp_path, simulator):
    custom = {"gpt-4o-mini": {"input": 0.05, "cached": 0.01, "output": 0.2}}
    gyro = self_hosted(tmp_path, simulator)
    try:
        gyro.settings.set("prices.upstreams", f'{{"{simulator.base_url}": "free"}}', actor="test")
        free = gyro.generate(GenerationRequest(prompt="Rye?", model="gpt-4o-mini", source="test"))
        assert free.cost == 0.0 and not free.cost_unknown
        import json
        gyro.settings.set("prices.upstreams", json.dumps({simulator.base_url + "/": custom}), actor="test")
        paid = gyro.generate(GenerationRequest(prompt="Spelt?", model="gpt-4o-mini", source="test"))
        u = paid.usage
        assert paid.cost == pytest.approx((u.prompt_tokens * 0.05 + u.completion_tokens * 0.2) / 1e6)
        hit = gyro.generate(GenerationRequest(prompt="Spelt?", model="gpt-4o-mini", source="test"))
        assert hit.from_cache and not hit.cost_unknown and hit.cost_saved == pytest.approx(paid.cost)
        audit = gyro.settings.audit()
        assert [a["name"] for a in audit[:2]] == ["prices.upstreams", "prices.upstreams"]
    finally:
        gyro.close()


@pytest.mark.parametrize("bad, words", [
    ("not json", "must be a JSON object"),
    ('{"http://x/v1": "cheap"}', "use 'free', 'unknown'"),
    ('{"http://x/v1": {"m": {"input": 1}}}', "needs USD per 1M tokens"),
    ('{"http://x/v1": {"m": {"input": 1, "output": -1}}}', "0 or more"),
    ('{"http://x/v1": {"m": {"input": 1, "output": 1, "extra": 2}}}', "unknown part"),
])
def test_bad_upstream_prices_are_refused_with_what_to_write_and_change_nothing(gyro, bad, words):
    before = gyro.settings.get("prices.upstreams")
    with pytest.raises(InvalidParameter, match=words):
        gyro.settings.set("prices.upstreams", bad, actor="test")
    assert gyro.settings.get("prices.upstreams") == before


def test_tiered_or_unknown_models_never_price_as_zero():
    assert prices.cost("no-such-model", 10, 10) is None
    assert prices.price("x", prices.Pricing("unknown"), 10, 10) is None
    assert prices.price("x", prices.Pricing("free"), 10, 10) == 0.0


def test_async_callers_get_the_same_details(gyro):
    async def main():
        ask = GenerationRequest(prompt="Name a bread", model="o4-mini", cache=False, source="test")
        return await gyro.agenerate(ask)
    result = asyncio.run(main())
    assert result.usage.reasoning_tokens == 32 and result.cost is not None


# -- the Metrics page's prompt-cache figures ------------------------------------------------
def test_prompt_cache_drop_warns_only_on_a_sharp_fall_with_enough_traffic():
    day = lambda b, rate, n=5000: {"bucket": b, "prompt_cache_hit_rate": rate,
                                   "upstream_prompt_tokens": n, "cached_tokens": int(rate * n)}
    warning = cost_charts.prompt_cache_drop([day("2026-12-01", 0.6), day("2026-12-02", 0.1)])
    assert "fell from 60% on 2026-12-01 to 10% on 2026-12-02" in warning
    assert cost_charts.prompt_cache_drop([day("a", 0.6), day("b", 0.45)]) is None     # mild
    assert cost_charts.prompt_cache_drop([day("a", 0.08), day("b", 0.01)]) is None    # < 10 points
    assert cost_charts.prompt_cache_drop([day("a", 0.6), day("b", 0.0, n=10)]) is None  # too little
    fig = cost_charts.prompt_cache([day("a", 0.6), day("b", 0.1)])
    assert list(fig.data[0].y) == [0.6, 0.1]


def test_prompt_cache_warning_reads_yesterday_and_today_from_history(tmp_path, simulator):
    from core.history import RequestRecord
    clock = FakeClock()
    gyro = make_gyro(tmp_path, simulator, clock)
    try:
        now = 1_800_000_000.0          # 2027-01-15 08:00 UTC
        for ts, cached in ((now - 86400, 3000), (now, 100)):
            gyro.history.record(RequestRecord(ts=ts, request_id=f"r{ts}", model="gpt-4o-mini",
                                              source="test", prompt_tokens=5000, completion_tokens=10,
                                              cached_tokens=cached))
        assert "fell from 60% on 2027-01-14 to 2% on 2027-01-15" in cost_charts.prompt_cache_warning(
            gyro.history, "UTC", now)
    finally:
        gyro.close()


# -- streams without usage: the server's /tokenize, else an estimate -----------------------------
@pytest.mark.parametrize("style", ["vllm", "llama.cpp"])
def test_a_stream_without_usage_is_counted_by_the_servers_tokenize(gyro, simulator, style):
    # llama.cpp ignores include_usage, and its chat template adds tokens tiktoken cannot see
    simulator.sim.set_faults(ignore_include_usage=True, prompt_tokens_extra=40, tokenize_style=style)
    simulator.sim.reset_stats()
    ask = GenerationRequest(prompt="Name a bread", model="gpt-4o-mini", cache=False, source="test")
    result, text = streamed(gyro, ask)
    plain = gyro.generate(GenerationRequest(prompt="Name a bread", model="gpt-4o-mini", cache=False,
                                            source="test"))     # a plain answer reports usage
    assert result.token_source == "tokenizer" and not result.tokens_estimated
    assert result.usage.prompt_tokens == plain.usage.prompt_tokens        # the server's count, template too
    assert result.usage.completion_tokens == plain.usage.completion_tokens
    assert simulator.sim.stats()["tokenize_requests"] >= 2
    assert result.cost == pytest.approx(genai_cost("gpt-4o-mini", result.usage))
    row = rows(gyro)[0]
    assert row["token_source"] == "tokenizer" and row["tokens_estimated"] == 0


def test_without_tokenize_the_stream_is_estimated_and_flagged(gyro, simulator):
    simulator.sim.set_faults(ignore_include_usage=True, prompt_tokens_extra=40, tokenize_route=False)
    ask = GenerationRequest(prompt="Name a bread", model="gpt-4o-mini", cache=False, source="test")
    result, _ = streamed(gyro, ask)
    assert result.token_source == "estimated" and result.tokens_estimated
    row = rows(gyro)[0]
    assert row["token_source"] == "estimated" and row["tokens_estimated"] == 1
    assert gyro.stats()["estimated_token_requests"] == 1
    # the server is not asked again for a while: a second stream goes straight to the estimate
    simulator.sim.set_faults(tokenize_route=True)
    simulator.sim.reset_stats()
    again, _ = streamed(gyro, ask)
    assert again.token_source == "estimated" and simulator.sim.stats()["tokenize_requests"] == 0


def test_estimates_before_sending_use_the_upstreams_pricing(tmp_path, simulator):
    gyro = self_hosted(tmp_path, simulator)
    try:
        assert gyro.estimate("Name a bread", None, "gpt-4o-mini", 50)["max_cost"] is None
        gyro.settings.set("prices.upstreams", f'{{"{simulator.base_url}": "free"}}', actor="test")
        assert gyro.estimate("Name a bread", None, "gpt-4o-mini", 50)["max_cost"] == 0.0
        rows_in = [{"line": 1, "prompt": "Name a bread"}]
        assert gyro.batch.estimate(rows_in)["unpriced_rows"] == 0 and rows_in[0]["_estimate"][2] == 0.0
        gyro.settings.set("prices.upstreams", "", actor="test")
        assert gyro.batch.estimate(rows_in)["unpriced_rows"] == 1       # unknown, not $0
    finally:
        gyro.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_cache_writes_are_recorded_and_priced_at_their_rate(tmp_path, simulator, stream):
    simulator.sim.prompt_cache.clear()
    simulator.sim.set_faults(report_cache_writes=True)
    rates = {"input": 3.0, "cached": 0.3, "cache_write": 3.75, "output": 15.0}
    gyro = self_hosted(tmp_path, simulator, **{"prices.upstreams": json.dumps({simulator.base_url: {"*": rates}})})
    try:
        ask = lambda: GenerationRequest(prompt=LONG, model="gpt-4o-mini", cache=False, max_tokens=30,
                                        source="test")
        first = streamed(gyro, ask())[0] if stream else gyro.generate(ask())
        u = first.usage
        assert u.cache_write_tokens >= 1024 and u.cached_tokens == 0
        expected = ((u.prompt_tokens - u.cache_write_tokens) * 3.0 + u.cache_write_tokens * 3.75
                    + u.completion_tokens * 15.0) / 1e6
        assert first.cost == pytest.approx(expected)
        second = streamed(gyro, ask())[0] if stream else gyro.generate(ask())
        assert second.usage.cached_tokens >= 1024 and second.usage.cache_write_tokens == 0
        assert rows(gyro)[0]["cache_write_tokens"] == u.cache_write_tokens
    finally:
        gyro.close()


def test_every_part_matches_genai_prices_on_a_table_with_cache_write_prices():
    anthropic = prices.Pricing("catalogue", "anthropic")
    ours = prices.price("claude-3-5-haiku-latest", anthropic, 2000, 100, cached_tokens=500,
                        cache_write_tokens=1000)
    theirs = calc_price(PriceUsage(input_tokens=2000, output_tokens=100, cache_read_tokens=500,
                                   cache_write_tokens=1000),
                        model_ref="claude-3-5-haiku-latest", provider_id="anthropic").total_price
    assert ours == pytest.approx(float(theirs), rel=1e-9)


def test_the_v1_gateway_passes_the_usage_details_on_plain_and_streamed(app_env):
    from starlette.testclient import TestClient
    import core.service
    from core import api
    core.service.default_service()
    with TestClient(api.asgi_app(), base_url="http://127.0.0.1") as client:
        sdk = openai.OpenAI(api_key="x", base_url="http://127.0.0.1/v1", http_client=client, max_retries=0)
        plain = sdk.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "Hi"}])
        assert plain.usage.completion_tokens_details.reasoning_tokens == 32
        assert plain.usage.prompt_tokens_details.cached_tokens == 0
        chunks = list(sdk.chat.completions.create(
            model="o4-mini", messages=[{"role": "user", "content": "Hello"}], stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 32
