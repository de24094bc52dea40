"""Cost of a request from the usage the API reported, with genai-prices' offline table."""

from __future__ import annotations

import functools

from genai_prices import Usage, calc_price

_M = 1_000_000


def _calc(model: str, provider_id: str, prompt: int, completion: int) -> float:
    usage = Usage(input_tokens=prompt, output_tokens=completion)
    return float(calc_price(usage, model_ref=model, provider_id=provider_id).total_price)


@functools.lru_cache(maxsize=256)
def _rates(model: str, provider_id: str) -> tuple[float, float, bool] | None:
    """(input, output) USD per token, and whether pricing is flat; None for unknown models."""
    try:
        per_in = _calc(model, provider_id, _M, 0) / _M
        per_out = _calc(model, provider_id, 0, _M) / _M
        # Tiered prices (e.g. long-context surcharges) are not linear: detect and fall back.
        probe = _calc(model, provider_id, 3 * _M, 2 * _M)
        flat = abs(probe - (3 * _M * per_in + 2 * _M * per_out)) < 1e-9
    except LookupError:
        return None
    return per_in, per_out, flat


def cost(model: str, prompt_tokens: int | None, completion_tokens: int | None,
         provider_id: str = "openai") -> float | None:
    """Price in USD, or None when the model is not in the price table (never a silent 0)."""
    rates = _rates(model, provider_id) if model else None
    if rates is None:
        return None
    p, c = int(prompt_tokens or 0), int(completion_tokens or 0)
    per_in, per_out, flat = rates
    if flat:
        return p * per_in + c * per_out
    return _calc(model, provider_id, p, c)
