"""Run-time state of the simulator: injected faults, latency and request counters."""

from __future__ import annotations

import collections
import email.utils
import random
import threading
import time
from typing import Any, Callable

SERVER_ERROR_STATUSES = (500, 502, 503, 504)
# vLLM and Ollama stream a reasoning model's thinking as delta.reasoning_content; some
# servers call the field "reasoning".
REASONING_FIELDS = ("reasoning_content", "reasoning")
_UNCHANGED = object()

_SERVER_ERROR_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The server is overloaded or not ready yet.",
    504: "Gateway timeout. The upstream server did not respond in time.",
}

_STAT_NAMES = (
    "chat_requests",
    "completions",
    "errors",
    "disconnected",
    "streams_started",
    "streams_completed",
    "streams_disconnected",
    "streams_dropped",
    "in_flight",
    "rate_limited",
    "tokenize_requests",
)


class FaultError(ValueError):
    """A bad fault or latency setting; ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ApiError(Exception):
    """An error the simulator answers with, shaped like OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI would send."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(name: str, value: Any) -> float:
    # bool is an int subclass, but `True` is never a sensible rate or duration.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FaultError(name, f"{name} must be a number, got {value!r}")
    if value < 0 or value != value:
        raise FaultError(name, f"{name} must be >= 0, got {value!r}")
    return float(value)


def _rate(name: str, value: Any) -> float:
    value = _number(name, value)
    if value > 1:
        raise FaultError(name, f"{name} must be between 0 and 1, got {value!r}")
    return value


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultError(name, f"{name} must be an integer >= 0, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FaultError(name, f"{name} must be true or false, got {value!r}")
    return value


def _header_value(name: str, value: Any) -> str:
    # Sent verbatim, so it must be one header line of latin-1 text.
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "\r\n"):
        raise FaultError(name, f"{name} must be one line of text, got {value!r}")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise FaultError(name, f"{name} must be latin-1 text, got {value!r}") from None
    return value


def _reasoning_field(name: str, value: Any) -> str:
    if value not in REASONING_FIELDS:
        raise FaultError(name, f"{name} must be one of {list(REASONING_FIELDS)}, got {value!r}")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 100_000:
        raise FaultError(name, f"{name} must be text of at most 100,000 characters, got {value!r:.60}")
    return value


def _tokenize_style(name: str, value: Any) -> str:
    if value not in ("vllm", "llama.cpp"):
        raise FaultError(name, f"{name} must be 'vllm' or 'llama.cpp', got {value!r}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _server_status(name: str, value: Any) -> int:
    if value not in SERVER_ERROR_STATUSES or isinstance(value, bool):
        raise FaultError(name, f"{name} must be one of {list(SERVER_ERROR_STATUSES)}, got {value!r}")
    return value


def _error_status(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise FaultError(name, f"{name} must be an HTTP error status (400-599), got {value!r}")
    return value


# name -> (default, validator); the single source for set_faults, faults() and the HTTP route.
_FAULTS: dict[str, tuple[Any, Callable[[str, Any], Any]]] = {
    "error_rate": (0.0, _rate),
    "error_status": (500, _server_status),
    "fail_next": (0, _count),
    "fail_status": (500, _error_status),
    "rate_limit_rate": (0.0, _rate),
    "retry_after_s": (None, _optional(_number)),
    "retry_after_ms": (None, _optional(_number)),
    "retry_after_http_date": (False, _flag),
    "quota_exhausted": (False, _flag),
    "auth_error": (False, _flag),
    "drop_after_chunks": (None, _optional(_count)),
    "slow_s": (0.0, _number),
    # Oddities of real upstreams and proxies (LiteLLM, llama.cpp, vLLM, Ollama):
    "retry_after_raw": (None, _optional(_header_value)),   # a Retry-After value sent verbatim
    "retry_after_forwarded": (False, _flag),    # Retry-After only as LiteLLM forwards it
    "malformed_next": (0, _count),              # the next answers are not valid JSON
    "malformed_after_chunks": (0, _count),      # ...for streams: after this many text chunks
    "reasoning_chunks": (0, _count),            # a reasoning model: thinking pieces first
    "reasoning_field": ("reasoning_content", _reasoning_field),
    "reasoning_pause_s": (0.0, _number),        # thinking time before each thinking piece
    # A rate limit as OpenAI enforces it (off by default): at most this many requests and/or
    # tokens per fixed window; every answer carries x-ratelimit-* headers, and a request past
    # the limit gets 429 rate_limit_exceeded with Retry-After (short windows suit tests).
    "rate_limit_requests": (None, _optional(_count)),
    "rate_limit_tokens": (None, _optional(_count)),
    "rate_limit_window_s": (60.0, _number),
    # Usage details (core/simulator/usage.py): OpenAI's prompt cache (0 = off), and
    # llama.cpp's server, which ignores stream_options.include_usage and may lack /tokenize.
    "prompt_cache_min_tokens": (1024, _count),
    "prompt_cache_step": (128, _count),
    "report_cache_writes": (False, _flag),      # prompt_tokens_details.cache_write_tokens
    "ignore_include_usage": (False, _flag),
    "tokenize_route": (True, _flag),
    "tokenize_style": ("vllm", _tokenize_style),   # /tokenize as vLLM or llama.cpp serves it
    "prompt_tokens_extra": (0, _count),         # a chat template's tokens the server adds to the prompt
    # Real models answer anything, markdown images and "$5" included: this text verbatim
    # (cut at max_tokens) instead of the generated reply, so tests can show what a page does.
    "reply_text": (None, _optional(_text)),
}


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes its resets: "120ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3f}".rstrip("0").rstrip(".") + "s"


def _header_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class Simulator:
    """Faults, latency and counters shared by the simulator's routes; safe to use from any thread."""

    def __init__(
        self,
        ttft_ms: float = 0,
        tokens_per_s: float | None = 0,
        clock: Callable[[], float] = time.monotonic,
        fault_seed: int | None = None,
    ) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(fault_seed)
        self._faults = {name: default for name, (default, _) in _FAULTS.items()}
        self._outage_until: float | None = None
        self._loading_until: float | None = None
        self._latency = {"ttft_ms": 0.0, "tokens_per_s": None}
        self._stats = dict.fromkeys(_STAT_NAMES, 0)
        self._window = (0.0, 0, 0)       # the rate limit's window: (start, requests, tokens)
        # What each window of the rate limit saw: [start, requests let through, refused].
        self._windows: collections.deque[list] = collections.deque(maxlen=1000)
        from core.simulator.usage import PromptCache   # usage imports core.tokens: load lazily
        self.prompt_cache = PromptCache()
        self.set_latency(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s)

    # ----- faults
    def set_faults(self, **patch: Any) -> dict[str, Any]:
        """Change some fault fields (others keep their value); raises ValueError on bad input."""
        unknown = sorted(set(patch) - set(_FAULTS) - {"outage_s", "loading_model_s"})
        if unknown:
            known = sorted([*_FAULTS, "outage_s", "loading_model_s"])
            raise FaultError(unknown[0], f"unknown fault field(s) {unknown}; expected some of {known}")
        outage_s = patch.pop("outage_s", None)
        if outage_s is not None:
            outage_s = _number("outage_s", outage_s)
        loading_s = patch.pop("loading_model_s", None)
        if loading_s is not None:
            loading_s = _number("loading_model_s", loading_s)
        checked = {name: _FAULTS[name][1](name, value) for name, value in patch.items()}
        with self._lock:
            merged = {**self._faults, **checked}
            if merged["retry_after_http_date"] and merged["retry_after_s"] is None:
                message = "retry_after_http_date needs retry_after_s (the delay the date is computed from)"
                raise FaultError("retry_after_http_date", message)
            if merged["rate_limit_window_s"] <= 0:
                raise FaultError("rate_limit_window_s", "rate_limit_window_s must be above 0")
            self._faults = merged
            if outage_s is not None:
                self._outage_until = self.clock() + outage_s
            if loading_s is not None:
                self._loading_until = self.clock() + loading_s
        return self.faults()

    def outage_for(self, seconds: float) -> None:
        """Answer every chat request with 503 for this many seconds of the simulator's clock."""
        self.set_faults(outage_s=seconds)

    def clear_faults(self) -> None:
        """Remove every fault, including a running outage."""
        with self._lock:
            self._faults = {name: default for name, (default, _) in _FAULTS.items()}
            self._outage_until = self._loading_until = None

    def faults(self) -> dict[str, Any]:
        """Current fault settings plus the seconds of outage and of model loading left."""
        with self._lock:
            now = self.clock()
            remaining = 0.0 if self._outage_until is None else max(0.0, self._outage_until - now)
            loading = 0.0 if self._loading_until is None else max(0.0, self._loading_until - now)
            return {**self._faults, "outage_remaining_s": remaining, "loading_remaining_s": loading}

    def loading_model_for(self, seconds: float) -> None:
        """Answer every chat request as llama.cpp does while it loads a model (503 "Loading
        model") for this many seconds of the simulator's clock."""
        self.set_faults(loading_model_s=seconds)

    def draw_malformed(self) -> bool:
        """Whether this (otherwise good) answer is sent garbled, consuming one `malformed_next`."""
        with self._lock:
            if self._faults["malformed_next"] > 0:
                self._faults["malformed_next"] -= 1
                return True
            return False

    def draw_fault(self, api_key: str | None = None) -> ApiError | None:
        """Decide whether this chat request fails, consuming one `fail_next` if set."""
        with self._lock:
            f = self._faults
            if self._outage_until is not None and self.clock() < self._outage_until:
                message = "The service is temporarily unavailable (simulated outage)."
                return ApiError(503, message, type="server_error")
            if self._loading_until is not None and self.clock() < self._loading_until:
                # llama.cpp's server, word for word (its error "code" is the status).
                return ApiError(503, "Loading model", type="unavailable_error", code=503)
            if f["auth_error"]:
                return self._error_for(401, api_key)
            if f["quota_exhausted"]:
                return ApiError(
                    429,
                    "You exceeded your current quota, please check your plan and billing details. For more "
                    "information on this error, read the docs: "
                    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                    type="insufficient_quota",
                    code="insufficient_quota",
                )
            if f["fail_next"] > 0:
                f["fail_next"] -= 1
                return self._error_for(f["fail_status"], api_key)
            # Draw only when a rate is set so a seeded Simulator's sequence depends on enabled faults alone.
            if f["rate_limit_rate"] and self._rng.random() < f["rate_limit_rate"]:
                return self._error_for(429, api_key)
            if f["error_rate"] and self._rng.random() < f["error_rate"]:
                return self._error_for(f["error_status"], api_key)
            return None

    def _error_for(self, status: int, api_key: str | None) -> ApiError:
        """The body (and headers) OpenAI sends with this status; caller holds the lock."""
        if status == 401:
            shown = f"{api_key[:3]}***{api_key[-4:]}" if api_key and len(api_key) > 8 else (api_key or "")
            return ApiError(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        if status == 429:
            return ApiError(
                429,
                "Rate limit reached for requests per min (RPM): Limit 500, Used 500, Requested 1. "
                "Please try again later. Visit https://platform.openai.com/account/rate-limits to learn more.",
                type="requests",
                code="rate_limit_exceeded",
                headers=self._retry_headers(),
            )
        if status >= 500:
            return ApiError(status, _SERVER_ERROR_MESSAGES.get(status, "Server error."), type="server_error",
                            headers=self._retry_headers() if status == 503 else None)
        if status == 404:
            return ApiError(404, "The requested resource was not found (simulated).", code="not_found")
        if status == 403:
            return ApiError(403, "You are not allowed to make this request (simulated).", code="permission_denied")
        return ApiError(status, f"Simulated error with status {status}.")

    def _retry_headers(self) -> dict[str, str]:
        """Retry-After headers of a 429 or 503; caller holds the lock."""
        f, headers = self._faults, {}
        if f["retry_after_ms"] is not None:
            headers["retry-after-ms"] = _header_number(f["retry_after_ms"])
        if f["retry_after_s"] is not None:
            if f["retry_after_http_date"]:
                # An HTTP date is wall-clock time by definition, so the injectable clock does not apply.
                headers["retry-after"] = email.utils.formatdate(time.time() + f["retry_after_s"], usegmt=True)
            else:
                headers["retry-after"] = _header_number(f["retry_after_s"])
        if f["retry_after_raw"] is not None:
            headers["retry-after"] = f["retry_after_raw"]
        if f["retry_after_forwarded"]:
            # LiteLLM's proxy passes its upstream's headers on under this prefix.
            headers = {f"llm_provider-{name}": value for name, value in headers.items()}
        return headers

    def take_rate_limit(self, tokens: int) -> tuple[ApiError | None, dict[str, str]]:
        """Count one request of ``tokens`` against the rate limit, if one is set: (a 429 when
        it is past the limit, else None; the x-ratelimit-* headers of the answer)."""
        with self._lock:
            f = self._faults
            max_req, max_tok = f["rate_limit_requests"], f["rate_limit_tokens"]
            if max_req is None and max_tok is None:
                return None, {}
            window, now = f["rate_limit_window_s"], self.clock()
            start, used_req, used_tok = self._window
            if now - start >= window or not self._windows:
                start, used_req, used_tok = now, 0, 0
                self._windows.append([start, 0, 0])
            over = ((max_req is not None and used_req + 1 > max_req)
                    or (max_tok is not None and used_tok + tokens > max_tok and used_tok > 0))
            if not over:
                used_req, used_tok = used_req + 1, used_tok + tokens
            self._windows[-1][2 if over else 1] += 1
            self._window = (start, used_req, used_tok)
            reset = _duration(max(0.0, start + window - now))
            headers = {}
            for dim, limit, used in (("requests", max_req, used_req), ("tokens", max_tok, used_tok)):
                if limit is not None:
                    headers[f"x-ratelimit-limit-{dim}"] = str(limit)
                    headers[f"x-ratelimit-remaining-{dim}"] = str(max(0, limit - used))
                    headers[f"x-ratelimit-reset-{dim}"] = reset
            if not over:
                return None, headers
            self._stats["rate_limited"] += 1
            wait = max(0.001, start + window - now)
            return ApiError(
                429, f"Rate limit reached for requests: Limit {max_req}, Used {used_req}. Please try "
                     f"again in {reset}.", type="requests", code="rate_limit_exceeded",
                headers={**headers, "retry-after-ms": _header_number(round(wait * 1000, 3)),
                         "retry-after": str(max(1, round(wait)))}), headers

    # ----- latency
    def set_latency(self, ttft_ms: float | None = None, tokens_per_s: Any = _UNCHANGED) -> dict[str, Any]:
        """Set time to first token (ms) and/or streaming speed (tokens/s; 0 or None = instant)."""
        ttft = None if ttft_ms is None else _number("ttft_ms", ttft_ms)
        speed = tokens_per_s
        if speed is not _UNCHANGED:
            # None is meaningful here (instant), so "leave as is" needs its own sentinel.
            speed = None if speed is None or speed == 0 else _number("tokens_per_s", speed)
        with self._lock:
            if ttft is not None:
                self._latency["ttft_ms"] = ttft
            if speed is not _UNCHANGED:
                self._latency["tokens_per_s"] = speed
        return self.latency()

    def latency(self) -> dict[str, Any]:
        """Current latency settings."""
        with self._lock:
            return dict(self._latency)

    # ----- counters
    def count(self, **deltas: int) -> None:
        """Add to named counters (used by the routes)."""
        with self._lock:
            for name, delta in deltas.items():
                self._stats[name] += delta

    def stats(self) -> dict[str, int]:
        """A snapshot of the request counters."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        """Zero the counters; `in_flight` keeps counting requests still being served."""
        with self._lock:
            self._stats = {**dict.fromkeys(_STAT_NAMES, 0), "in_flight": self._stats["in_flight"]}
            running = self._windows[-1] if self._windows else None
            self._windows.clear()
            if running is not None:
                self._windows.append(running)   # the window running goes on counting

    def rate_limit_windows(self) -> list[dict]:
        """The rate limit's windows since the counters were zeroed (the last 1000), oldest
        first: when each started (on the simulator's clock), the requests it let through and
        those it refused with 429."""
        with self._lock:
            return [{"start": start, "requests": let, "refused": refused}
                    for start, let, refused in self._windows]

    def asgi_app(self):
        """A new Starlette app serving the OpenAI routes and the `/_sim` control routes."""
        from core.simulator.server import build_app  # server imports this module

        return build_app(self)
