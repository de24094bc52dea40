"""Cost of a request from the usage the API reported, priced the way its upstream is priced.

Each part is priced at its own rate (genai-prices' convention: ``input_tokens`` includes the
cached tokens and the cache writes, ``output_tokens`` includes the reasoning tokens)::

    cost = (prompt - cached - cache_write) * input + cached * cache_read
           + cache_write * cache_write_rate + completion * output

An upstream (a base URL, or a provider name) is priced one of four ways (``Pricing``):
``catalogue`` (a genai-prices provider's table, offline), ``free`` (self-hosted),
``custom`` (per-model USD per 1M tokens from the ``prices.upstreams`` setting) or
``unknown``. Unknown is never 0: the cost is None and the row is flagged ``cost_unknown``.
Which applies when the setting does not name the upstream: see ``default_pricing``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from genai_prices import Usage as PriceUsage, calc_price
from genai_prices import data_snapshot

from .errors import InvalidParameter
from .settings import json_object

_M = 1_000_000
KINDS = ("free", "unknown")      # besides a catalogue provider id or a custom price table
CUSTOM_PARTS = ("input", "cached", "cache_write", "output")


@dataclass(frozen=True)
class Rates:
    """USD per token of each part; ``flat`` False when the table has tiers (priced exactly)."""

    input: float
    cached: float
    cache_write: float
    output: float
    flat: bool = True


@dataclass(frozen=True)
class Pricing:
    """How one upstream is priced: kind 'catalogue' (``provider_id``), 'free', 'custom'
    (``models``: name -> Rates, '*' for any model) or 'unknown'."""

    kind: str
    provider_id: str | None = None
    models: dict = field(default_factory=dict, hash=False, compare=False)
    why: str = ""                 # how this pricing was chosen, for docs and the Settings page

    def rates(self, model: str) -> Rates | None:
        """Per-token rates of ``model`` here, or None when unknown."""
        if self.kind == "free":
            return _FREE
        if self.kind == "custom":
            return self.models.get(model) or self.models.get("*")
        if self.kind == "catalogue" and model:
            return _catalogue_rates(model, self.provider_id)
        return None


_FREE = Rates(0.0, 0.0, 0.0, 0.0)
OPENAI = Pricing("catalogue", "openai", why="OpenAI's price table")


def _calc(model: str, provider_id: str, **parts: int) -> float:
    return float(calc_price(PriceUsage(**parts), model_ref=model, provider_id=provider_id).total_price)


@functools.lru_cache(maxsize=512)
def _catalogue_rates(model: str, provider_id: str) -> Rates | None:
    try:
        per_in = _calc(model, provider_id, input_tokens=_M) / _M
        per_cached = _calc(model, provider_id, input_tokens=_M, cache_read_tokens=_M) / _M
        per_write = _calc(model, provider_id, input_tokens=_M, cache_write_tokens=_M) / _M
        per_out = _calc(model, provider_id, output_tokens=_M) / _M
        # Tiered prices (e.g. long-context surcharges) are not linear: detect, price exactly.
        probe = _calc(model, provider_id, input_tokens=3 * _M, output_tokens=2 * _M)
        flat = abs(probe - (3 * _M * per_in + 2 * _M * per_out)) < 1e-9
    except LookupError:
        return None
    return Rates(per_in, per_cached, per_write, per_out, flat)


def price(model: str, pricing: Pricing, prompt_tokens: int | None, completion_tokens: int | None,
          cached_tokens: int = 0, cache_write_tokens: int = 0) -> float | None:
    """USD for this usage, each part at its rate; None when the price is unknown."""
    rates = pricing.rates(model)
    if rates is None:
        return None
    p, c = int(prompt_tokens or 0), int(completion_tokens or 0)
    cached = min(int(cached_tokens or 0), p)
    write = min(int(cache_write_tokens or 0), p - cached)
    if not rates.flat:
        return _calc(model, pricing.provider_id, input_tokens=p, output_tokens=c,
                     cache_read_tokens=cached, cache_write_tokens=write)
    return ((p - cached - write) * rates.input + cached * rates.cached
            + write * rates.cache_write + c * rates.output)


def price_usage(model: str, usage, pricing: Pricing) -> float | None:
    """``price`` of a providers.Usage."""
    return price(model, pricing, usage.prompt_tokens, usage.completion_tokens,
                 usage.cached_tokens, usage.cache_write_tokens)


def cost(model: str, prompt_tokens: int | None, completion_tokens: int | None,
         provider_id: str = "openai") -> float | None:
    """Price in USD from a catalogue provider's table (OpenAI's by default), or None when the
    model is not in it (never a silent 0)."""
    return price(model, _catalogue(provider_id), prompt_tokens, completion_tokens)


@functools.lru_cache(maxsize=64)
def _catalogue(provider_id: str) -> Pricing:
    return Pricing("catalogue", provider_id, why=f"{provider_id}'s price table")


# -- which pricing an upstream gets --------------------------------------------------------
@functools.lru_cache(maxsize=1)
def catalogue_providers() -> dict[str, re.Pattern]:
    """genai-prices' providers: id -> the pattern of their API URL."""
    out = {}
    for p in data_snapshot.get_snapshot().providers:
        if p.id not in out and p.api_pattern:
            out[p.id] = re.compile(p.api_pattern)
    return out


def default_pricing(provider_name: str, base_url: str) -> Pricing:
    """The rule when ``prices.upstreams`` does not name the upstream: the simulator is priced
    as OpenAI (it imitates OpenAI's models); a base URL on a known provider's API host (per
    genai-prices, e.g. api.openai.com, api.anthropic.com) gets that provider's table; any
    other host (a self-hosted vLLM, llama.cpp, Ollama, a proxy) is unknown until configured."""
    if provider_name == "simulator":
        return Pricing("catalogue", "openai", why="the simulator imitates OpenAI")
    for provider_id, pattern in catalogue_providers().items():
        if provider_id != "openai-decisions" and base_url and pattern.match(base_url):
            return Pricing("catalogue", provider_id, why=f"{base_url} is {provider_id}'s API")
    return Pricing("unknown", why=f"{base_url or provider_name} is not a known provider's API; "
                               "set prices.upstreams")


def parse_upstreams(text: str) -> dict[str, Pricing]:
    """The ``prices.upstreams`` setting (JSON) as {upstream: Pricing}; InvalidParameter says
    what is wrong and how to write it."""
    if not text.strip():
        return {}
    example = ('e.g. {"http://gpu:8000/v1": "free", "https://proxy.example/v1": "openai", '
               '"http://llama:8080/v1": {"gpt-oss-20b": {"input": 0.05, "cached": 0.01, "output": 0.2}}}')
    data = json_object("prices.upstreams", text, example)
    out = {}
    for upstream, how in data.items():
        key = upstream.rstrip("/")
        if isinstance(how, str):
            if how in KINDS:
                out[key] = Pricing(how, why=f"prices.upstreams says {how}")
            elif how in catalogue_providers():
                out[key] = Pricing("catalogue", how, why=f"prices.upstreams: {how}'s price table")
            else:
                raise InvalidParameter(
                    f"prices.upstreams[{upstream!r}] is {how!r}: use 'free', 'unknown', a price "
                    f"table per model, or a provider of genai-prices such as openai, anthropic, "
                    f"google, groq, mistral ({len(catalogue_providers())} in all).")
        elif isinstance(how, dict) and how:
            out[key] = Pricing("custom", models={m: _custom_rates(upstream, m, r) for m, r in how.items()},
                               why="prices.upstreams: custom prices")
        else:
            raise InvalidParameter(f"prices.upstreams[{upstream!r}] must be a word ('free', "
                                   f"'openai', ...) or a price table per model, {example}.")
    return out


def _custom_rates(upstream: str, model: str, rates) -> Rates:
    where = f"prices.upstreams[{upstream!r}][{model!r}]"
    if not isinstance(rates, dict) or "input" not in rates or "output" not in rates:
        raise InvalidParameter(f"{where} needs USD per 1M tokens as {{\"input\": 0.15, "
                               "\"cached\": 0.075, \"output\": 0.6}} (cached and cache_write "
                               "default to input).")
    unknown = sorted(set(rates) - set(CUSTOM_PARTS))
    if unknown:
        raise InvalidParameter(f"{where} has unknown part(s) {', '.join(unknown)}; use "
                               f"{', '.join(CUSTOM_PARTS)}.")
    for part, value in rates.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
            raise InvalidParameter(f"{where}.{part} must be a number of USD per 1M tokens, 0 or more.")
    per = {part: float(rates.get(part, rates["input"])) / _M for part in CUSTOM_PARTS}
    return Rates(per["input"], per["cached"], per["cache_write"], per["output"])


def check_upstreams(text: str) -> None:
    """Settings check for ``prices.upstreams``."""
    parse_upstreams(text)


@functools.lru_cache(maxsize=64)
def pricing_for(provider_name: str, base_url: str, setting: str) -> Pricing:
    """The pricing of an upstream: the setting's entry for its base URL (or provider name),
    else ``default_pricing``."""
    table = parse_upstreams(setting)
    for key in (base_url.rstrip("/") if base_url else None, provider_name):
        if key and key in table:
            return table[key]
    return default_pricing(provider_name, base_url)
