"""The prompt corpus (corpus.jsonl) and helpers shared by the optimizer's tests and bench."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS_FILE = Path(__file__).with_name("corpus.jsonl")


def load_corpus() -> list[dict]:
    """Every record: id, category, verbose, prompt, protected."""
    return [json.loads(line) for line in CORPUS_FILE.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def big_prompt(corpus: list[dict], size: int) -> str:
    """``size`` characters of corpus prompts, one after another, split by --- lines."""
    parts, n, i = [], 0, 0
    while n < size:
        piece = corpus[i % len(corpus)]["prompt"] + "\n\n---\n\n"
        parts.append(piece)
        n += len(piece)
        i += 1
    return "".join(parts)[:size]
