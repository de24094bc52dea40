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

import bisect
import difflib
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .tokens import count_text

__all__ = ["RULES", "OptimizationReport", "optimize"]

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

# Passes of mask -> rules -> restore until nothing changes. Real prompts settle in two or
# three passes. Text that has not settled after this many (only seen with adversarial
# input) comes back unchanged, so optimize() stays idempotent on every input.
_MAX_PASSES = 8


# --------------------------------------------------------------------------- report

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


# --------------------------------------------------------------------------- masking

class _NoSentinel(Exception):
    """Every candidate private-use block occurs in the text (adversarial input)."""


_PUA_RANGES = ((0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))
_SENTINEL_COUNT = 13  # block-open, inline-open, close, ten digits


def _pick_sentinels(text: str) -> str:
    present = set(text)
    for lo, hi in _PUA_RANGES:
        for start in range(lo, hi - _SENTINEL_COUNT, _SENTINEL_COUNT):
            chars = "".join(chr(start + i) for i in range(_SENTINEL_COUNT))
            if not any(c in present for c in chars):
                return chars
    raise _NoSentinel


@functools.lru_cache(maxsize=16)
def _mask_regexes(chars: str) -> tuple:
    ob, oi, cl, d0, d9 = chars[0], chars[1], chars[2], chars[3], chars[12]
    ph = f"[{ob}{oi}][{d0}-{d9}]+{cl}"
    ph_re = re.compile(ph)
    # Indentation + list marker (or heading / checkbox) at the start of a line.
    list_prefix = re.compile(
        r"[ \t]*(?:[-*+\u2022]|\d{1,3}[.)]|[A-Za-z][.)]|" + ph + r"[.)]|#{1,6}|"
        r"[-*+][ \t]+\[[ xX]\])[ \t]+")
    line_prefix = re.compile(
        r"[ \t]*(?:(?:[-*+\u2022]|\d{1,3}[.)]|[A-Za-z][.)]|" + ph + r"[.)])[ \t]+)?")
    decode = str.maketrans({chars[3 + i]: str(i) for i in range(10)})
    return ph_re, list_prefix, line_prefix, decode


class _Mask:
    """Placeholders for protected spans. Later layers may contain earlier placeholders."""

    def __init__(self, text: str) -> None:
        chars = _pick_sentinels(text)
        self.chars = chars
        self.ob, self.oi, self.cl = chars[0], chars[1], chars[2]
        self.digits = chars[3:13]
        self.ph_re, self.list_prefix, self.line_prefix, self._decode = _mask_regexes(chars)
        self.table: list[str] = []
        self.masked = text
        for detect, block in _DETECTORS:
            spans = detect(self.masked, self)
            if spans:
                self.masked = self._apply(self.masked, spans, block)

    def _placeholder(self, content: str, block: bool) -> str:
        idx = len(self.table)
        self.table.append(content)
        num = "".join(self.digits[int(c)] for c in str(idx))
        return (self.ob if block else self.oi) + num + self.cl

    def _apply(self, text: str, spans: list[tuple[int, int]], block: bool) -> str:
        merged: list[list[int]] = []
        for start, end in sorted(spans):
            if end <= start:
                continue
            if merged and start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)  # overlapping spans: protect the union
            else:
                merged.append([start, end])
        out, pos = [], 0
        for start, end in merged:
            out.append(text[pos:start])
            out.append(self._placeholder(text[start:end], block))
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def _content(self, m: re.Match) -> str:
        content = self.table[int(m.group(0)[1:-1].translate(self._decode))]
        if self.cl in content:
            return self.ph_re.sub(self._content, content)
        return content

    def unmask(self, text: str) -> str:
        if not self.table or self.cl not in text:
            return text
        return self.ph_re.sub(self._content, text)


# --- block detectors (whole lines or multi-line spans) ---

_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*", re.M)


@functools.lru_cache(maxsize=64)
def _fence_close(ch: str, n: int) -> re.Pattern:
    return re.compile(r"\n[ \t]*" + re.escape(ch) + "{%d,}[ \t\r]*(?=\n|\\Z)" % n)


def _detect_fences(text: str, mk: _Mask) -> list:
    spans, pos = [], 0
    while True:
        m = _FENCE_OPEN.search(text, pos)
        if not m:
            return spans
        fence = m.group(1)
        if fence[0] == "`" and "`" in text[m.end(1):m.end()]:
            pos = m.end()  # ``` followed by more backticks on the line is not a fence
            continue
        close = _fence_close(fence[0], len(fence)).search(text, m.end())
        end = close.end() if close else len(text)
        spans.append((m.start(), end))
        if not close:
            return spans
        pos = end


_TRIPLE = re.compile(r"\"\"\"|'''")


def _detect_triple_quotes(text: str, mk: _Mask) -> list:
    spans, pos = [], 0
    while True:
        m = _TRIPLE.search(text, pos)
        if not m:
            return spans
        close = text.find(m.group(0), m.end())
        end = len(text) if close < 0 else close + 3
        spans.append((m.start(), end))
        if close < 0:
            return spans
        pos = end


_TAG_OPEN = re.compile(r"<([A-Za-z][\w.:-]{0,40})(?:[ \t][^<>\n]{0,300})?>")
_TAG_CLOSE = re.compile(r"</([A-Za-z][\w.:-]{0,40})[ \t]*>")


def _detect_xml(text: str, mk: _Mask) -> list:
    if "</" not in text:
        return []
    closes: dict[str, tuple[list, list]] = {}
    for m in _TAG_CLOSE.finditer(text):
        starts, ends = closes.setdefault(m.group(1), ([], []))
        starts.append(m.start())
        ends.append(m.end())
    spans, cursor = [], 0
    for m in _TAG_OPEN.finditer(text):
        if m.start() < cursor or m.group(1) not in closes:
            continue
        starts, ends = closes[m.group(1)]
        i = bisect.bisect_left(starts, m.end())
        if i < len(starts):
            spans.append((m.start(), ends[i]))
            cursor = ends[i]
    return spans


_BLOCKQUOTE = re.compile(r"^[ \t]*>[^\n]*(?:\n[ \t]*>[^\n]*)*", re.M)


def _detect_blockquotes(text: str, mk: _Mask) -> list:
    return [m.span() for m in _BLOCKQUOTE.finditer(text)]


_JSON_START = re.compile(r"^[ \t]*([\[{])", re.M)
_JSON_END = re.compile(r"[ \t\r]*(?=\n|\Z)")
_JSON = json.JSONDecoder()


def _detect_json(text: str, mk: _Mask) -> list:
    spans, pos = [], 0
    budget = 4 * len(text) + 10_000  # bounds the work on many unclosed brackets
    while budget > 0:
        m = _JSON_START.search(text, pos)
        if not m:
            break
        i = m.start(1)
        try:
            _, end = _JSON.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            budget -= max(1, exc.pos - i)
            pos = m.end()
            continue
        except (RecursionError, ValueError):
            budget -= len(text) - i
            pos = m.end()
            continue
        budget -= end - i
        tail = _JSON_END.match(text, end)
        if tail:
            spans.append((m.start(), tail.end()))
            pos = tail.end()
        else:
            pos = m.end()
    return spans


_YAML_KEY = re.compile(r"([ \t]*)(?:- )?[A-Za-z_][\w.-]*(?: [\w.-]+){0,3}:(?:[ \t](.*))?\r?")
_YAML_ITEM = re.compile(r"[ \t]+- (\S.*)")


def _line_spans(text: str) -> list[tuple[int, int]]:
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, pos + len(line)))
        pos += len(line) + 1
    return out


def _detect_yaml(text: str, mk: _Mask) -> list:
    if ":" not in text or ("\n " not in text and "\n\t" not in text):
        return []
    lines = text.split("\n")
    offs = _line_spans(text)
    spans = []
    i, n = 0, len(lines)
    while i < n:
        j = i
        indented_key = header_items = False
        items_short = True
        saw_header = False
        while j < n:
            line = lines[j]
            k = _YAML_KEY.fullmatch(line)
            if k:
                if k.group(1) and j > i:
                    indented_key = True
                if not (k.group(2) or "").strip():
                    saw_header = True
                j += 1
                continue
            it = _YAML_ITEM.fullmatch(line)
            if it and j > i:
                header_items = header_items or saw_header
                if len(it.group(1).split()) > 3:
                    items_short = False
                j += 1
                continue
            break
        if j - i >= 2 and (indented_key or (header_items and items_short)):
            spans.append((offs[i][0], offs[j - 1][1]))
        i = max(j, i + 1)
    return spans


_PAYLOAD_NOUNS = (
    r"(?:texts?|messages?|e-?mails?|mails?|reviews?|paragraphs?|passages?|documents?|"
    r"articles?|letters?|comments?|posts?|tweets?|transcripts?|conversations?|dialogues?|"
    r"chats?|content|snippets?|excerpts?|sentences?|inputs?|copy|drafts?|essays?|"
    r"stories|story|poems?|lyrics|notes?|memos?|reports?|abstracts?|descriptions?|bios?|"
    r"captions?|headlines?|statements?|feedback|complaints?|tickets?|logs?|code|functions?|"
    r"queries|query|scripts?|tables?|data|dataset|list|quotes?|speech|announcements?|"
    r"newsletters?|answers?|responses?|replies|reply|prompts?|source|output|version|"
    r"translation|words?|phrases?|paragraph|titles?|summary|thread|page|file|csv|record)")
_FORWARD = re.compile(r"\b(?:following|below|beneath|attached|enclosed)\b[^\n]{0,60}?\b"
                      + _PAYLOAD_NOUNS + r"\b|\b" + _PAYLOAD_NOUNS +
                      r"\b[^\n]{0,30}?\b(?:below|beneath|follows)\b|\bhere(?: is|'s|’s| are)\b[^\n]{0,40}?\b"
                      + _PAYLOAD_NOUNS + r"\b",
                      re.I)
_BACKWARD = re.compile(r"\b(?:above|preceding|previous|earlier)\b[^\n]{0,60}?\b" + _PAYLOAD_NOUNS
                       + r"\b|\b" + _PAYLOAD_NOUNS + r"\b[^\n]{0,30}?\b(?:above)\b", re.I)
_INTRO_VERB = re.compile(
    r"\b(?:translat\w*|proofread\w*|rewrite|re-write|rephrase|paraphrase|reword|correct|"
    r"grammar|spelling|polish|edit|improve|summari[sz]e|classify|categori[sz]e|analy[sz]e|"
    r"extract|review|check|fix|shorten|simplify|respond to|reply to|answer|label|tag|"
    r"[üu]bersetz\w*|korrigier\w*|traduc\w*|tradui\w*|r[ée]sum\w*|corrige\w*)\b", re.I)
_THIS_NOUN_COLON = re.compile(r"\b(?:this|these)\b[^\n]{0,30}?\b" + _PAYLOAD_NOUNS + r"\b", re.I)
_LABEL = re.compile(
    r"[ \t]*(?:[-*+][ \t]+)?\**(?:text|input|output|e-?mail|message|review|document|original|"
    r"source|content|article|passage|transcript|sentence|sentences|paragraph|post|tweet|"
    r"comment|letter|excerpt|snippet|example|answer|response|result|sentiment|label|category|"
    r"user|assistant|customer|agent|human|ai|bot|q|a|texto|mensaje|correo|nachricht|"
    r"eingabe|ausgabe|texte|entrée|sortie)s?\**[ \t]*:[ \t]*", re.I)
_CODE_NOUN = re.compile(r"\b(?:code|functions?|snippets?|scripts?|quer(?:y|ies)|json|tables?|"
                        r"data|dataset|logs?|csv|files?|config(?:uration)?|class|method|"
                        r"program|schema|yaml|sql|regex)\b", re.I)
_NOUN_RE = re.compile(r"\b" + _PAYLOAD_NOUNS + r"\b", re.I)
_HERE_COLON = re.compile(r"[ \t]*here(?: is|'s|’s| are)\b[^\n]*:[ \t\r]*\Z", re.I)
_SECTION_BREAK = re.compile(r"[ \t]*(?:#{1,6}[ \t]|[=\-*_~]{3,}[ \t\r]*$)")


_FORWARD_HINT = re.compile(r"following|below|beneath|attached|enclosed|follows|here", re.I)
_BACKWARD_HINT = re.compile(r"above|preceding|previous|earlier", re.I)


def _detect_payload(text: str, mk: _Mask) -> list:
    """Text the prompt asks the model to work on: it must reach the model unchanged."""
    lines = text.split("\n")
    offs = _line_spans(text)
    n = len(lines)
    spans = []
    blank = [not line.strip() for line in lines]
    is_block = [not blank[k] and mk.ob in lines[k] and bool(mk.ph_re.fullmatch(lines[k].strip()))
                for k in range(n)]
    labels = [None if blank[k] else _LABEL.match(lines[k]) for k in range(n)]
    breaks = [not blank[k] and bool(_SECTION_BREAK.match(lines[k])) for k in range(n)]
    # next_stop[k]: first line after k that ends a payload (section break or label)
    next_stop = [n] * (n + 1)
    for k in range(n - 1, -1, -1):
        next_stop[k] = k + 1 if k + 1 < n and (breaks[k + 1] or labels[k + 1]) else next_stop[k + 1]
    last_filled = [-1] * n  # last non-blank line at or before k
    first_filled = [n] * (n + 1)  # first non-blank line at or after k
    prev = -1
    for k in range(n):
        prev = k if not blank[k] else prev
        last_filled[k] = prev
    for k in range(n - 1, -1, -1):
        first_filled[k] = k if not blank[k] else first_filled[k + 1]
    blocks_before = [0] * (n + 1)
    for k in range(n):
        blocks_before[k + 1] = blocks_before[k] + is_block[k]

    def region_end(start: int) -> int:
        """Index of the last line of a payload that starts at line ``start``."""
        if start >= n:
            return start - 1
        j = first_filled[start]
        if j < n and is_block[j]:
            return start - 1  # the payload is the code/JSON/quote block already protected
        if j < n and lines[j].lstrip(" \t").startswith("|"):
            while j + 1 < n and lines[j + 1].lstrip(" \t").startswith("|"):
                j += 1
            return j  # the payload is the table
        stop = next_stop[start]
        last = last_filled[stop - 1]
        return last if last >= start else start - 1

    # Backward: "the text above" protects what comes before that line in its section
    # (since the last separator or heading).
    section_start = 0
    for i in range(n):
        if breaks[i]:
            section_start = i + 1
        elif (i > section_start and _BACKWARD_HINT.search(lines[i])
              and _BACKWARD.search(lines[i])):
            spans.append((offs[section_start][0], offs[i - 1][1]))

    i = 0
    while i < n:
        if blank[i]:
            i += 1
            continue
        line = lines[i]
        stripped = line.rstrip(" \t\r")
        lab = labels[i]
        if lab:
            rest_start = offs[i][0] + lab.end()
            if lab.end() < len(stripped):  # content on the label line + its paragraph
                j = i + 1
                while j < n and not blank[j] and not labels[j]:
                    j += 1
                spans.append((rest_start, offs[j - 1][1]))
                i = j
                continue
            last = region_end(i + 1)
            if last > i:
                spans.append((offs[i + 1][0], offs[last][1]))
                i = last + 1
            else:
                i += 1
            continue
        colon_end = stripped.endswith(":")
        forward = ((_FORWARD_HINT.search(line) and (_FORWARD.search(line)
                                                     or _HERE_COLON.match(line)))
                   or (colon_end and len(stripped.split()) <= 6 and _NOUN_RE.search(line))
                   or (colon_end and (_INTRO_VERB.search(line) or _THIS_NOUN_COLON.search(line))))
        if forward:
            colon = stripped.find(":")
            if 0 <= colon < len(stripped) - 1 and _INTRO_VERB.search(line, 0, colon):
                # "Translate into German: Good morning ..." -> the rest of the line too
                start = offs[i][0] + colon + 1
                last = max(region_end(i + 1), i)
                spans.append((start, offs[last][1]))
                i = last + 1
                continue
            last = region_end(i + 1)
            if last > i and blocks_before[last + 1] > blocks_before[i + 1] and \
                    _CODE_NOUN.search(line):
                last = i  # "the function below": the payload is the code block further down
            if last > i:
                spans.append((offs[i + 1][0], offs[last][1]))
                i = last + 1
                continue
        i += 1
    return spans


# --- inline detectors ---

_INLINE_CODE = re.compile(r"`[^`\n]+`")
_TEMPLATE = re.compile(r"\{\{[^{}\n]{0,200}\}\}|\$\{[^{}\n]{0,200}\}|\{[A-Za-z_][\w.]{0,60}\}|"
                       r"\{%[^\n]{0,200}?%\}")
_URL = re.compile(r"\b(?:https?|ftp|file)://[^\s<>\"'`]+|\bwww\.[^\s<>\"'`]+", re.I)
_EMAIL = re.compile(r"[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")
_NEGATION_WORDS = (
    r"not|no|never|without|none|nor|neither|nobody|nothing|nowhere|cannot|"
    r"[A-Za-z]{1,20}n['’]t|(?:do|does|did|is|are|was|were|have|has|had|could|would|should|"
    r"ca|wo|must|need)nt|"
    r"nicht|kein|keine|keinen|keinem|keiner|keines|nie|niemals|ohne|weder|nichts|"
    r"jamais|pas|sans|aucun|aucune|rien|ni|"
    r"nunca|jamás|sin|ninguno|ninguna|ningún|tampoco|nada")
_NEGATION = re.compile(r"\b(?:(?:do|does|did|will|would|shall|should|could|can|may|might|must|"
                       r"is|are|was|were|am|be|been|have|has|had|need)[ \t]+not|"
                       + _NEGATION_WORDS + r")\b", re.I)
_DQUOTE = re.compile(r"\"[^\"\n]*\"|“[^“”\n]*”|«[^«»\n]*»|„[^„“”\n]*[“”]|「[^「」\n]*」|"
                     r"『[^『』\n]*』")
_SQUOTE = re.compile(r"(?<!\w)'[^'\n]*'|‘[^‘’\n]*’")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")


def _regex_detector(rx: re.Pattern) -> Callable:
    def detect(text: str, mk: _Mask) -> list:
        return [m.span() for m in rx.finditer(text)]
    return detect


def _detect_urls(text: str, mk: _Mask) -> list:
    spans = []
    for m in _URL.finditer(text):
        url = m.group(0)
        cut = len(url)
        while cut and url[cut - 1] in ".,;:!?)]}*_":
            if url[cut - 1] == ")" and url.count("(", 0, cut) >= url.count(")", 0, cut):
                break
            cut -= 1
        if cut:
            spans.append((m.start(), m.start() + cut))
    return spans


def _detect_single_quotes(text: str, mk: _Mask) -> list:
    """'quoted phrases of several words' (apostrophes are not quotes)."""
    spans, pos = [], 0
    while True:
        m = _SQUOTE.search(text, pos)
        if not m:
            return spans
        inner = m.group(0)[1:-1]
        after = text[m.end():m.end() + 1]
        if (len(inner.split()) >= 2 and inner[:1] not in " \t" and inner[-1:] not in " \t"
                and not (after.isalnum() or after == "_")):
            spans.append(m.span())
            pos = m.end()
        else:
            pos = m.start() + 1


_DETECTORS: tuple = (
    (_detect_fences, True),
    (_detect_triple_quotes, True),
    (_detect_xml, True),
    (_detect_blockquotes, True),
    (_detect_json, True),
    (_detect_yaml, True),
    (_detect_payload, True),
    (_regex_detector(_INLINE_CODE), False),
    (_regex_detector(_TEMPLATE), False),
    (_detect_urls, False),
    (_regex_detector(_EMAIL), False),
    (_regex_detector(_NEGATION), False),
    (_regex_detector(_DQUOTE), False),
    (_detect_single_quotes, False),
    (_regex_detector(_NUMBER), False),
)


# --------------------------------------------------------------------------- helpers

def _apply_edits(s: str, edits: list[tuple[int, int, str]]) -> str:
    if not edits:
        return s
    out, pos = [], 0
    for start, end, repl in edits:
        out.append(s[pos:start])
        out.append(repl)
        pos = end
    out.append(s[pos:])
    return "".join(out)


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


def _recase(rest: str, capital: bool) -> str | None:
    """rest with its first word capitalised when ``capital``; None when that is not safe."""
    if not capital:
        return rest
    m = _WORD.match(rest)
    if not m:
        return None
    word = m.group(0)
    if word[0].isupper():
        return rest
    if any(ch.isupper() for ch in word[1:]):
        return None  # iPhone, eBay: leave the filler rather than break the word
    up = word[0].upper()
    if len(up) != 1:
        return None
    return up + rest[1:]


def _w(pattern: str) -> str:
    """Phrase -> regex where each space matches a run of spaces or tabs."""
    return pattern.replace(" ", r"[ \t]+")


# --------------------------------------------------------------------------- rule: whitespace

_MULTISPACE = re.compile(r" {2,}")


def _rule_whitespace(s: str, mk: _Mask) -> str:
    lines = s.split("\n")
    n = len(lines)
    run_at: dict[int, tuple[int, int]] = {}
    for i, line in enumerate(lines):
        if "  " not in line:
            continue
        p = mk.line_prefix.match(line).end()
        core_end = len(line.rstrip(" \t\r"))
        if p >= core_end or "  " not in line[p:core_end]:
            continue
        if line.lstrip(" \t").startswith("|"):  # markdown table row: padding is noise
            lines[i] = line[:p] + _MULTISPACE.sub(" ", line[p:core_end]) + line[core_end:]
        else:
            run_at[i] = (p, core_end)
    for i, (p, core_end) in run_at.items():
        if (i - 1) in run_at or (i + 1) in run_at:
            continue  # column-aligned text: the spaces carry the layout
        line = lines[i]
        lines[i] = line[:p] + _MULTISPACE.sub(" ", line[p:core_end]) + line[core_end:]
    out: list[str] = []
    blank_run = 0
    for line in lines:
        if line.strip(" \t\r"):
            if blank_run:
                if out:  # leading blank lines go
                    out.append(pending)
                blank_run = 0
            out.append(line)
        else:
            if blank_run == 0:
                pending = line
            else:
                pending = "\r" if pending.endswith("\r") else ""
            blank_run += 1
    return "\n".join(out).rstrip(" \t\r\n")


# --------------------------------------------------------------------------- rule: trailing spaces

def _rule_trailing_spaces(s: str, mk: _Mask) -> str:
    if " \n" not in s and "\t\n" not in s and " \r" not in s and "\t\r" not in s \
            and not s.endswith((" ", "\t")):
        return s
    out = []
    for line in s.split("\n"):
        if line.endswith("\r"):
            out.append(line[:-1].rstrip(" \t") + "\r")
        else:
            out.append(line.rstrip(" \t"))
    return "\n".join(out)


# --------------------------------------------------------------------------- rule: separators

_SEPARATOR = re.compile(
    r"^([ \t]*)(?:([=\-*_+\u2500\u2501\u2550\u2014\u2013])\2{3,}|([=\-*_+])(?: \3){3,})"
    r"[ \t]*(\r?)$", re.M)


def _rule_separators(s: str, mk: _Mask) -> str:
    def repl(m: re.Match) -> str:
        ch = m.group(2) or m.group(3)
        return m.group(1) + ch * 3 + m.group(4)
    return _SEPARATOR.sub(repl, s)


# --------------------------------------------------------------------------- rule: filler

_THANKS = _w(
    r"(?:(?:many|big|a big|huge) thanks|thank you|thanks|thank u|thx)"
    r"(?: (?:again|so much|very much|a lot|a ton|a million|kindly|so,? so much))?"
    r"(?: (?:in advance|ahead of time|beforehand))?"
    r"(?: for (?:your|all (?:of )?your|the|any|all the) (?:help|time|assistance|support|"
    r"patience|consideration|understanding|hard work|input|effort|efforts|feedback|guidance|"
    r"attention)(?: (?:on|with) (?:this|that|it))?)?"
    r"(?: (?:in advance|ahead of time|beforehand))?"
    r"(?:,? (?:i|we) (?:really |truly )?appreciate (?:it|this|your help|your time))?")
_SENTENCE_FILLERS = [
    r"\b" + _THANKS + r"[ \t]*[.!]*",
    r"\b" + _w(r"(?:any|all|your) (?:help|assistance|advice|input|feedback|support)(?: (?:here|on this|"
       r"with this))? (?:is|would be|will be) (?:greatly |much |really |very much |highly |"
       r"truly |so )?appreciated") + r"[ \t]*[.!]*",
    r"\b" + _w(r"(?:i|we) (?:really |truly |greatly |sincerely )?appreciate (?:it|this|your help|your "
       r"time|your assistance|the help|you)(?: (?:a lot|so much|very much|in advance))?")
    + r"[ \t]*[.!]*",
    r"\b" + _w(r"(?:much|greatly|very much) appreciated") + r"[ \t]*[.!]*",
    r"\b" + _w(r"(?:i )?hope (?:you(?: are|'re|’re) (?:doing )?(?:well|good|great|fine)(?: today)?|"
       r"(?:this|my) (?:message|email|e-mail|note) finds you well|(?:that|this) makes sense|"
       r"you(?: are|'re|’re) having a (?:good|great|nice) day)") + r"[ \t]*[.!]*",
    r"\b" + _w(r"(?:(?:vielen|herzlichen|besten|tausend) dank|danke(?: sch[öo]n| sehr)?)"
       r"(?: (?:im voraus|vorab))?(?: f[üu]r (?:deine|ihre|eure|die) (?:hilfe|m[üu]he|zeit|"
       r"unterst[üu]tzung))?(?: (?:im voraus|vorab))?") + r"[ \t]*[.!]*",
    r"(?:¡|\b)" + _w(r"(?:muchas )?gracias(?: (?:de antemano|por adelantado))?(?: por (?:tu|su) "
               r"(?:ayuda|tiempo|atenci[óo]n))?(?: (?:de antemano|por adelantado))?") + r"[ \t]*[.!]*",
    r"\b" + _w(r"merci(?: (?:beaucoup|bien))?(?: (?:d['’]avance|par avance))?(?: pour (?:votre|ton) "
       r"(?:aide|temps))?(?: (?:d['’]avance|par avance))?") + r"[ \t]*[.!]*",
    r"(?:よろしくお願い(?:します|いたします|致します)|ありがとうございます)[。！!]*",
]
_SENTENCE_RE = re.compile("|".join(_SENTENCE_FILLERS), re.I)

_GREETING = _w(r"(?:(?:hi|hello|hey|dear)(?: there)?(?: (?:chatgpt|claude|gpt|gemini|"
               r"assistant|ai|copilot|bot))?,? )?")
_REQUEST_LEADS = [
    r"please (?:could|can|would) you (?:please )?",
    r"(?:could|can|would|will) you (?:(?:please|kindly),? )+(?:if possible, )?(?:possibly )?",
    r"(?:could|can|would) you possibly (?:please )?",
    r"would you be (?:so kind as|kind enough|able) to (?:please )?",
    r"would it be possible (?:for you )?to (?:please )?",
    r"(?:i|we)(?: would|'d|’d) (?:really |very much |greatly |truly )?(?:like|love|want) "
    r"(?:for )?you to (?:please )?(?:kindly )?",
    r"(?:i|we) (?:really )?(?:want|need) you to (?:please )?",
    r"(?:i|we)(?: would|'d|’d) (?:really |very much |greatly |truly |sincerely )?"
    r"(?:appreciate it|be (?:very |really |so |most |extremely |super )?(?:grateful|thankful)|"
    r"love it) if you could (?:please )?(?:possibly )?",
    r"(?:it|that) would be (?:really |very |so |super |extremely |most |incredibly )?"
    r"(?:great|helpful|nice|wonderful|awesome|amazing|fantastic|lovely|good|perfect|ideal|"
    r"appreciated) if you could (?:please )?(?:possibly )?",
    r"(?:i was|i'm|i’m|i am|we were|we are) (?:just )?wondering if you could (?:please )?"
    r"(?:possibly )?",
    r"(?:i was|i'm|i’m|i am) (?:just )?wondering if (?:it would be possible|you would be able) "
    r"(?:for you )?to (?:please )?",
]
_REQUEST_RE = re.compile(r"\b(?P<lead>" + _GREETING + r"(?:" + "|".join(_w(p) for p in _REQUEST_LEADS)
                         + r"))(?=[^\W\d_])", re.I)
_SENTENCE_END = re.compile(r"[.!?\n]")

_START_RE = re.compile(
    r"\b(?P<lead>(?:(?:please|kindly)[ \t]*,?[ \t]+)+|basically,?[ \t]+|"
    r"bitte,?[ \t]+|por favor,?[ \t]+|per favore,?[ \t]+|s['’]il (?:vous|te) pla[iî]t,?[ \t]+)"
    r"(?P<nx>[^\W\d_][\w'’-]{0,40})?", re.I)

_JUST_VERBS = (
    r"give|tell|write|list|return|output|make|use|show|provide|summari[sz]e|answer|respond|"
    r"reply|keep|focus|fix|send|do|check|explain|translate|rewrite|add|remove|change|copy|"
    r"paste|print|want|need|wanted|needed|read|pick|choose|create|generate|draft|describe|"
    r"mention|say|put|include|ignore|skip|stick|go|let|look|try|follow|answer|format|"
    r"highlight|shorten|convert|extract|count|name|suggest|correct|clean|edit|update|"
    r"proofread|review|compare|outline|focus|want")
_JUST_RE = re.compile(r"\b(?P<lead>just[ \t]+)(?P<nx>(?:" + _JUST_VERBS + r"))\b", re.I)
_JUST_BEFORE = re.compile(r"(?:^|\W)(?:i|we|you|to|and|then|will|can|could|should|would|must|"
                          r"please|'ll|’ll)[ \t]+\Z", re.I)

_INLINE_DROPS = [
    # "..., please." -> "..."
    (re.compile(r",[ \t]*(?:please|kindly|bitte|por favor|per favore|s['’]il (?:vous|te) "
                r"pla[iî]t)(?=[ \t]*(?:[.!?]|\r?$))", re.I | re.M), lambda m: ""),
    # "Potresti per favore ..." -> "Potresti ..."
    (re.compile(r"\b(?P<pre>(?:potresti|potrebbe|puoi|può|potreste))[ \t]+per favore,?(?=[ \t])",
                re.I), lambda m: m.group("pre")),
    # "I really want" -> "I want"
    (re.compile(r"\b(?P<pre>(?:i|we)(?:[ \t]+(?:would|do)|'d|’d)?[ \t]+)really[ \t]+"
                r"(?=(?:want|need|like|appreciate|hope|wish|love|prefer)\b)", re.I),
     lambda m: m.group("pre")),
    # "Könnten Sie bitte ..." -> "Könnten Sie ..."
    (re.compile(r"\b(?P<pre>(?:kannst|könntest|können|könnten|würdest|würden|kann|könnte)"
                r"[ \t]+(?:du|sie|ihr|man)(?:[ \t]+(?:mir|uns))?)[ \t]+bitte\b", re.I),
     lambda m: m.group("pre")),
    # "¿Podrías por favor ...?" -> "¿Podrías ...?"
    (re.compile(r"\b(?P<pre>(?:podrías|podría|puedes|puede|podrían|pueden|podéis)"
                r"(?:[ \t]+(?:me|nos))?)[ \t]+por favor,?(?=[ \t])", re.I),
     lambda m: m.group("pre")),
    # "Pourriez-vous s'il vous plaît ..." -> "Pourriez-vous ..."
    (re.compile(r"\b(?P<pre>(?:pourriez|pourrais|peux|pouvez|pourrais)-(?:vous|tu))[ \t]+"
                r"s['’]il (?:vous|te) pla[iî]t,?(?=[ \t])", re.I),
     lambda m: m.group("pre")),
]

_PHRASES = {
    "in order to": "to",
    "due to the fact that": "because",
    "despite the fact that": "although",
    "in spite of the fact that": "although",
    "at this point in time": "now",
    "in the event that": "if",
    "for the purpose of": "for",
}
_PHRASE_RE = re.compile(r"\b(?:" + "|".join(_w(p) for p in _PHRASES) + r")\b", re.I)


def _filler_sentences(s: str, mk: _Mask) -> str:
    edits, last = [], 0
    n = len(s)
    for m in _SENTENCE_RE.finditer(s):
        start, end = m.span()
        if start < last or _context(s, start, mk) != "sentence":
            continue
        text = m.group(0)
        # the sentence must end here: end of line/text, or a terminator then a new sentence
        k = end
        while k < n and s[k] in " \t":
            k += 1
        line_end = k >= n or s[k] in "\r\n"
        if not line_end:
            term = text.rstrip(" \t")[-1:]
            if not (term in ".!。！" and (k > end or term in "。！")):
                continue
        # what comes before on the line
        b = start
        while b > 0 and s[b - 1] in " \t":
            b -= 1
        line_start = b == 0 or s[b - 1] == "\n"
        if line_start and line_end:
            # drop the whole line with its line break
            e = k
            if e < n and s[e] == "\r":
                e += 1
            if e < n and s[e] == "\n":
                e += 1
            elif b > 0:
                b -= 1  # last line: take the line break before it
                if b > 0 and s[b - 1] == "\r":
                    b -= 1
            if b < last:
                continue
            edits.append((b, e, ""))
            last = e
        elif line_end:
            edits.append((b, k, ""))
            last = k
        else:
            edits.append((start, k, ""))
            last = k
    return _apply_edits(s, edits)


def _filler_requests(s: str, mk: _Mask) -> str:
    """"Could you please X?" -> "X." and "I would like you to X" -> "X"."""
    edits: list[tuple[int, int, str]] = []
    last, n = 0, len(s)
    for m in _REQUEST_RE.finditer(s):
        start, end = m.span()
        if start < last:
            continue
        ctx = _context(s, start, mk)
        if ctx is None:
            continue
        chained = _REQUEST_RE.match(s, end)
        while chained:  # "Could you please, I would like you to ..." -> all of it in one go
            end = chained.end()
            chained = _REQUEST_RE.match(s, end)
        if ctx == "clause" and not _imperative_sentence(s, start, mk):
            continue  # "I am planning X, and I'd like you to Y" must keep its subject
        capital = ctx in ("sentence", "list") and m.group("lead")[:1].isupper()
        first = _recase(s[end:end + 42], capital)
        if first is None:
            continue
        # find where the sentence ends: a question becomes an instruction
        pos, limit, q = end, min(n, end + 2000), None
        while True:
            e = _SENTENCE_END.search(s, pos, limit)
            if not e:
                break
            if e.group(0) == "." and (_ABBREVIATIONS.search(s, max(0, e.start() - 8), e.end())
                                      or (e.end() < n and s[e.end()] not in " \t\r\n")):
                pos = e.end()
                continue
            if e.group(0) == "?":
                q = e.start()
            break
        edits.append((start, end + 1, first[0]))
        last = end + 1
        if q is not None:
            qe = q
            while qe < n and s[qe] == "?":
                qe += 1
            b = q
            while b > last and s[b - 1] in " \t":
                b -= 1
            edits.append((b, qe, "."))
            last = qe
    return _apply_edits(s, edits)


def _filler_starts(s: str, mk: _Mask) -> str:
    def repl(m: re.Match) -> str:
        ctx = _context(s, m.start(), mk)
        lead = m.group("lead")
        low = lead.lower()
        nx = m.group("nx")
        if ctx is None:
            return m.group(0)
        if low.startswith("basically") and ctx not in ("sentence", "list"):
            return m.group(0)
        if nx is None:
            # next is a placeholder, number or punctuation: only when no capital is needed
            nxt = s[m.end():m.end() + 1]
            if lead[:1].isupper() or nxt not in (mk.oi,):
                return m.group(0)
            return ""
        if low.startswith("bitte") and not nx[:1].islower():
            return m.group(0)  # "Bitte Sie ..." is not the imperative "bitte"
        new = _recase(nx, lead[:1].isupper())
        if new is None:
            return m.group(0)
        return new
    return _START_RE.sub(repl, s)


def _filler_just(s: str, mk: _Mask) -> str:
    def repl(m: re.Match) -> str:
        ctx = _context(s, m.start(), mk)
        if ctx is None and not _JUST_BEFORE.search(s, max(0, m.start() - 12), m.start()):
            return m.group(0)
        new = _recase(m.group("nx"), m.group("lead")[:1].isupper())
        return m.group(0) if new is None else new
    return _JUST_RE.sub(repl, s)


def _filler_phrases(s: str, mk: _Mask) -> str:
    def repl(m: re.Match) -> str:
        key = " ".join(m.group(0).lower().split())
        new = _PHRASES[key]
        if m.group(0)[:1].isupper():
            new = new[0].upper() + new[1:]
        return new
    return _PHRASE_RE.sub(repl, s)


def _rule_filler(s: str, mk: _Mask) -> str:
    s = _filler_sentences(s, mk)
    s = _filler_requests(s, mk)
    s = _filler_starts(s, mk)
    s = _filler_just(s, mk)
    for rx, fn in _INLINE_DROPS:
        s = rx.sub(fn, s)
    s = _filler_phrases(s, mk)
    return s


# --------------------------------------------------------------------------- rule: duplicates

_SENT_SPLIT = re.compile(r"(?<=[.!?])([ \t]+)")
_DUP_SKIP = re.compile(r"[ \t]*(?:#|\||[=\-*_+~]{3,}[ \t\r]*\Z)")
_CODEISH = re.compile(r"[{}]|;[ \t\r]*$|==|=>|->|::|\(\)| = ")
_DISCOURSE = re.compile(
    r"(?:(?:again|also|and|once again|once more|remember|reminder|important|note|please|just|"
    r"so|as (?:i )?(?:said|mentioned)(?: before| earlier| above)?|to (?:repeat|reiterate)|"
    r"again please)[ \t]*[,:!]?[ \t]+)+", re.I)
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
_MODAL_START = re.compile(
    r"(?:you|we|i|it|this|the \w+(?: \w+)?|your \w+(?: \w+)?|all \w+|each \w+|every \w+|"
    r"any \w+)[ \t]+(?:must|should|shall|will|need to|needs to|have to|has to|may|can|is to|"
    r"are to|is required to|are required to|want|would like)\b", re.I)


def _rule_duplicates(s: str, mk: _Mask) -> str:
    seen: set[tuple[str, str]] = set()
    lines = s.split("\n")
    out: list[str] = []
    changed = False
    prev: tuple[str, str] | None = None

    def key(sentence: str) -> tuple[tuple[str, str] | None, bool]:
        """(comparison key or None, is it an instruction?)"""
        raw = mk.unmask(sentence)
        if len(raw) < 8:
            return None, False
        # case- and space-insensitive outside protected spans; protected spans verbatim
        parts, pos = [], 0
        for m in mk.ph_re.finditer(sentence):
            parts.append(sentence[pos:m.start()].casefold())
            parts.append(mk.unmask(m.group(0)))
            pos = m.end()
        parts.append(sentence[pos:].casefold())
        folded = " ".join("".join(parts).split())
        if _DISCOURSE.match(folded):
            folded = _DISCOURSE.sub("", folded, count=1)
        folded = folded.rstrip(".! ")
        words = folded.split(" ")
        instruction = len(words) >= 2 and (words[0] in _IMPERATIVE
                                           or bool(_MODAL_START.match(folded)))
        if _NEGATION.search(raw):
            return ("exact", " ".join(raw.split())), instruction  # negations: exact repeats only
        return ("folded", folded), instruction

    for line in lines:
        if len(line) < 8:  # too short to hold a sentence worth comparing
            out.append(line)
            if line.strip():
                prev = None
            continue
        if not line.strip():
            out.append(line)
            continue
        if mk.ob in line or _DUP_SKIP.match(line) or _CODEISH.search(line):
            out.append(line)
            prev = None
            continue
        p = mk.line_prefix.match(line).end()
        body = line[p:].rstrip(" \t\r")
        tail = line[p + len(body):]
        pieces = _SENT_SPLIT.split(body)
        # [sentence, ws, sentence, ws, ...]; glue back splits after abbreviations
        sentences: list[list[str]] = [["", pieces[0]]]
        for idx in range(1, len(pieces), 2):
            ws, nxt = pieces[idx], pieces[idx + 1]
            last_sent = sentences[-1][1]
            if _ABBREVIATIONS.search(last_sent, max(0, len(last_sent) - 10)):
                sentences[-1][1] += ws + nxt
            else:
                sentences.append([ws, nxt])
        kept: list[list[str]] = []
        dropped = False
        for ws, sent in sentences:
            k, instruction = key(sent)
            if k is not None and ((instruction and k in seen) or (
                    k == prev and sent.rstrip()[-1:] in _TERMINATORS + _CJK_TERMINATORS)):
                # a repeated instruction, or a sentence said twice in a row
                dropped = True
                continue
            if k is not None:
                seen.add(k)
            prev = k
            kept.append([ws, sent])
        if not dropped:
            out.append(line)
            continue
        changed = True
        if not kept:
            continue  # the whole line was a repeat: drop it with its line break
        kept[0][0] = ""
        out.append(line[:p] + "".join(ws + sent for ws, sent in kept) + tail)
    if not changed:
        return s
    return "\n".join(out)


# --------------------------------------------------------------------------- driver

_RULE_FUNCS: dict[str, Callable[[str, _Mask], str]] = {
    "whitespace": _rule_whitespace,
    "trailing_spaces": _rule_trailing_spaces,
    "filler": _rule_filler,
    "duplicates": _rule_duplicates,
    "separators": _rule_separators,
}


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
