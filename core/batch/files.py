"""Batch input and output: pasted lines, CSV or JSONL in; CSV or JSONL out.

Reading checks the whole input first and says what is wrong per row (with its line number)
without running anything: good rows run, bad rows are listed. A file that cannot be read at
all (too big, binary, not UTF-8, a CSV with no ``prompt`` column) is refused as a whole with
``InputRefused``. Writing goes to a temporary file renamed into place, so an interrupted
write never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import InvalidParameter
from ..models import MAX_MODEL_CHARS

COLUMNS = ("prompt", "system", "model", "temperature", "max_tokens", "messages")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
OUTPUT_COLUMNS = ("row", "status", "prompt", "content", "error", "model", "cost",
                  "prompt_tokens", "completion_tokens", "from_cache")
_SNIFF_BYTES = 8192


class InputRefused(InvalidParameter):
    """The input as a whole cannot be used; nothing was run or stored."""


@dataclass
class Problem:
    """One bad row: its line number (1-based, as an editor shows it) and what to fix."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ParsedInput:
    """Rows to run (dicts with ``line`` and the request fields) and the rows refused."""

    rows: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "lines"


def read_path(path: str | Path, max_bytes: int, max_rows: int,
              kind: str | None = None) -> ParsedInput:
    """Read a file, refusing it by its size before reading a byte of it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputRefused(f"Cannot read {path}: {exc.strerror or exc}. Check the path.") from None
    _check_size(size, max_bytes, path.name)
    with path.open("rb") as fh:
        data = fh.read(max_bytes + 1)     # a file that grows meanwhile is still cut here
    return read_bytes(data, path.name, max_bytes, max_rows, kind)


def read_bytes(data: bytes, name: str | None, max_bytes: int, max_rows: int,
               kind: str | None = None) -> ParsedInput:
    """Parse an upload or a file's bytes as ``kind`` (csv, jsonl or lines) when given, else
    as the name's extension says, else as the content looks."""
    _check_size(len(data), max_bytes, name or "the input")
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise InputRefused(f"{name or 'The input'} looks like a binary file (a spreadsheet, an "
                           "archive or an image), not CSV, JSONL or text. Export it as CSV (UTF-8) "
                           "or JSON Lines and try again. Nothing was run.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputRefused(f"{name or 'The input'} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                           f"on line {line}). Save it as UTF-8 (in Excel: \"CSV UTF-8\") and try "
                           "again. Nothing was run.") from None
    suffix = Path(name or "").suffix.lower()
    sniffed = kind is None and not suffix
    if sniffed:
        kind = ("jsonl" if text.lstrip().startswith("{") else
                "csv" if _csv_header(text) else "lines")
    elif kind is None:
        kind = ("csv" if suffix == ".csv" else
                "jsonl" if suffix in (".jsonl", ".ndjson", ".json") else "lines")
    parsed = {"csv": parse_csv, "jsonl": parse_jsonl, "lines": parse_lines}[kind](text)
    if sniffed:
        shown = {"csv": "CSV", "jsonl": "JSON Lines", "lines": "one prompt per line"}[kind]
        parsed.notes.insert(0, f"Read as {shown} (the input has no extension to go by; "
                               "--format csv, jsonl or lines says otherwise).")
    if len(parsed.rows) > max_rows:
        raise InputRefused(f"{name or 'The input'} has {len(parsed.rows):,} rows; a job takes at "
                           f"most {max_rows:,} (setting batch.max_rows). Split it. Nothing was run.")
    return parsed


def _csv_header(text: str) -> bool:
    """Input with no name to go by (stdin, a file without an extension) is CSV when its first
    line is a header naming a prompt (or messages) column and only known columns; otherwise it
    is one prompt per line, so a prompt that merely contains commas stays a prompt."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        cells = next(csv.reader([first]))
    except (csv.Error, StopIteration):
        return False
    names = [c.strip().lower() for c in cells]
    return ("prompt" in names or "messages" in names) and all(n in COLUMNS for n in names)


def _check_size(size: int, max_bytes: int, name: str) -> None:
    if size > max_bytes:
        raise InputRefused(f"{name} is {size / 1e6:,.1f} MB; a batch input may be at most "
                           f"{max_bytes / 1e6:,.1f} MB (setting batch.max_file_mb). Split it into "
                           "smaller files. Nothing was read or run.")


def parse_lines(text: str) -> ParsedInput:
    """One prompt per line (pasted text); blank lines are skipped silently."""
    out = ParsedInput(kind="lines")
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.rows.append({"line": n, "prompt": line.strip()})
    if not out.rows:
        out.notes.append("There are no prompts: paste one prompt per line.")
    return out


def parse_csv(text: str) -> ParsedInput:
    """A CSV whose header names a ``prompt`` (or ``messages``) column, plus optional columns."""
    out = ParsedInput(kind="csv")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputRefused(f"The CSV's first row cannot be read ({exc}). Nothing was run.") from None
    names = [h.strip().lower() for h in header or []]
    if "prompt" not in names and "messages" not in names:
        shown = ", ".join(repr(h) for h in (header or [])[:10]) or "none"
        raise InputRefused(f"The CSV has no \"prompt\" column (its columns: {shown}). Put the "
                           "prompts in a column whose first cell is \"prompt\"; model, system, "
                           "temperature, max_tokens and messages are optional. Nothing was run.")
    unused = [h for h in names if h and h not in COLUMNS]
    if unused:
        out.notes.append(f"Column(s) {', '.join(unused)} are not used (known: {', '.join(COLUMNS)}).")
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            out.problems.append(Problem(line, f"cannot be read as CSV ({exc}); fix the quoting."))
            continue
        if not any(c.strip() for c in cells):
            out.problems.append(Problem(line, "is empty."))
            continue
        if len(cells) > len(names):
            out.problems.append(Problem(line, f"has {len(cells)} cells but the header has "
                                              f"{len(names)}; check for an unquoted comma."))
            continue
        raw = {k: v for k, v in zip(names, cells) if k in COLUMNS and v.strip() != ""}
        _add(out, line, raw, from_text=True)
    return out


def parse_jsonl(text: str) -> ParsedInput:
    """One JSON object per line with ``prompt`` (or ``messages``) and optional fields."""
    out = ParsedInput(kind="jsonl")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            out.problems.append(Problem(n, f"is not valid JSON ({exc.msg} at column {exc.colno})."))
            continue
        if not isinstance(obj, dict):
            out.problems.append(Problem(n, "must be a JSON object such as {\"prompt\": \"...\"}."))
            continue
        unknown = sorted(set(obj) - set(COLUMNS))
        if unknown:
            out.problems.append(Problem(n, f"has unknown field(s) {', '.join(unknown)}; known: "
                                           f"{', '.join(COLUMNS)}."))
            continue
        _add(out, n, {k: v for k, v in obj.items() if v is not None}, from_text=False)
    return out


def _add(out: ParsedInput, line: int, raw: dict, from_text: bool) -> None:
    try:
        row = check_row(raw, from_text)
    except ValueError as exc:
        out.problems.append(Problem(line, str(exc)))
        return
    out.rows.append({"line": line, **row})


def check_row(raw: dict, from_text: bool = False) -> dict:
    """The request fields of one row, typed; ValueError says what is wrong (one problem)."""
    from ..pipeline import MAX_TOKENS
    row: dict = {}
    messages = raw.get("messages")
    if messages is not None:
        if from_text:
            try:
                messages = json.loads(messages)
            except ValueError:
                raise ValueError("messages must be a JSON list of {\"role\", \"content\"} objects.") from None
        _check_messages(messages)
        row["messages"] = messages
    prompt = raw.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError("prompt must be text.")
        if prompt.strip():
            row["prompt"] = prompt
    if "prompt" not in row and "messages" not in row:
        raise ValueError("has no prompt (the prompt cell is empty); fill it in or remove the row.")
    for name in ("system", "model"):
        value = raw.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be text.")
            if value.strip():
                row[name] = value.strip() if name == "model" else value
    if len(row.get("model", "")) > MAX_MODEL_CHARS:
        raise ValueError(f"model is longer than {MAX_MODEL_CHARS} characters.")
    if "temperature" in raw:
        t = _number(raw["temperature"], "temperature", from_text, whole=False)
        if not 0 <= t <= 2:
            raise ValueError(f"temperature must be between 0 and 2 (got {t:g}).")
        row["temperature"] = t
    if "max_tokens" in raw:
        m = _number(raw["max_tokens"], "max_tokens", from_text, whole=True)
        if not 1 <= m <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be a whole number from 1 to {MAX_TOKENS:,} (got {m}).")
        row["max_tokens"] = m
    return row


def _number(value, name: str, from_text: bool, whole: bool):
    if from_text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number (got {value[:30]!r}).") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number (got {json.dumps(value)[:30]}).")
    if whole:
        if float(value) != int(value):
            raise ValueError(f"{name} must be a whole number (got {value}).")
        return int(value)
    return float(value)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects.")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i} needs a role ({', '.join(ROLES)}).")
        content = m.get("content")
        if not isinstance(content, (str, list)) and not (content is None and m.get("tool_calls")):
            raise ValueError(f"message {i} needs a content (text or a list of parts).")


# -- output ------------------------------------------------------------------------------------
def output_record(row: dict) -> dict:
    """One result row as written out (the same fields for CSV and JSONL)."""
    request = row["request"]
    result = row.get("result") or {}
    usage = result.get("usage") or {}
    prompt = request.get("prompt")
    if prompt is None and request.get("messages"):
        prompt = json.dumps(request["messages"], ensure_ascii=False)
    return {"row": row["line"], "status": row["status"], "prompt": prompt,
            "content": row.get("content"), "error": row.get("error"),
            "model": result.get("model") or request.get("model"), "cost": row.get("cost"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "from_cache": result.get("from_cache")}


def to_csv(records: Iterable[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=OUTPUT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in OUTPUT_COLUMNS})
    return buf.getvalue()


def to_jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def render(records: Iterable[dict], kind: str) -> str:
    """Records as CSV or JSONL text (``kind`` 'csv' or 'jsonl')."""
    return to_csv(records) if kind == "csv" else to_jsonl(records)


def output_kind(path: str | Path) -> str:
    """'jsonl' for .jsonl/.ndjson/.json, else 'csv'."""
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
