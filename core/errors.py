"""The errors Gyroscope raises, and what a person is told for each.

    GyroscopeError                      kind            outcome
    ├── ConfigError                     config          rejected
    ├── StorageError                    storage         error
    ├── RequestRejected                 rejected        rejected   (before any network call)
    │   ├── PromptTooLong               prompt_too_long
    │   └── InvalidParameter            invalid_parameter
    ├── CircuitOpen                     circuit_open    circuit_open (fail fast, carries retry_in_s)
    ├── BudgetExceeded                  budget_exceeded rejected   (a spend limit; says when it resets)
    ├── Cancelled                       cancelled       cancelled
    └── UpstreamError                   (the provider failed)     error
        ├── RetryableError              (worth another attempt)
        │   ├── RateLimited             rate_limited    (429, may carry retry_in_s)
        │   ├── ServerError             server_error    (5xx)
        │   │   └── ModelLoading        model_loading   (503 "Loading model"; not a breaker failure)
        │   ├── MalformedResponse       malformed_response (a body or SSE line that is not JSON)
        │   ├── Conflict                conflict        (409; not a breaker failure)
        │   ├── UpstreamTimeout         timeout         (and 408)
        │   └── ConnectionFailed        connection
        ├── QuotaExhausted              quota_exhausted (429 insufficient_quota)
        ├── AuthFailed                  auth            (401/403)
        ├── ModelNotFound               model_not_found (404)
        ├── BadRequest                  bad_request     (400/422, context length)
        ├── RetryLater                  retry_later     (server asks to wait past the deadline)
        └── StreamInterrupted           stream_interrupted (failed after the first token)

Pages, the API and the CLI show ``user_message``; nobody writes their own wording.
"""

from __future__ import annotations

import datetime as dt
import math
import time


class GyroscopeError(Exception):
    """Base of every error Gyroscope raises on purpose."""

    kind = "error"
    outcome = "error"
    breaker_failure = False      # True: counts against the upstream's circuit breaker
    status: int | None = None
    retry_in_s: float | None = None

    def __init__(self, message: str = "", *, status: int | None = None,
                 retry_in_s: float | None = None, detail: str | None = None) -> None:
        super().__init__(message or self.default_message())
        if status is not None:
            self.status = status
        # A wait must be a finite number of seconds: Infinity or NaN would make every JSON
        # answer that carries it invalid (and Retry-After headers impossible to write).
        if retry_in_s is not None and math.isfinite(retry_in_s):
            self.retry_in_s = max(0.0, float(retry_in_s))
        self.detail = detail

    def default_message(self) -> str:
        return "Something went wrong."

    @property
    def user_message(self) -> str:
        """Plain words for a person: what happened and what to do."""
        return str(self)

    def message_in(self, zone=None) -> str:
        """``user_message`` with any clock time in ``zone`` (a tzinfo; None = the server's)."""
        return self.user_message

    def as_dict(self) -> dict:
        """JSON-friendly form used by the API and `--json` CLI output."""
        out = {"kind": self.kind, "message": self.user_message}
        out["retry_in_s"] = None if self.retry_in_s is None else round(self.retry_in_s, 3)
        if self.status is not None:
            out["status"] = self.status
        return out


class ConfigError(GyroscopeError):
    kind = "config"
    outcome = "rejected"


class StorageError(GyroscopeError):
    kind = "storage"


class RequestRejected(GyroscopeError):
    kind = "rejected"
    outcome = "rejected"


class PromptTooLong(RequestRejected):
    kind = "prompt_too_long"


class InvalidParameter(RequestRejected):
    kind = "invalid_parameter"


class CircuitOpen(GyroscopeError):
    kind = "circuit_open"
    outcome = "circuit_open"

    @property
    def user_message(self) -> str:
        return self.message_in(None)

    def message_in(self, zone=None) -> str:
        wait = max(0.0, self.retry_in_s or 0.0)
        at = dt.datetime.fromtimestamp(time.time() + wait, zone).strftime("%H:%M:%S")
        return (f"The AI service is paused after repeated failures — next try in {wait:.0f} s "
                f"(at {at}). Nothing was sent; try again then.")


class BudgetExceeded(GyroscopeError):
    """A spend limit would be passed (core/budgets.py): refused before anything is sent."""

    kind = "budget_exceeded"
    outcome = "rejected"

    def __init__(self, message: str = "", *, resets_at: float | None = None,
                 retry_in_s: float | None = None) -> None:
        super().__init__(message, retry_in_s=retry_in_s)
        self.resets_at = resets_at

    def default_message(self) -> str:
        return "The spending budget is used up. Nothing was sent."

    def as_dict(self) -> dict:
        out = super().as_dict()
        if self.resets_at is not None:     # viewer-neutral: ISO 8601 in UTC
            out["resets_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.resets_at))
        return out


class Cancelled(GyroscopeError):
    kind = "cancelled"
    outcome = "cancelled"

    def default_message(self) -> str:
        return "Stopped."


class UpstreamError(GyroscopeError):
    kind = "upstream"


class RetryableError(UpstreamError):
    """A failure another attempt may fix."""


class RateLimited(RetryableError):
    kind = "rate_limited"
    breaker_failure = True

    def default_message(self) -> str:
        return "The AI service is rate limiting us. Wait a moment and try again."


class ServerError(RetryableError):
    kind = "server_error"
    breaker_failure = True

    def default_message(self) -> str:
        return "The AI service had an internal error. Try again in a moment."


class ModelLoading(ServerError):
    """503 "Loading model" from a local server starting up (llama.cpp, Ollama): retried with
    backoff, but not counted by the breaker — the upstream is coming up, not failing."""

    kind = "model_loading"
    breaker_failure = False

    def default_message(self) -> str:
        return ("The AI server is still loading the model. Try again in a minute; large models "
                "can take several minutes to load.")


class MalformedResponse(RetryableError):
    """The upstream answered with something that is not the JSON it promised."""

    kind = "malformed_response"
    breaker_failure = True

    def default_message(self) -> str:
        return ("The AI service sent a garbled answer (not valid JSON). Try again; if it keeps "
                "happening, check the server or proxy at OPENAI_BASE_URL.")


class UpstreamTimeout(RetryableError):
    kind = "timeout"
    breaker_failure = True

    def default_message(self) -> str:
        return "The AI service did not answer in time. Try again, or raise the timeout in Settings."


class ConnectionFailed(RetryableError):
    kind = "connection"
    breaker_failure = True

    def default_message(self) -> str:
        return "Could not reach the AI service. Check OPENAI_BASE_URL and your network."


class Conflict(RetryableError):
    """409: worth another try, but says nothing about the upstream's health."""

    kind = "conflict"

    def default_message(self) -> str:
        return "The AI service reported a conflict with another request. Try again."


class QuotaExhausted(UpstreamError):
    kind = "quota_exhausted"

    def default_message(self) -> str:
        return ("The API account has run out of quota. Add credit or raise the limit in the "
                "provider's billing page, then try again.")


class AuthFailed(UpstreamError):
    kind = "auth"

    def default_message(self) -> str:
        return "The API key was refused. Check OPENAI_API_KEY (or .streamlit/secrets.toml)."


class ModelNotFound(UpstreamError):
    kind = "model_not_found"

    def default_message(self) -> str:
        return "That model does not exist on this server. Pick another model."


class BadRequest(UpstreamError):
    kind = "bad_request"

    def default_message(self) -> str:
        return "The AI service refused the request as invalid."


class RetryLater(UpstreamError):
    kind = "retry_later"

    @property
    def user_message(self) -> str:
        wait = max(0.0, self.retry_in_s or 0.0)
        return (f"The AI service asked us to wait {wait:.1f} s, longer than the request's "
                f"deadline allows. Try again in {wait:.0f} s.")


class StreamInterrupted(UpstreamError):
    kind = "stream_interrupted"
    breaker_failure = True

    def default_message(self) -> str:
        return "The answer was cut off by the AI service. The partial text is kept; try again."
