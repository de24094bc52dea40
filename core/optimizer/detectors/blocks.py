"""Block detectors: fences, triple quotes, XML tags, blockquotes, JSON and YAML."""

from __future__ import annotations

import bisect
import functools
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: masking imports the detectors
    from ..masking import _Mask

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
