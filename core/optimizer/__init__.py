"""Prompt optimizer: deterministic, explainable rules that save real tokens and never
change what a prompt means.

How it works
------------
1. **Mask.** Everything that must survive byte for byte is replaced by an opaque
   placeholder made of private-use characters that do not occur in the text: fenced
   code (``` and ~~~, unterminated fences run to the end), triple-quoted and XML-tagged
   blocks, blockquotes, JSON and YAML blocks, payloads (the text a prompt asks to
   translate, proofread, classify ...), inline `code`, template variables, URLs,
   e-mail addresses, negations, quoted text and numbers.
2. **Rules.** The enabled rules of :data:`RULES` run in order on the masked text. Each
   rule's saving is measured with the real tokenizer (:func:`core.tokens.count_text`);
   a rule whose change would cost tokens is dropped for that pass.
3. **Restore** the placeholders, and repeat from 1 until a pass changes nothing, so
   ``optimize(optimize(x).optimized).optimized == optimize(x).optimized``.

Every regular expression here is linear: no nested or overlapping quantifiers, long
runs are bounded or possessive, and block searches move forward only.
"""

from __future__ import annotations

from .driver import optimize
from .report import OptimizationReport
from .rules import RULES

__all__ = ["RULES", "OptimizationReport", "optimize"]
