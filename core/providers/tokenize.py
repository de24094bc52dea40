"""Token counts from the upstream's own tokenizer, for streams that end without usage
(llama.cpp's server ignores ``stream_options.include_usage``).

vLLM serves ``POST /tokenize`` at the server's root: ``{"model", "messages"}`` counts a chat
prompt with the model's chat template (``{"count", "tokens"}``), ``{"model", "prompt"}`` a
text. llama.cpp's ``/tokenize`` takes ``{"content"}`` only, so a chat prompt goes through its
``POST /apply-template`` first. A server without either answers 404: it is then not asked
again for ``RETRY_AFTER_S`` and the pipeline estimates with tiktoken instead.
"""

from __future__ import annotations

import time

import openai

RETRY_AFTER_S = 600.0
TIMEOUT_S = 2.0


def server_root(base_url: str) -> str:
    """The server's root URL (where /tokenize lives): the base URL without its /v1."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def _count(answer) -> int | None:
    if not isinstance(answer, dict):
        return None
    count = answer.get("count")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    ids = answer.get("tokens")
    return len(ids) if isinstance(ids, list) else None


class ServerTokenizer:
    """Asks one upstream's /tokenize through the provider's own client (its key, its pool)."""

    def __init__(self) -> None:
        self.unavailable_until = 0.0

    async def count(self, client: openai.AsyncOpenAI, base_url: str, model: str, messages: list[dict],
                    text: str) -> tuple[int, int] | None:
        """(prompt tokens, tokens of ``text``) as the server counts them, or None."""
        if time.monotonic() < self.unavailable_until:
            return None
        root = server_root(base_url)
        options = {"timeout": TIMEOUT_S, "max_retries": 0}
        try:
            prompt = _count(await client.post(f"{root}/tokenize", cast_to=object, options=options,
                                              body={"model": model, "messages": messages}))
            if not prompt:      # llama.cpp: no chat template on /tokenize; apply it first
                templated = await client.post(f"{root}/apply-template", cast_to=object, options=options,
                                              body={"messages": messages})
                text_prompt = templated.get("prompt") if isinstance(templated, dict) else None
                if not isinstance(text_prompt, str):
                    raise ValueError("no chat template")
                prompt = _count(await client.post(f"{root}/tokenize", cast_to=object, options=options,
                                                  body={"content": text_prompt, "add_special": True}))
            completion = _count(await client.post(
                f"{root}/tokenize", cast_to=object, options=options,
                body={"model": model, "prompt": text, "content": text, "add_special_tokens": False}))
        except (openai.APIError, ValueError, TypeError, AttributeError):
            self.unavailable_until = time.monotonic() + RETRY_AFTER_S
            return None
        if prompt is None or completion is None:
            self.unavailable_until = time.monotonic() + RETRY_AFTER_S
            return None
        return prompt, completion
