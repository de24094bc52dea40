"""Usage details the simulator reports as OpenAI does: cached prompt tokens from a prompt
cache, hidden reasoning tokens of reasoning models, and a server tokenizer (``/tokenize``).

Prompt cache (OpenAI's rule, made deterministic): a prompt of at least ``min_tokens``
tokens is cached in steps of ``step`` tokens. A request's ``cached_tokens`` is the longest
such prefix (``min_tokens + k * step``) that an earlier request to the same model began with;
every request then stores its own prefixes. No expiry: tests repeat prompts on purpose.

Reasoning: models named like OpenAI's reasoning models (o1, o3, o4-mini, gpt-5, gpt-oss)
think before answering. Their hidden thinking is ``HIDDEN_REASONING_TOKENS`` tokens (cut so
the answer and the thinking stay within max_tokens), counted in ``completion_tokens`` and
reported as ``completion_tokens_details.reasoning_tokens``; visible thinking (the
``reasoning_chunks`` fault) is counted the same way.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict

from core import tokens

HIDDEN_REASONING_TOKENS = 32
_REASONING_NAME = re.compile(r"^(o\d|gpt-5|gpt-oss)", re.IGNORECASE)


def is_reasoning_model(model: str) -> bool:
    """Whether the simulator treats ``model`` as a reasoning model."""
    return bool(_REASONING_NAME.match(model))


def prompt_token_ids(messages: list[dict], model: str) -> list[int]:
    """The prompt as token ids, in a fixed layout (role, then content, per message)."""
    text = "".join(f"<|{m['role']}|>{m.get('content') or ''}\n" for m in messages)
    return tokens.encoding_for(model).encode(text, disallowed_special=())


class PromptCache:
    """Prefix hashes of earlier prompts, per model; thread-safe, bounded (oldest forgotten)."""

    def __init__(self, max_prefixes: int = 100_000) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self.max_prefixes = max_prefixes

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def lookup_and_store(self, model: str, ids: list[int], min_tokens: int, step: int) -> tuple[int, int]:
        """(cached tokens, tokens newly written to the cache) of this prompt, (0, 0) under
        ``min_tokens``; remembers its prefixes."""
        if min_tokens <= 0 or len(ids) < min_tokens:
            return 0, 0
        step = max(1, step)
        digest, keys, done = hashlib.sha256(model.encode()), [], 0
        for end in range(min_tokens, len(ids) + 1, step):
            digest.update(repr(ids[done:end]).encode())
            done = end
            keys.append((end, digest.copy().digest()))
        cached = 0
        with self._lock:
            for end, key in keys:
                if key in self._seen:
                    cached = end
                    self._seen.move_to_end(key)
                else:
                    self._seen[key] = None
            while len(self._seen) > self.max_prefixes:
                self._seen.popitem(last=False)
        return cached, keys[-1][0] - cached


def hidden_reasoning(model: str, visible_tokens: int, max_tokens: int | None) -> int:
    """Hidden thinking tokens of a reasoning model (0 for other models)."""
    if not is_reasoning_model(model):
        return 0
    if max_tokens is None:
        return HIDDEN_REASONING_TOKENS
    return max(0, min(HIDDEN_REASONING_TOKENS, max_tokens - visible_tokens))


_FRAME = 100264   # a stand-in id for OpenAI's per-message framing tokens


def message_token_ids(messages: list[dict], model: str) -> list[int]:
    """Token ids of a chat prompt as the server counts it: exactly ``prompt_tokens`` ids
    (the framing OpenAI adds around each message as stand-in ids)."""
    enc = tokens.encoding_for(model)
    ids = [_FRAME] * tokens.TOKENS_PER_REPLY
    for message in messages:
        ids += [_FRAME] * tokens.TOKENS_PER_MESSAGE
        for key in ("role", "content", "name"):
            value = message.get(key)
            if isinstance(value, str) and value:
                ids += enc.encode(value, disallowed_special=())
    return ids
