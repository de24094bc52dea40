"""Sentence boundaries: what comes before a position, and imperative openings."""

from __future__ import annotations

import re

from ..masking import _Mask

_TERMINATORS = ".!?…"
_CJK_TERMINATORS = "。！？"
_CLAUSE_WORDS = re.compile(r"(?:^|\W)(?:and|but|also|then|so|now|first|next|finally|lastly|"
                           r"additionally|afterwards|und|y|et)[ \t]*,?[ \t]+\Z", re.I)
_ABBREVIATIONS = re.compile(r"(?:^|\W)(?:e\.g|i\.e|etc|vs|cf|approx|Mr|Mrs|Ms|Dr|St|No|Nr|"
                            r"z\.B|bzw|ca|usw|p\.ex|(?-i:[A-Z]))\.\Z", re.I)


def _context(s: str, i: int, mk: _Mask) -> str | None:
    """'sentence', 'list', 'clause' or None: what comes right before position i."""
    j, k = i, 0
    while j > 0 and s[j - 1] in " \t" and k < 64:
        j -= 1
        k += 1
    if j == 0 or s[j - 1] == "\n":
        return "sentence"
    c = s[j - 1]
    if c == mk.cl and j < i:
        k = max(s.rfind(mk.oi, max(0, j - 16), j), s.rfind(mk.ob, max(0, j - 16), j))
        if k >= 0:
            tail = mk.unmask(s[k:j]).rstrip("\"'”’»」』)")
            if tail[-1:] in _TERMINATORS + _CJK_TERMINATORS:
                return "sentence"
        return None
    if c in _CJK_TERMINATORS:
        return "sentence"
    if c in _TERMINATORS and j < i:
        if c == "." and _ABBREVIATIONS.search(s, max(0, j - 8), j):
            return None
        return "sentence"
    if c in ")\"'”’»」" and j >= 2 and s[j - 2] in _TERMINATORS and j < i:
        return "sentence"
    nl = s.rfind("\n", max(0, i - 48), i)
    if nl >= 0 or i <= 48:
        if mk.list_prefix.fullmatch(s, nl + 1, i):
            return "list"
    if c in ",;" and j < i:
        return "clause"
    if j < i and _CLAUSE_WORDS.search(s, max(0, i - 24), i):
        return "clause"
    return None


_WORD = re.compile(r"[^\W\d_][\w'’-]{0,40}")


def _imperative_sentence(s: str, i: int, mk: _Mask) -> bool:
    """Does the sentence around position i start with an imperative verb?"""
    k = i - 1
    lo = max(0, i - 400)
    while k >= lo:
        c = s[k]
        if c == "\n" or (c in "!?" or (c == "." and not _ABBREVIATIONS.search(
                s, max(0, k - 8), k + 1))) and k + 1 < len(s) and s[k + 1] in " \t":
            break
        k -= 1
    if k < lo and lo > 0:
        return False
    start = k + 1
    nl = mk.list_prefix.match(s, start)
    if nl:
        start = nl.end()
    while start < i and s[start] in " \t":
        start += 1
    w = _WORD.match(s, start)
    return bool(w) and w.group(0).lower() in _IMPERATIVE



_IMPERATIVE = frozenset("""
be use keep make write return respond reply answer avoid include add remove ensure provide
give list format output focus mention limit start end begin finish always never do dont don't
please remember note check explain describe summarize summarise translate rewrite highlight
stick follow try aim prefer consider ignore skip omit mark label sort group show cite quote
state indicate sign address treat stay wrap put place call name capitalize spell verify count
number separate structure organize organise lead open close conclude reference refer link tag
assume imagine act pretend think reason generate create draft produce compose suggest
recommend propose estimate compare rank rate score classify extract identify find flag point
send tell let emphasize emphasise maintain preserve retain match mirror adopt target speak
talk refrain restrict cap stop continue repeat go get take leave convert replace change fix
correct improve shorten simplify clarify expand elaborate define detail outline break split
merge combine insert append prepend utilize employ double-check only make sure respond
""".split())
