"""The filler rule: politeness, request leads and wordy phrases."""

from __future__ import annotations

import re

from ..masking import _Mask
from .sentences import _ABBREVIATIONS, _WORD, _context, _imperative_sentence


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
