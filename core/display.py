"""What people read, without Streamlit: answers as safe Markdown, results in plain words,
times in the viewer's zone.

    safe_markdown(text)          maths off ($ literal), remote images as links, code untouched
    result_line(result)          "112 tokens (17 in, 95 out) · cost $0.00006 · 1.8 s · first try"
    outcome_words(outcome)       "stopped", "not sent — the service is paused", ...
    viewer_zone(name, offset)    the browser's zone (IANA name, else its UTC offset, else UTC)
    clock_time / date_time       a unix time in that zone
    prompt_changes(a, b)         the optimizer's edits as (removed, added) pairs
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import re
import zoneinfo
from functools import lru_cache

# -- answers as Markdown -------------------------------------------------------------------
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(\s*<?([^\s)>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_DOLLAR = re.compile(r"(?<!\\)\$")


def _code_parts(text: str) -> list[tuple[str, bool]]:
    """``text`` cut into (part, is_code) by fenced code blocks; an unclosed fence (a stream
    still arriving) runs to the end."""
    parts: list[tuple[str, bool]] = []
    buf: list[str] = []
    fence = None
    for line in text.splitlines(keepends=True):
        m = _FENCE.match(line)
        if fence is None and m:
            if buf:
                parts.append(("".join(buf), False))
            buf, fence = [line], m.group(1)
        elif fence is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not line.strip().strip(fence[0]):
            buf.append(line)
            parts.append(("".join(buf), True))
            buf, fence = [], None
        else:
            buf.append(line)
    if buf:
        parts.append(("".join(buf), fence is not None))
    return parts


def _prose(text: str) -> str:
    # An image would be fetched by the viewer's browser the moment it is drawn: a channel
    # for leaking data out of prompt-injected content. Show it as a link instead.
    text = _IMAGE.sub(lambda m: f"[image: {m.group(1).strip() or 'untitled'}]({m.group(2)})", text)
    text = text.replace("![", "\\![")   # reference-style images ![alt][ref]
    # Streamlit reads $...$ as LaTeX: "$5 or $10" would lose its dollars to italics.
    return _DOLLAR.sub(r"\\$", text)


def safe_markdown(text: str) -> str:
    """An answer as Markdown to draw: dollar signs literal (maths off) and remote images as
    links, outside code; code blocks and spans are left as they are."""
    out = []
    for part, is_code in _code_parts(text or ""):
        if is_code:
            out.append(part)
            continue
        last = 0
        for m in _INLINE_CODE.finditer(part):
            out.append(_prose(part[last:m.start()]))
            out.append(m.group(0))
            last = m.end()
        out.append(_prose(part[last:]))
    return "".join(out)


# -- results in plain words ----------------------------------------------------------------
def money(value: float | None) -> str:
    """Dollars as a person reads them: $1.25, $0.012, $0.00006 (two significant digits)."""
    if value is None:
        return "unknown"
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    places = min(10, max(2, 1 - math.floor(math.log10(abs(value)))))
    text = f"{value:.{places}f}".rstrip("0")
    return "$" + (text + "0" if text.endswith(".") else text)


def duration(ms: float | None) -> str:
    """450 ms, 1.8 s, 2 min 5 s."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms:,.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{int(ms // 60_000)} min {int(ms % 60_000 // 1000)} s"


def tries(attempts: int) -> str:
    """'first try', 'after 1 retry', 'after 3 retries'."""
    if attempts <= 1:
        return "first try"
    retries = attempts - 1
    return f"after {retries} retr{'y' if retries == 1 else 'ies'}"


def result_line(r) -> str:
    """One line on what an answer took, in plain words (a GenerationResult)."""
    if r.from_cache:
        return (f"From the saved answers (no cost; saved {money(r.cost_saved)}) · "
                f"{duration(r.latency_ms)}")
    parts = []
    if r.usage is not None:
        about = "about " if r.tokens_estimated else ""
        parts.append(f"{about}{r.usage.total_tokens:,} tokens ({r.usage.prompt_tokens:,} in, "
                     f"{r.usage.completion_tokens:,} out)")
    parts.append("cost unknown (no price for this model)" if r.cost is None else f"cost {money(r.cost)}")
    parts.append(duration(r.latency_ms))
    parts.append(tries(r.attempts))
    return " · ".join(parts)


_OUTCOMES = {
    "ok": "",
    "cancelled": "stopped",
    "circuit_open": "not sent — the AI service is paused",
    "rejected": "not sent",
    "error": "failed",
}


def outcome_words(outcome: str | None) -> str:
    """A request's outcome as a short phrase ('' for a normal answer)."""
    return _OUTCOMES.get(outcome or "ok", "failed")


# -- the viewer's time ---------------------------------------------------------------------
@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())   # reads the tz database: once


@lru_cache(maxsize=1)
def known_zones() -> tuple[str, ...]:
    """Every IANA zone name, sorted (read once per process: it walks the tz database)."""
    return tuple(sorted(_zone_names()))


def viewer_zone(name: str | None, offset_minutes: int | None = None) -> dt.tzinfo:
    """The browser's zone: its IANA name when known, else its offset (JavaScript's
    getTimezoneOffset: minutes *behind* UTC), else UTC."""
    if name and name in _zone_names():
        return zoneinfo.ZoneInfo(name)
    if isinstance(offset_minutes, (int, float)) and abs(offset_minutes) < 24 * 60:
        return dt.timezone(dt.timedelta(minutes=-offset_minutes))
    return dt.timezone.utc


def viewer_zone_key(name: str | None, offset_minutes: int | None = None) -> str:
    """An IANA name for the browser's zone (for a zone picker): its own name when known,
    else Etc/GMT±N for a whole-hour offset, else UTC."""
    if name and name in _zone_names():
        return name
    if isinstance(offset_minutes, (int, float)) and offset_minutes % 60 == 0 and abs(offset_minutes) <= 14 * 60:
        hours = int(offset_minutes // 60)      # Etc/GMT+5 is UTC-5, as JavaScript counts it
        return "UTC" if hours == 0 else f"Etc/GMT{hours:+d}"
    return "UTC"


def zone_name(zone: dt.tzinfo) -> str:
    """'Pacific/Kiritimati', 'UTC+05:30', 'UTC'."""
    key = getattr(zone, "key", None)
    if key:
        return key
    name = dt.datetime.now(zone).tzname() or "UTC"
    return "UTC" if name == "UTC+00:00" else name


def clock_time(ts: float | None, zone: dt.tzinfo) -> str:
    """HH:MM:SS of a unix time in ``zone``."""
    return "—" if ts is None else dt.datetime.fromtimestamp(ts, zone).strftime("%H:%M:%S")


def date_time(ts: float | None, zone: dt.tzinfo) -> str:
    """YYYY-MM-DD HH:MM:SS of a unix time in ``zone``."""
    return "—" if ts is None else dt.datetime.fromtimestamp(ts, zone).strftime("%Y-%m-%d %H:%M:%S")


# -- the optimizer's edits -----------------------------------------------------------------
_WORDS = re.compile(r"\s+|[^\s]+")


def prompt_changes(original: str, optimized: str) -> list[tuple[str, str]]:
    """The optimizer's edits, word by word: (removed, added) pairs in prompt order; a pair
    of whitespace only means spacing was tidied."""
    a, b = _WORDS.findall(original), _WORDS.findall(optimized)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op != "equal":
            out.append(("".join(a[i1:i2]), "".join(b[j1:j2])))
    return out
