"""Inline detectors: code, template variables, URLs, e-mail, negations, quotes, numbers."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: masking imports the detectors
    from ..masking import _Mask

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
