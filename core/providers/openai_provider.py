"""The `openai` provider: the official SDK against any OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import weakref
from typing import AsyncIterator

import httpx2
import openai
from openai._base_client import make_request_options
from openai._constants import RAW_RESPONSE_HEADER
from openai.types.chat import ChatCompletionChunk

from .. import errors
from ..config import redact_url
from ..retry import parse_retry_after
from .base import Completion, Delta, Provider, Stream, Timeouts, Usage

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_sync_lock = threading.Lock()
# llama.cpp's server and Ollama answer 503 "Loading model" while a model loads; Hugging
# Face's servers say "Model ... is currently loading".
_LOADING = re.compile(r"loading model|model\b.{0,200}\bis (currently )?loading", re.IGNORECASE)


def rate_headers(headers) -> dict | None:
    """The x-ratelimit-* headers of a response (what pacing learns from), or None."""
    if headers is None:
        return None
    found = {k: v for k, v in headers.items() if k.startswith("x-ratelimit-")}
    return found or None


def classify(exc: BaseException, base_url: str, model: str | None = None) -> errors.GyroscopeError:
    """The Gyroscope error for an SDK or transport exception; an HTTP error carries its
    x-ratelimit-* headers as ``rate_headers`` (a 429 says when the window turns)."""
    err = _classify(exc, base_url, model)
    response = getattr(exc, "response", None)
    if isinstance(exc, openai.APIStatusError) and response is not None:
        err.rate_headers = rate_headers(response.headers)
    return err


def _classify(exc: BaseException, base_url: str, model: str | None = None) -> errors.GyroscopeError:
    if isinstance(exc, errors.GyroscopeError):
        return exc
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        # The SDK parses bodies and SSE lines with json.loads and lets its error through.
        return errors.MalformedResponse(detail=f"{exc.__class__.__name__}: {exc}")
    if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException, asyncio.TimeoutError)):
        return errors.UpstreamTimeout()
    if isinstance(exc, openai.APIConnectionError) or isinstance(exc, httpx2.TransportError):
        return errors.ConnectionFailed(
            f"Could not reach the AI service at {base_url}. Check OPENAI_BASE_URL and that the "
            "server is running.", detail=str(exc))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = getattr(exc, "code", None)
        detail = _message(exc)
        wait = parse_retry_after(exc.response.headers if exc.response is not None else None)
        if status == 429 and code == "insufficient_quota":
            return errors.QuotaExhausted(status=status, detail=detail)
        if status == 429:
            return errors.RateLimited(status=status, retry_in_s=wait, detail=detail)
        if status in (401, 403):
            return errors.AuthFailed(status=status, detail=detail)
        if status == 404 and code != "model_not_found" and "model" not in detail.lower():
            return errors.BadRequest(
                f"The server at {base_url} has no chat completions endpoint (404). Check "
                "OPENAI_BASE_URL; for most servers it ends in /v1.", status=status, detail=detail)
        if status == 404:
            return errors.ModelNotFound(
                f"The model {model!r} was not found at {base_url}. Pick another model."
                if model else "", status=status, detail=detail)
        if status == 408:
            return errors.UpstreamTimeout(status=status, retry_in_s=wait, detail=detail)
        if status == 409:
            return errors.Conflict(status=status, retry_in_s=wait, detail=detail)
        if status == 503 and _LOADING.search(detail):
            return errors.ModelLoading(status=status, retry_in_s=wait, detail=detail)
        if status >= 500:
            return errors.ServerError(status=status, retry_in_s=wait, detail=detail)
        if code == "context_length_exceeded":
            return errors.PromptTooLong(
                f"The prompt is longer than {model}'s context window. Shorten it.", status=status,
                detail=detail)
        return errors.BadRequest(f"The AI service refused the request: {detail}", status=status,
                                 detail=detail)
    if isinstance(exc, openai.APIError):   # e.g. an error event inside a stream
        return errors.ServerError(f"The AI service reported an error: {exc.message}", detail=str(exc))
    if isinstance(exc, httpx2.HTTPError):
        return errors.ConnectionFailed(detail=str(exc))
    return errors.UpstreamError(f"Unexpected failure: {exc.__class__.__name__}", detail=str(exc))


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    msg = inner.get("message") if isinstance(inner, dict) else None
    return str(msg or exc.message)


def _reasoning(part) -> str:
    """The thinking of a reasoning model: vLLM and Ollama say ``reasoning_content``, some
    servers ``reasoning`` (both arrive as extra fields the SDK keeps)."""
    get = part.get if isinstance(part, dict) else functools.partial(getattr, part)
    text = get("reasoning_content", None) or get("reasoning", None)
    return text if isinstance(text, str) else ""


def _detail(part, *names: str) -> int:
    """The first of ``names`` that ``part`` (an SDK object, a dict, or None) carries, as an int."""
    for name in names:
        value = part.get(name) if isinstance(part, dict) else getattr(part, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def usage_of(u) -> Usage:
    """Usage with its details: cached prompt tokens (OpenAI, vLLM), cache writes (OpenRouter's
    ``cache_write_tokens``, Anthropic-style ``cache_creation_input_tokens`` through proxies),
    reasoning tokens; each detail is part of the prompt or completion count. ``u`` is the
    SDK's object (streams) or the answer's JSON."""
    get = u.get if isinstance(u, dict) else functools.partial(getattr, u)
    prompt = get("prompt_tokens_details", None)
    completion = get("completion_tokens_details", None)
    return Usage(get("prompt_tokens", None) or 0, get("completion_tokens", None) or 0,
                 cached_tokens=_detail(prompt, "cached_tokens"),
                 cache_write_tokens=(_detail(prompt, "cache_write_tokens", "cache_creation_tokens")
                                     or _detail(u, "cache_creation_input_tokens")),
                 reasoning_tokens=_detail(completion, "reasoning_tokens"))


def _completion(data, headers=None) -> Completion:
    """A Completion from the answer's JSON (a dict, as the server sent it); an answer with no
    message is a plain error."""
    if isinstance(data, (str, bytes)):
        # The body came without a JSON content type: the SDK hands it back as text. Some
        # servers label JSON wrongly, so it is still read when it parses.
        try:
            data = json.loads(data)
        except ValueError:
            raise errors.MalformedResponse(detail=f"not JSON: {data[:200]!r}") from None
    if not isinstance(data, dict):
        raise errors.MalformedResponse(detail=f"not a JSON object: {str(data)[:200]!r}")
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise errors.ServerError("The AI service sent an answer with no text. Try again.")
    usage = data.get("usage")
    logprobs = choice.get("logprobs")
    content = message.get("content")
    # finish_reason stays None when the server did not say the answer is complete, so
    # such an answer is never cached.
    return Completion(content=content if isinstance(content, str) else "", model=data.get("model"),
                      finish_reason=choice.get("finish_reason"),
                      usage=usage_of(usage) if isinstance(usage, dict) and usage else None,
                      reasoning=_reasoning(message), tool_calls=message.get("tool_calls") or None,
                      choices=choices if len(choices) > 1 else None,
                      logprobs=logprobs if isinstance(logprobs, dict) else None,
                      headers=rate_headers(headers))


def _dump_list(items) -> list[dict] | None:
    """SDK objects (tool calls, tool-call pieces) as plain dicts, or None when there are none."""
    return [item.model_dump(exclude_unset=True) for item in items] if items else None


def _chat_options(timeout: httpx2.Timeout):
    # The raw response (parsed by the caller) keeps the headers pacing learns from.
    return make_request_options(timeout=timeout, security={"bearer_auth": True},
                                extra_headers={RAW_RESPONSE_HEADER: "true"})


# The SDK's ``chat.completions.create`` first walks the whole body against its TypedDicts
# (measured: ~0.4 ms of CPU per call, most of the gap to the raw client at 1000 concurrent).
# For a body that is already plain JSON (no file objects, no dates) that walk changes
# nothing, so the request goes out through the client's own ``post``: same auth, headers,
# timeouts, error classes and response types. A plain answer comes back as its JSON
# (``cast_to=object``), not as a ``ChatCompletion``: parsing into the SDK's model cost
# ~0.15-0.2 ms of CPU per answer (1.40 against 1.24 ms a request, bench figures in
# docs/benchmarks.md), and what Gyroscope keeps of it is read from the JSON as it came
# (the model's model_dump gave the same dicts back).
async def _post_chat(client: openai.AsyncOpenAI, params: dict, timeout: httpx2.Timeout,
                     stream: bool = False):
    return await client.post("/chat/completions", body=params, cast_to=object,
                             options=_chat_options(timeout), stream=stream,
                             stream_cls=openai.AsyncStream[ChatCompletionChunk])


def _post_chat_blocking(client: openai.OpenAI, params: dict, timeout: httpx2.Timeout):
    return client.post("/chat/completions", body=params, cast_to=object,
                       options=_chat_options(timeout))


class _OpenAIStream(Stream):
    def __init__(self, sdk_stream, base_url: str, model: str) -> None:
        self._sdk = sdk_stream
        self._base_url = base_url
        self._model = model

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            async for chunk in self._sdk:
                usage = None
                if chunk.usage is not None:
                    usage = usage_of(chunk.usage)
                if chunk.choices:
                    for choice in chunk.choices:   # one each, but n > 1 interleaves indexes
                        delta = choice.delta
                        text = (delta.content or "") if delta is not None else ""
                        yield Delta(text=text, finish_reason=choice.finish_reason, usage=usage,
                                    model=chunk.model, index=choice.index or 0,
                                    reasoning=_reasoning(delta) if delta is not None else "",
                                    tool_calls=_dump_list(delta.tool_calls) if delta is not None else None,
                                    logprobs=choice.logprobs.model_dump(exclude_unset=True)
                                    if choice.logprobs else None)
                        usage = None
                elif usage is not None:
                    yield Delta(usage=usage, model=chunk.model)
        except (openai.APIError, httpx2.HTTPError, OSError, json.JSONDecodeError,
                UnicodeDecodeError) as exc:
            raise classify(exc, self._base_url, self._model) from exc

    async def aclose(self) -> None:
        await self._sdk.close()


# httpcore's pool scans every connection each time it places or releases a request, so one
# client with 1000 requests in flight does O(n²) work: measured at 1000 concurrent through
# /v1, half the gateway's CPU went to that scan. Requests spread over a few clients, each
# pool is an eighth of the size (and keeps its own idle connections for the next burst).
POOL_SHARDS = 8


@functools.cache
def _ssl_context():
    """One TLS context for every client: loading the CA bundle takes ~0.1-0.2 s each time."""
    return httpx2.create_ssl_context()


class _Shards:
    """Up to POOL_SHARDS clients of one event loop, made as they are first needed, handed
    out in turn."""

    __slots__ = ("made", "_make", "_turn")

    def __init__(self, make) -> None:
        self.made: list = []
        self._make = make
        self._turn = 0

    def next(self):
        if len(self.made) < POOL_SHARDS:
            self.made.append(self._make())
            return self.made[-1]
        self._turn = (self._turn + 1) % POOL_SHARDS
        return self.made[self._turn]


class OpenAIProvider(Provider):
    """Chat completions through the official SDK with its own retries off: ``AsyncOpenAI``
    for async callers and streams, ``OpenAI`` for sync callers' plain answers."""

    name = "openai"

    def __init__(self, api_key: str | None, base_url: str | None = None) -> None:
        self._url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        # What is shown, recorded and keyed on: never the URL's user, password or query.
        self.base_url = redact_url(self._url)
        self._api_key = api_key or "not-needed"
        # httpx connection pools belong to one event loop: one client per loop.
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shards]" = (
            weakref.WeakKeyDictionary())
        self._sync_client: openai.OpenAI | None = None

    def sync_client(self) -> openai.OpenAI:
        """The blocking client, shared by every thread (its connection pool is thread-safe)."""
        client = self._sync_client
        if client is None:
            with _sync_lock:
                client = self._sync_client
                if client is None:
                    client = self._sync_client = openai.OpenAI(
                        api_key=self._api_key, base_url=self._url, max_retries=0)
        return client

    def client(self) -> openai.AsyncOpenAI:
        """One of the loop's POOL_SHARDS clients, in turn."""
        loop = asyncio.get_running_loop()
        shards = self._clients.get(loop)
        if shards is None:
            shards = self._clients[loop] = _Shards(lambda: openai.AsyncOpenAI(
                api_key=self._api_key, base_url=self._url, max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(verify=_ssl_context())))
        return shards.next()

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _timeout(t: Timeouts) -> httpx2.Timeout:
        return httpx2.Timeout(t.read, connect=t.connect)

    async def complete(self, params: dict, timeout: Timeouts) -> Completion:
        try:
            raw = await _post_chat(self.client(), params, self._timeout(timeout))
            resp = raw.parse()
        except Exception as exc:  # noqa: BLE001 - every failure is classified
            raise classify(exc, self.base_url, params.get("model")) from exc
        return _completion(resp, raw.headers)

    def complete_blocking(self, params: dict, timeout: Timeouts) -> Completion:
        try:
            raw = _post_chat_blocking(self.sync_client(), params, self._timeout(timeout))
            resp = raw.parse()
        except Exception as exc:  # noqa: BLE001 - every failure is classified
            raise classify(exc, self.base_url, params.get("model")) from exc
        return _completion(resp, raw.headers)

    async def stream(self, params: dict, timeout: Timeouts) -> Stream:
        try:
            raw = await _post_chat(
                self.client(), {**params, "stream": True, "stream_options": {"include_usage": True}},
                self._timeout(timeout), stream=True)
            sdk_stream = raw.parse()
        except Exception as exc:  # noqa: BLE001
            raise classify(exc, self.base_url, params.get("model")) from exc
        stream = _OpenAIStream(sdk_stream, self.base_url, params.get("model", ""))
        stream.headers = rate_headers(raw.headers)
        return stream

    async def count_tokens(self, model: str, messages: list[dict], text: str) -> tuple[int, int] | None:
        """The server's POST /tokenize (vLLM, llama.cpp); see providers/tokenize.py."""
        tokenizer = self.__dict__.get("_tokenizer")
        if tokenizer is None:
            from .tokenize import ServerTokenizer
            tokenizer = self.__dict__["_tokenizer"] = ServerTokenizer()
        return await tokenizer.count(self.client(), self._url, model, messages, text)

    async def models(self) -> list[str]:
        try:
            page = await self.client().models.list(timeout=10)
        except Exception as exc:  # noqa: BLE001
            raise classify(exc, self.base_url) from exc
        return sorted(m.id for m in page.data)

    async def aclose(self) -> None:
        for shards in list(self._clients.values()):
            for client in shards.made:
                await client.close()
        self._clients.clear()
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None
