"""OptimizationReport: what optimize() did, with token figures and a diff."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

_DIFF_LIMIT = 200_000

@dataclass
class OptimizationReport:
    """What :func:`optimize` did: the texts, the token figures and a diff."""

    original: str
    optimized: str
    tokens_before: int
    tokens_after: int
    rule_savings: dict[str, int] = field(default_factory=dict)
    rules: tuple[str, ...] = ()
    model: str | None = None

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after

    @property
    def saved_ratio(self) -> float:
        if self.tokens_before <= 0:
            return 0.0
        return max(0.0, min(1.0, self.tokens_saved / self.tokens_before))

    @property
    def changed(self) -> bool:
        return self.optimized != self.original

    def diff(self, context: int = 1) -> str:
        """A unified diff of original -> optimized ("" when nothing changed)."""
        if not self.changed:
            return ""
        lines = difflib.unified_diff(self.original.splitlines(), self.optimized.splitlines(),
                                     fromfile="original", tofile="optimized", n=context,
                                     lineterm="")
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {
            "original": self.original,
            "optimized": self.optimized,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "tokens_saved": self.tokens_saved,
            "saved_ratio": round(self.saved_ratio, 4),
            "rule_savings": dict(self.rule_savings),
            "rules": list(self.rules),
            "changed": self.changed,
            "model": self.model,
            # difflib is slow on huge texts: past 200k characters ask diff() explicitly
            "diff": self.diff() if len(self.original) <= _DIFF_LIMIT else None,
        }
