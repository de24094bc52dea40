"""Typed settings: one description (name, type, default, bounds, help, group) drives the
store, the validation, the CLI and the Settings page. Values live in SQLite, versioned,
and every change is audited as an event."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import InvalidParameter, StorageError
from .models import check_model_name, check_unicode, short_repr

OPTIMIZER_RULES = ("whitespace", "trailing_spaces", "filler", "duplicates", "separators")


@dataclass(frozen=True)
class Setting:
    """One setting: its type, default, bounds and one line of help."""

    name: str
    type: type
    default: Any
    help: str
    group: str
    min: float | None = None
    max: float | None = None
    unit: str = ""
    check: Callable[[Any], None] | None = None   # more rules for the parsed value
    choices: tuple[str, ...] = ()      # the only values allowed (a str setting), in shown order
    label: str = ""                    # plain words for a page (LABELS, else made from the name)

    @property
    def title(self) -> str:
        """The setting in plain words: 'Retries after a failure' for retry.max_retries."""
        if self.label or self.name in LABELS:
            return self.label or LABELS[self.name]
        words = self.name.split(".", 1)[-1].replace(".", " ").replace("_", " ")
        for suffix, unit in ((" s", " (seconds)"), (" usd", " ($)"), (" mb", " (MB)")):
            if words.endswith(suffix):
                words = words[: -len(suffix)] + unit
        return words[:1].upper() + words[1:]

    def parse(self, value: Any) -> Any:
        """The typed, validated value, or InvalidParameter naming what is allowed."""
        v = value
        try:
            if self.type is bool:
                if isinstance(v, str):
                    low = v.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError
                    v = low in ("true", "1", "yes", "on")
                elif not isinstance(v, bool) and v in (0, 1):
                    v = bool(v)
                elif not isinstance(v, bool):
                    raise ValueError
            elif self.type is int:
                if isinstance(v, bool):
                    raise ValueError
                if isinstance(v, str):
                    v = v.strip()
                    v = int(v) if v.lstrip("+-").isdigit() else float(v)
                if isinstance(v, float):
                    if not v.is_integer():
                        raise ValueError
                    v = int(v)
                if not isinstance(v, int):
                    raise ValueError
            elif self.type is float:
                if isinstance(v, bool):
                    raise ValueError
                # + 0.0 stores -0 as 0.0: "-0.0" would show as a negative bound nobody set.
                v = float(v.strip() if isinstance(v, str) else v) + 0.0
                if v != v or v in (float("inf"), float("-inf")):
                    raise ValueError
            elif self.type is str:
                if not isinstance(v, str):
                    raise ValueError
                v = v.strip()
                check_unicode(self.name, v)
                if self.choices and v not in self.choices:
                    raise InvalidParameter(f"{self.name} must be one of "
                                           f"{', '.join(self.choices)} (got {short_repr(value)}).")
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameter(
                f"{self.name} must be {_type_words(self.type)} (got {short_repr(value)}).") from None
        if self.check is not None:
            self.check(v)
        if self.min is not None and v < self.min:
            raise InvalidParameter(f"{self.name} must be at least {self.min:g}{self.unit} (got {short_repr(v)}).")
        if self.max is not None and v > self.max:
            raise InvalidParameter(f"{self.name} must be at most {self.max:g}{self.unit} (got {short_repr(v)}).")
        return v


def _model_name(value: str) -> None:
    if not value:
        raise InvalidParameter("provider.default_model must name a model, e.g. gpt-4o-mini "
                               "(an empty name would fail every request that names none).")
    check_model_name(value, "provider.default_model")


def _model_list(value: str) -> None:
    for model in value.split(","):
        check_model_name(model.strip(), "Each of provider.extra_models")


def _upstream_prices(value: str) -> None:
    from .prices import check_upstreams   # genai-prices' table loads only when a price is set
    check_upstreams(value)


def _budget_limits(value: str) -> None:
    from .budgets import check_limits
    check_limits(value)


def _budget_zone(value: str) -> None:
    from .budgets import check_zone
    check_zone(value)


def json_object(name: str, text: str, example: str) -> dict:
    """A JSON-object setting's text as a dict; InvalidParameter names the setting and shows
    ``example`` (written as it should follow "must be a JSON object, ")."""
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidParameter(f"{name} must be a JSON object, {example}.") from None
    if not isinstance(data, dict):
        raise InvalidParameter(f"{name} must be a JSON object, {example}.")
    return data


def _type_words(t: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number",
            str: "text"}.get(t, t.__name__)


SETTINGS: tuple[Setting, ...] = (
    Setting("provider.default_model", str, "gpt-4o-mini", "Model used when a request names none.", "Provider",
            check=_model_name),
    Setting("provider.extra_models", str, "", "Comma-separated models to offer besides the provider's list.", "Provider",
            check=_model_list),
    Setting("retry.max_retries", int, 3, "Retries after the first attempt (0 = never retry).", "Retry", 0, 10),
    Setting("retry.base_delay_s", float, 0.5, "Wait before the first retry.", "Retry", 0, 60, " s"),
    Setting("retry.max_delay_s", float, 20.0, "Longest wait between two attempts.", "Retry", 0, 600, " s"),
    Setting("retry.multiplier", float, 2.0, "Each wait is this many times the previous one.", "Retry", 1, 10),
    Setting("retry.jitter", float, 0.5, "Share of each wait that is randomised (0 = none, 1 = full jitter).", "Retry", 0, 1),
    Setting("retry.deadline_s", float, 120.0, "Overall time budget of one request, retries included.", "Retry", 1, 3600, " s"),
    Setting("breaker.mode", str, "rate", "What opens the breaker: 'rate' = the failure rate of the last attempts; "
            "'consecutive' = breaker.fail_max failed attempts in a row.", "Breaker",
            choices=("rate", "consecutive")),
    Setting("breaker.failure_rate_threshold", float, 50.0, "Share of failed attempts in the window that opens "
            "the breaker (mode rate).", "Breaker", 1, 100, " %"),
    Setting("breaker.window_size", int, 100, "Attempts in the sliding window the failure rate is taken over "
            "(mode rate; per process).", "Breaker", 2, 1000),
    Setting("breaker.minimum_calls", int, 50, "Attempts the window needs before the rate can open the breaker "
            "(mode rate).", "Breaker", 1, 1000),
    Setting("breaker.fail_max", int, 5, "Consecutive failed attempts that open the breaker (mode consecutive).",
            "Breaker", 1, 1000),
    Setting("breaker.reset_timeout_s", float, 30.0, "How long the breaker stays open before a probe.", "Breaker", 1, 3600, " s"),
    Setting("breaker.half_open_max_calls", int, 1, "Probes allowed at once while half-open.", "Breaker", 1, 100),
    Setting("breaker.success_threshold", int, 1, "Successful probes needed to close the breaker.", "Breaker", 1, 100),
    Setting("timeout.connect_s", float, 5.0, "Time allowed to connect, per attempt.", "Timeouts", 0.1, 120, " s"),
    Setting("timeout.read_s", float, 60.0, "Time allowed between bytes of the answer, per attempt.", "Timeouts", 0.1, 600, " s"),
    Setting("cache.enabled", bool, True, "Serve repeated requests from the response cache.", "Cache"),
    Setting("cache.ttl_s", float, 7 * 86400.0, "How long a cached answer stays valid.", "Cache", 1, 365 * 86400, " s"),
    Setting("cache.max_entries", int, 10_000, "Most answers kept; least recently used go first.", "Cache", 1, 10_000_000),
    Setting("cache.normalize_whitespace", bool, False, "Treat prompts differing only in whitespace outside code as equal.", "Cache"),
    Setting("optimizer.enabled", bool, False, "Optimize prompts by default (a request can still choose).", "Optimizer"),
    *(Setting(f"optimizer.rule.{rule}", bool, True, f"Apply the optimizer's {rule.replace('_', ' ')} rule.", "Optimizer")
      for rule in OPTIMIZER_RULES),
    Setting("generate.max_tokens", int, 512, "Default most tokens an answer may have.", "Generate", 1, 128_000),
    Setting("generate.temperature", float, 0.7, "Default sampling temperature.", "Generate", 0, 2),
    Setting("pacing.enabled", bool, True, "Hold requests back before the upstream's rate limit refuses them "
            "(limits learnt from x-ratelimit-* headers, else pacing.rpm / pacing.tpm).", "Pacing"),
    Setting("pacing.rpm", float, 0.0, "Requests per minute allowed when the upstream sends no rate-limit "
            "headers (0 = no limit).", "Pacing", 0, 1_000_000),
    Setting("pacing.tpm", float, 0.0, "Tokens per minute allowed when the upstream sends no rate-limit "
            "headers (0 = no limit).", "Pacing", 0, 1_000_000_000),
    Setting("pacing.interactive_reserve", float, 0.1, "Share of each rate limit that batch rows leave to "
            "interactive requests (page, API, CLI).", "Pacing", 0, 0.9),
    Setting("batch.concurrency", int, 8, "Rows of a batch job sent at once.", "Batch", 1, 256),
    Setting("batch.row_attempts", int, 3, "Times a row is run through the pipeline (each with its retries) "
            "before it is marked failed.", "Batch", 1, 20),
    Setting("batch.max_cost_usd", float, 0.0, "Default cost cap of a new job in USD (0 = none).", "Batch",
            0, 1_000_000, " $"),
    Setting("batch.max_file_mb", float, 20.0, "Largest input file a batch job accepts.", "Batch", 0.001, 1024, " MB"),
    Setting("batch.max_rows", int, 100_000, "Most rows in one batch job.", "Batch", 1, 10_000_000),
    Setting("prices.upstreams", str, "", "How each upstream is priced, as JSON: {base URL or provider: "
            "'free' | 'unknown' | a genai-prices provider such as 'openai' | {model: {input, cached, "
            "output} USD per 1M tokens}}. Unlisted: the simulator as OpenAI, known provider hosts by "
            "their table, other hosts unknown (docs/metrics.md).", "Prices", check=_upstream_prices),
    Setting("budget.daily_usd", float, 0.0, "Most spent per day, all requests (0 = no limit).", "Budget",
            0, 1e9, " $"),
    Setting("budget.monthly_usd", float, 0.0, "Most spent per month, all requests (0 = no limit).", "Budget",
            0, 1e9, " $"),
    Setting("budget.limits", str, "", "Limits per model or source as JSON, e.g. {\"model:gpt-4o\": {\"day\": 5, "
            "\"month\": 100}, \"source:batch\": {\"day\": 2}} (USD; sources page, api, v1, batch, cli).",
            "Budget", check=_budget_limits),
    Setting("budget.warn_percent", float, 80.0, "Warn when this share of a limit is spent or held.", "Budget",
            1, 100, " %"),
    Setting("budget.timezone", str, "UTC", "Time zone whose midnight starts a budget's day and month.",
            "Budget", check=_budget_zone),
    Setting("budget.unknown_price", str, "refuse", "A request with no known price while a budget applies: "
            "'refuse' it, or 'allow' it uncounted (the limit may then be passed).", "Budget",
            choices=("refuse", "allow")),
)
# Plain labels for the Settings page, by setting name (the key is shown small beside them).
LABELS: dict[str, str] = {
    "provider.default_model": "Default model",
    "provider.extra_models": "More models to offer",
    "retry.max_retries": "Retries after a failure",
    "retry.base_delay_s": "First wait before retrying (seconds)",
    "retry.max_delay_s": "Longest wait between tries (seconds)",
    "retry.multiplier": "Each wait grows by (×)",
    "retry.jitter": "Randomness in the waits (0-1)",
    "retry.deadline_s": "Time limit for one request, retries included (seconds)",
    "breaker.mode": "What pauses the AI service",
    "breaker.failure_rate_threshold": "Failure share that pauses it (%)",
    "breaker.window_size": "Recent attempts looked at",
    "breaker.minimum_calls": "Attempts needed before it can pause",
    "breaker.fail_max": "Failures in a row that pause it",
    "breaker.reset_timeout_s": "Pause length before trying again (seconds)",
    "breaker.half_open_max_calls": "Test requests at once after a pause",
    "breaker.success_threshold": "Good test requests needed to resume",
    "timeout.connect_s": "Time to connect (seconds)",
    "timeout.read_s": "Longest silence while answering (seconds)",
    "cache.enabled": "Reuse saved answers",
    "cache.ttl_s": "Keep saved answers for (seconds)",
    "cache.max_entries": "Most saved answers kept",
    "cache.normalize_whitespace": "Ignore spacing differences",
    "optimizer.enabled": "Optimize prompts by default",
    "generate.max_tokens": "Default answer length limit (tokens)",
    "generate.temperature": "Default temperature (creativity)",
    **{f"optimizer.rule.{rule}": f"Optimizer: {rule.replace('_', ' ')}" for rule in OPTIMIZER_RULES},
    "optimizer.rule.whitespace": "Optimizer: tidy whitespace",
    "optimizer.rule.trailing_spaces": "Optimizer: drop trailing spaces",
    "optimizer.rule.filler": "Optimizer: drop filler words",
    "optimizer.rule.duplicates": "Optimizer: drop repeated sentences",
    "optimizer.rule.separators": "Optimizer: shorten separator lines",
    "pacing.enabled": "Pace requests to the service's limits",
    "pacing.rpm": "Requests per minute allowed",
    "pacing.tpm": "Tokens per minute allowed",
    "pacing.interactive_reserve": "Share kept for people (not batches)",
    "batch.concurrency": "Batch rows at once",
    "batch.row_attempts": "Tries per batch row",
    "batch.max_cost_usd": "Most a batch may cost ($)",
    "batch.max_file_mb": "Largest batch file (MB)",
    "batch.max_rows": "Most rows in a batch",
    "prices.upstreams": "Prices per AI service",
    "budget.daily_usd": "Daily budget ($)",
    "budget.monthly_usd": "Monthly budget ($)",
    "budget.limits": "Budgets per model or source",
    "budget.warn_percent": "Warn when this share is spent (%)",
    "budget.timezone": "Time zone budgets count days in",
    "budget.unknown_price": "When a price is unknown",
}
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(s.group for s in SETTINGS))


def spec(name: str) -> Setting:
    """The description of one setting, or InvalidParameter listing the close names."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidParameter(
            f"Unknown setting {name!r}. Run `python -m core settings list` for the names.") from None


class Snapshot(dict):
    """The values of every setting at one version."""

    version: int = 0


class SettingsStore:
    """Settings in the SQLite file; a change is seen by every process within ``ttl`` s."""

    # All stored values as one JSON object {name: value-as-JSON} (PostgreSQL overrides it).
    _ALL_VALUES_SQL = "SELECT json_group_object(name, value) AS v FROM settings"

    def __init__(self, db, *, clock: Callable[[], float] = time.monotonic, ttl: float = 0.5) -> None:
        self.db = db
        self.clock = clock
        self.ttl = ttl
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._checked_at = float("-inf")
        # Called with the new version after this process saved a change (Redis announces it).
        self.on_change: list[Callable[[int], None]] = []

    def invalidate(self) -> None:
        """Another replica changed settings: the next read goes to the store."""
        self._checked_at = float("-inf")

    def snapshot(self) -> Snapshot:
        """Current values (cached; re-read when another process changed them).

        Only the first read waits for the file. Later ones are called on the event loop,
        so they do not wait for a lock another program holds: the last good snapshot
        serves until the file can be read again."""
        now = self.clock()
        snap = self._snapshot
        if snap is not None and now - self._checked_at < self.ttl:
            return snap
        with self._lock:
            snap = self._snapshot
            try:
                self._snapshot = self._read(snap, self.db.query_one if snap is None
                                            else self.db.query_one_nowait)
            except StorageError:
                if snap is None:
                    raise
            self._checked_at = now
            return self._snapshot

    def _read(self, snap: Snapshot | None, query_one) -> Snapshot:
        row = query_one("SELECT value FROM meta WHERE key = 'settings_version'")
        version = int(row["value"]) if row else 0
        if snap is not None and snap.version == version:
            return snap
        row = query_one(self._ALL_VALUES_SQL)
        values = Snapshot({s.name: s.default for s in SETTINGS})
        for name, value in json.loads(row["v"] if row and row["v"] else "{}").items():
            if name in BY_NAME:
                values[name] = json.loads(value)
        values.version = version
        return values

    def get(self, name: str) -> Any:
        """One setting's current value."""
        spec(name)
        return self.snapshot()[name]

    def set(self, name: str, value: Any, actor: str | None = None) -> int:
        """Validate and store one value; returns the new settings version."""
        return self.set_many({name: value}, actor)

    def set_many(self, values: dict[str, Any], actor: str | None = None) -> int:
        """Validate all, then store all in one transaction (nothing half-applied)."""
        parsed = {name: spec(name).parse(v) for name, v in values.items()}
        _check_consistency({**self.snapshot(), **parsed})
        version = self.db.write(lambda conn: self._write(conn, parsed, actor))
        with self._lock:    # set() waits for the file anyway: read what it stored now
            self._snapshot = self._read(self._snapshot, self.db.query_one)
            self._checked_at = self.clock()
        for announce in tuple(self.on_change):
            announce(version)
        return version

    @staticmethod
    def _write(conn, parsed: dict, actor: str | None) -> int:
        return _write_values(conn, parsed, actor)

    def reset(self, names: Iterable[str], actor: str | None = None) -> int:
        """Put settings back to their defaults (audited like any change)."""
        return self.set_many({n: spec(n).default for n in names}, actor)

    def audit(self, limit: int = 50) -> list[dict]:
        """The latest setting changes, newest first."""
        return self.db.query(
            "SELECT ts, subject AS name, old, new, actor, cause AS version FROM events "
            "WHERE kind = 'setting' ORDER BY id DESC LIMIT ?", (limit,))


def _check_consistency(values: dict) -> None:
    if values["retry.base_delay_s"] > values["retry.max_delay_s"]:
        raise InvalidParameter(
            "retry.base_delay_s must not exceed retry.max_delay_s "
            f"({values['retry.base_delay_s']:g} > {values['retry.max_delay_s']:g}).")
    if values["breaker.minimum_calls"] > values["breaker.window_size"]:
        raise InvalidParameter(   # the window could never hold enough attempts to open it
            "breaker.minimum_calls must not exceed breaker.window_size "
            f"({values['breaker.minimum_calls']} > {values['breaker.window_size']}).")


def _write_values(conn, parsed: dict, actor: str | None) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'settings_version'").fetchone()
    version = (int(row[0]) if row else 0) + 1
    now = time.time()
    for name, value in parsed.items():
        old_row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        old = json.loads(old_row[0]) if old_row else BY_NAME[name].default
        conn.execute(
            "INSERT INTO settings (name, value, version, updated_at, updated_by) VALUES (?,?,?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET value=excluded.value, version=excluded.version, "
            "updated_at=excluded.updated_at, updated_by=excluded.updated_by",
            (name, json.dumps(value), version, now, actor))
        conn.execute(
            "INSERT INTO events (ts, kind, subject, old, new, cause, actor) VALUES (?,?,?,?,?,?,?)",
            (now, "setting", name, json.dumps(old), json.dumps(value), str(version), actor))
    conn.execute("INSERT INTO meta (key, value) VALUES ('settings_version', ?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(version),))
    return version
