"""optimize(): mask, run the enabled rules, restore, until a pass changes nothing."""

from __future__ import annotations

from typing import Iterable

from ..tokens import count_text
from .masking import _Mask, _NoSentinel
from .report import OptimizationReport
from .rules import _RULE_FUNCS, RULES

# Passes of mask -> rules -> restore until nothing changes. Real prompts settle in two or
# three passes. Text that has not settled after this many (only seen with adversarial
# input) comes back unchanged, so optimize() stays idempotent on every input.
_MAX_PASSES = 8


def _resolve_rules(rules: Iterable[str] | str | None) -> tuple[str, ...]:
    if rules is None:
        return tuple(RULES)
    if isinstance(rules, str):
        rules = [rules]
    wanted = set()
    for r in rules:
        if r not in RULES:
            raise ValueError(f"Unknown optimizer rule {r!r}; known rules: {', '.join(RULES)}")
        wanted.add(r)
    return tuple(r for r in RULES if r in wanted)


def _coerce(text) -> str:
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", errors="surrogateescape")
    if not isinstance(text, str):
        raise TypeError(f"optimize() needs a str prompt, not {type(text).__name__}")
    return text


_count = count_text   # robust on huge inputs (it counts them in pieces)


def optimize(text: str, rules: Iterable[str] | None = None,
             model: str | None = None) -> OptimizationReport:
    """Optimize ``text`` with ``rules`` (None = all of :data:`RULES`), counting tokens
    for ``model``. Never raises on odd text; whitespace-only prompts come back as is."""
    text = _coerce(text)
    enabled = _resolve_rules(rules)
    before = _count(text, model)
    savings = {name: 0 for name in RULES}
    current, tokens = text, before
    if text.strip() and enabled:
        for _ in range(_MAX_PASSES + 1):
            try:
                mk = _Mask(current)
            except _NoSentinel:
                break
            masked = mk.masked
            changed = False
            for name in enabled:
                new_masked = _RULE_FUNCS[name](masked, mk)
                if new_masked == masked:
                    continue
                new_text = mk.unmask(new_masked)
                new_tokens = _count(new_text, model)
                if new_tokens >= tokens:
                    continue  # a change that saves no token is not worth a diff line
                savings[name] += tokens - new_tokens
                masked, current, tokens = new_masked, new_text, new_tokens
                changed = True
            if not changed:
                break
        else:  # did not settle: give the text back untouched rather than half-done
            current, tokens, savings = text, before, {name: 0 for name in RULES}
    return OptimizationReport(original=text, optimized=current, tokens_before=before,
                              tokens_after=tokens, rule_savings=savings, rules=enabled,
                              model=model)
