"""Layout rules: whitespace, trailing spaces and separator lines."""

from __future__ import annotations

import re

from ..masking import _Mask

# --------------------------------------------------------------------------- rule: whitespace

_MULTISPACE = re.compile(r" {2,}")


def _rule_whitespace(s: str, mk: _Mask) -> str:
    lines = s.split("\n")
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
    pending = ""
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
