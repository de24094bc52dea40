"""The rules, in application order: name -> one line of help, and name -> function."""

from __future__ import annotations

from typing import Callable

from ..masking import _Mask
from .duplicates import _rule_duplicates
from .filler import _rule_filler
from .layout import _rule_separators, _rule_trailing_spaces, _rule_whitespace

# Rule name -> one line of help, in application order.
RULES: dict[str, str] = {
    "whitespace": "Collapse runs of spaces inside a line and more than one blank line; keep "
                  "paragraphs, list items, table rows and indentation.",
    "trailing_spaces": "Remove spaces and tabs at the end of lines.",
    "filler": "Remove politeness and filler phrases (\"Could you please\", \"I would like you "
              "to\", \"Thanks in advance!\", \"basically\" ...) where that is safe, and fix the "
              "capital letter of the sentence.",
    "duplicates": "Drop an instruction sentence or line repeated verbatim or differing only in "
                  "case or spacing; the first occurrence stays.",
    "separators": "Shorten over-long separator lines (==========, ----------, **********) to "
                  "three characters; table separators and YAML --- stay.",
}

_RULE_FUNCS: dict[str, Callable[[str, _Mask], str]] = {
    "whitespace": _rule_whitespace,
    "trailing_spaces": _rule_trailing_spaces,
    "filler": _rule_filler,
    "duplicates": _rule_duplicates,
    "separators": _rule_separators,
}
