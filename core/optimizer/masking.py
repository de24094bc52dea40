"""Masking: protected spans swapped for private-use placeholders, and restored."""

from __future__ import annotations

import functools
import re

from .detectors import _DETECTORS


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
