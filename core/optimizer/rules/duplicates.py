"""The duplicates rule: drop instructions said twice."""

from __future__ import annotations

import re

from ..detectors.inline import _NEGATION
from ..masking import _Mask
from .sentences import _ABBREVIATIONS, _CJK_TERMINATORS, _IMPERATIVE, _TERMINATORS


_SENT_SPLIT = re.compile(r"(?<=[.!?])([ \t]+)")
_DUP_SKIP = re.compile(r"[ \t]*(?:#|\||[=\-*_+~]{3,}[ \t\r]*\Z)")
_CODEISH = re.compile(r"[{}]|;[ \t\r]*$|==|=>|->|::|\(\)| = ")
_DISCOURSE = re.compile(
    r"(?:(?:again|also|and|once again|once more|remember|reminder|important|note|please|just|"
    r"so|as (?:i )?(?:said|mentioned)(?: before| earlier| above)?|to (?:repeat|reiterate)|"
    r"again please)[ \t]*[,:!]?[ \t]+)+", re.I)
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
