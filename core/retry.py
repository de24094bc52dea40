"""Retry policy on tenacity: what is retried, how long to wait, and the server's say.

The wait is exponential backoff with jitter (base * multiplier**n, capped), unless the
server sent ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date), or a LiteLLM
proxy forwarded them as ``llm_provider-retry-after[-ms]``, which wins (cut to an hour).
A wait that would pass the request's deadline is not slept: the caller is told at once
when to try again.
"""

from __future__ import annotations

import datetime
import email.utils
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import tenacity
from tenacity import wait_exponential

from .errors import RetryableError


# A server (or a proxy in front of it) can send any text: waits longer than this are cut to
# it, so one odd header cannot pause a request — or, through the breaker, an upstream — for
# days. An hour is longer than any rate-limit window or model load we have seen.
MAX_RETRY_AFTER_S = 3600.0

# Where the wait may be said, first match wins: the server we talk to speaks for itself; a
# LiteLLM proxy forwards its upstream's headers under an ``llm_provider-`` prefix.
_RETRY_AFTER_HEADERS = (("retry-after-ms", 0.001), ("retry-after", 1.0),
                        ("llm_provider-retry-after-ms", 0.001), ("llm_provider-retry-after", 1.0))


def parse_retry_after(headers: Mapping[str, str] | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, retry-after, or LiteLLM's
    llm_provider-retry-after[-ms]), cut to MAX_RETRY_AFTER_S, or None.

    Values that say nothing usable (garbage, NaN, negative numbers) are skipped, so the next
    header or our own backoff decides; numbers too large (``inf``, ``1e400``) are cut."""
    if not headers:
        return None
    for name, unit in _RETRY_AFTER_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        wait = _seconds(value.strip(), unit, now, dates=unit == 1.0)
        if wait is not None:
            return min(wait, MAX_RETRY_AFTER_S)
    return None


def _seconds(value: str, unit: float, now: Callable[[], float], dates: bool) -> float | None:
    """A header value in seconds (>= 0, possibly infinite), or None when it is not one."""
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None:
        if number != number or number < 0:        # NaN or negative: not a wait
            return None
        return number * unit
    if not dates:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:           # "-0000" parses as naive; HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now())   # a date already past: go now


@dataclass(frozen=True)
class RetryPolicy:
    """Values of the retry.* settings, frozen for one request."""

    max_retries: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    multiplier: float = 2.0
    jitter: float = 0.5
    deadline_s: float = 120.0

    @classmethod
    def from_settings(cls, s: Mapping) -> "RetryPolicy":
        return cls(max_retries=s["retry.max_retries"], base_delay_s=s["retry.base_delay_s"],
                   max_delay_s=s["retry.max_delay_s"], multiplier=s["retry.multiplier"],
                   jitter=s["retry.jitter"], deadline_s=s["retry.deadline_s"])

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1


class wait_backoff_or_retry_after(tenacity.wait.wait_base):
    """Exponential backoff with jitter; the server's Retry-After replaces it when present."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self.backoff = wait_exponential(multiplier=policy.base_delay_s, exp_base=policy.multiplier,
                                        max=policy.max_delay_s)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        server = getattr(exc, "retry_in_s", None)
        if server is not None:
            return float(server)
        base = min(self.backoff(retry_state), self.policy.max_delay_s)
        # Jitter takes a random share off the wait, so waits never exceed the cap.
        return base * (1 - self.policy.jitter * self.rng.random())


def is_retryable(exc: BaseException | None) -> bool:
    """Connection errors, timeouts, 408, 409, 429 (not quota) and 5xx are worth retrying."""
    return isinstance(exc, RetryableError)
