"""Payload detector: the text a prompt asks the model to work on."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .blocks import _line_spans

if TYPE_CHECKING:  # annotations only: masking imports the detectors
    from ..masking import _Mask


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
