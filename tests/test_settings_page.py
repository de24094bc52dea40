"""The Settings page through AppTest, against the process's real service on the simulator
(real HTTP, a real SQLite file per test). Nothing sleeps: the wrong-password pause is 0."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from streamlit.testing.v1 import AppTest, AppTestError

from core import admin, service
from core.errors import CircuitOpen, InvalidParameter, ServerError
from core.models import GenerationRequest
from tests.conftest import drop_service
from core.settings import BY_NAME, SETTINGS
from core.signin import PasswordGate
from tests.support import FakeClock, time_of_day_gap_s

ROOT = Path(__file__).resolve().parents[1]
# AppTest resolves a relative path against the calling file (tests/), so give it the root's.
PAGE = str(ROOT / "pages" / "settings.py")
SECRET_KEY = "sk-test-SECRET-abc123"
PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def env(app_env, monkeypatch):
    """A fresh database and service per test, the simulator as provider, no real waits."""
    monkeypatch.setattr(admin, "PASSWORD_GATE", PasswordGate(delay_s=0))
    yield app_env


# -- helpers -------------------------------------------------------------------------------
def run(target) -> AppTest:
    """Run the page (``target`` is the AppTest or a widget just set or clicked)."""
    at = target.run()
    assert not at.exception, at.exception  # never a traceback
    return at


def page() -> AppTest:
    return run(AppTest.from_file(PAGE, default_timeout=30))


def widget(at: AppTest, name: str):
    """The widget of one setting (its key carries the settings version it was drawn at)."""
    for kind in (at.number_input, at.toggle, at.text_input, at.selectbox):
        for w in kind:
            if w.key and w.key.startswith(f"setting:{name}@"):
                return w
    raise LookupError(name)


def save(at: AppTest, **values) -> AppTest:
    """Set some settings of one group on the page and press that group's Save."""
    groups = {BY_NAME[n.replace("__", ".")].group for n in values}
    assert len(groups) == 1
    for name, value in values.items():
        widget(at, name.replace("__", ".")).set_value(value)
    return run(at.button(key=f"save:{groups.pop()}").click())


def messages(at: AppTest, kind: str) -> list[str]:
    return [m.value for m in getattr(at, kind)]


def table(at: AppTest, column: str) -> list[dict]:
    """Rows of the first data frame on the page that has this column."""
    for frame in at.dataframe:
        if column in frame.value.columns:
            return frame.value.to_dict("records")
    return []


def generate(prompt: str = "Write a tagline for a bakery", **kw):
    return service.default_service().generate(
        GenerationRequest(prompt=prompt, cache=kw.pop("cache", False), source="test", **kw))


def last_request() -> dict:
    gyro = service.default_service()
    gyro.db.flush()
    return gyro.db.query("SELECT * FROM requests ORDER BY id DESC LIMIT 1")[0]


def rendered_text(at: AppTest) -> str:
    """Everything the page sent to the browser: every element's protobuf, as text."""
    parts = []
    for root in (at.main, at.sidebar):
        for node in root:
            parts.append(str(getattr(node, "proto", "")))
            try:
                parts.append(str(node.value))
            except Exception:  # noqa: BLE001 - not every element has a value
                pass
    return "\n".join(parts)


# -- the page is generated from the description ---------------------------------------------
def test_every_setting_has_a_widget_of_its_type_with_help_bounds_and_default():
    at = page()
    kinds = {bool: at.toggle, int: at.number_input, float: at.number_input, str: at.text_input}
    captions = messages(at, "caption")
    for s in SETTINGS:
        w = widget(at, s.name)
        kind = at.selectbox if s.choices else kinds[s.type]      # a fixed set of values: a pick list
        assert w in list(kind) and w.value == s.default and not w.disabled
        if s.choices:
            assert list(w.options) == list(s.choices)
        if s.min is not None:
            assert (w.min, w.max) == (s.min, s.max)
        assert f"`{s.name}` · {admin.describe(s)}" in captions     # the key, small, beside
        assert w.label == s.title and s.name not in w.label and "_" not in w.label    # plain words
    assert {f.key for f in at.form} >= {f"group:{g}" for g in
                                        ("Provider", "Retry", "Breaker", "Timeouts", "Cache",
                                         "Optimizer", "Generate")}
    assert "0 to 10 · default 3" in admin.describe(BY_NAME["retry.max_retries"])
    text = rendered_text(at)
    assert "Provider **simulator**" in text and "API key: **not set**" in text
    assert "gpt-4o-mini" in text  # the model list
    assert "anyone who can reach this app; it listens on 127.0.0.1 only" in text


def test_every_setting_is_documented():
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert [s.name for s in SETTINGS if f"| `{s.name}` |" not in text] == []


# -- live changes reach the very next request -------------------------------------------------
def test_max_retries_zero_saved_on_the_page_gives_exactly_one_attempt():
    at = save(page(), retry__max_retries=0)
    assert any("settings version 1" in m for m in messages(at, "success"))
    assert any("Settings version **1**" in m for m in messages(at, "info"))
    assert widget(at, "retry.max_retries").value == 0
    service.default_service().provider.sim.set_faults(fail_next=1, fail_status=503)
    with pytest.raises(ServerError):
        generate()
    row = last_request()
    assert (row["attempts"], row["error_kind"], row["http_status"]) == (1, "server_error", 503)


def test_breaker_fail_max_saved_on_the_page_opens_after_that_many_failures():
    at = save(page(), retry__max_retries=0)
    at = save(at, breaker__mode="consecutive", breaker__fail_max=2)
    assert service.default_service().settings.get("breaker.fail_max") == 2
    sim = service.default_service().provider.sim
    sim.set_faults(fail_next=10, fail_status=503)
    for _ in range(2):
        with pytest.raises(ServerError):
            generate()
    with pytest.raises(CircuitOpen):
        generate()
    assert sim.faults()["fail_next"] == 8  # the third request never left

    [row] = table(run(at), "breaker")
    assert row["breaker"] == "simulator|gpt-4o-mini"
    assert row["state"].startswith("open until ") and row["failures"] >= 2
    assert "closed → open" in row["last change"] and "server_error" in row["cause"]

    at = run(at.button(key="breaker_reset").click())
    [row] = table(at, "breaker")
    assert row["state"] == "closed" and row["cause"] == "reset by local"
    at = run(at.button(key="breaker_open").click())
    [row] = table(at, "breaker")
    assert row["state"].startswith("open until ") and row["cause"] == "forced open by local"
    with pytest.raises(CircuitOpen):
        generate()
    who = {(r["subject"], r["cause"]): r["who"] for r in table(at, "kind")}
    assert who[("simulator|gpt-4o-mini", "forced open by local")] == "local"


# -- refused input changes nothing ---------------------------------------------------------------
def test_out_of_bounds_and_inconsistent_values_are_refused_and_nothing_changes():
    at = page()
    store = service.default_service().settings
    # A browser cannot send 11 (the widget enforces 0-10, shown in the caption); a forged
    # value falls back to the stored one, so the page has nothing to save.
    at = save(at, retry__max_retries=11)
    assert store.get("retry.max_retries") == 3 and store.snapshot().version == 0
    assert any("Nothing to save" in m for m in messages(at, "info"))

    # What the widgets cannot catch, the store does: the page shows its message, names the
    # bound, and the whole group is refused (max_retries 1 is not half-applied).
    at = save(at, retry__max_retries=1, retry__base_delay_s=30.0, retry__max_delay_s=10.0)
    assert messages(at, "warning") == [
        "retry.base_delay_s must not exceed retry.max_delay_s (30 > 10)."]
    assert store.snapshot().version == 0 and store.get("retry.max_retries") == 3
    assert widget(at, "retry.base_delay_s").value == 30.0  # the input is kept to correct
    assert store.audit() == [] and table(at, "setting") == []

    # The same path with an out-of-bounds value (what the page does on Save) names the bound.
    changed = admin.changed_values({"retry.max_retries": 11}, store.snapshot())
    with pytest.raises(InvalidParameter, match="at most 10"):
        store.set_many(changed, actor="local")
    assert store.snapshot().version == 0


# -- audit trail ---------------------------------------------------------------------------------
def test_every_change_appears_in_the_audit_trail_on_the_page():
    at = save(page(), retry__max_retries=1, retry__jitter=0.2)
    at = save(at, cache__enabled=False)
    at = save(at, provider__extra_models="my-model")
    at = run(at.button(key="reset:Retry").click())
    rows = table(at, "setting")
    assert [(r["setting"], r["change"], r["who"], r["version"]) for r in rows] == [
        ("retry.jitter", "0.2 → 0.5", "local", "4"), ("retry.max_retries", "1 → 3", "local", "4"),
        ("provider.extra_models", "(empty) → 'my-model'", "local", "3"),
        ("cache.enabled", "on → off", "local", "2"),
        ("retry.jitter", "0.5 → 0.2", "local", "1"), ("retry.max_retries", "3 → 1", "local", "1"),
    ]
    assert widget(at, "retry.max_retries").value == 3  # reset shows the default again
    assert any(m.startswith("Models offered") and "my-model" in m for m in messages(at, "caption"))


def test_cache_panel_shows_figures_and_clearing_is_audited():
    generate(cache=True)
    generate(cache=True)  # a hit
    at = page()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Entries"] == "1" and metrics["Hit rate"] == "50%"
    at.date_input(key="cache_before").set_value(dt.date.today() - dt.timedelta(days=1))
    at = run(at.button(key="cache_clear_older").click())
    assert any("Removed 0" in m for m in messages(at, "success"))
    at.date_input(key="cache_before").set_value(dt.date.today() + dt.timedelta(days=1))
    at = run(at.button(key="cache_clear_older").click())
    assert any("Removed 1" in m for m in messages(at, "success"))
    assert {m.label: m.value for m in at.metric}["Entries"] == "0"
    at = run(at.button(key="cache_clear_all").click())
    cache_events = [r for r in table(at, "kind") if r["kind"] == "cache"]
    assert [(r["change"], r["who"]) for r in cache_events] == [
        ("— → 0 removed", "local"), ("— → 1 removed", "local"), ("— → 0 removed", "local")]
    assert cache_events[0]["subject"] == "clear all"


def test_outage_rehearsal_injects_shows_and_clears_faults_each_audited():
    at = save(page(), retry__max_retries=0)
    at.number_input(key="fault:error_rate").set_value(1.0)
    at.selectbox(key="fault:error_status").set_value(502)
    at = run(at.button(key="fault_apply:Inject errors").click())
    assert any("`error_rate` 1" in m and "`error_status` 502" in m for m in messages(at, "markdown"))
    with pytest.raises(ServerError):
        generate()
    assert last_request()["http_status"] == 502

    at.number_input(key="fault:outage_s").set_value(30.0)
    at = run(at.button(key="fault_apply:Start outage").click())
    # A live countdown, not "outage_remaining_s=30", and a confirmation that it started.
    assert any(re.search(r"Full outage running: (29|30) s left\*\* \(until \d\d:\d\d:\d\d, UTC\)", m)
               for m in messages(at, "warning"))
    assert "Every request gets 503 for 30 s." in [t.proto.body for t in at.toast]
    assert "outage_remaining_s" not in " ".join(messages(at, "markdown"))
    at.number_input(key="fault:drop_after_chunks").set_value(2)
    at = run(at.button(key="fault_apply:Drop streams").click())
    at = run(at.button(key="fault_apply:Start 429 storm").click())
    at = run(at.button(key="fault_apply:Apply").click())  # slow responses form, as shown

    sim = service.default_service().provider.sim
    assert sim.faults()["drop_after_chunks"] == 2 and sim.faults()["retry_after_s"] == 2
    at = run(at.button(key="fault_clear").click())
    assert any(m == "**Other faults now:** none." for m in messages(at, "markdown"))
    assert any("No outage running" in m for m in messages(at, "caption"))
    assert generate().outcome == "ok"
    faults = [(r["subject"], r["change"], r["who"]) for r in table(at, "kind") if r["kind"] == "fault"]
    assert ("error_rate", "0 → 1", "local") in faults and ("error_status", "500 → 502", "local") in faults
    assert ("outage", "off → 30 s", "local") in faults
    assert ("drop_after_chunks", "off → 2", "local") in faults
    assert faults[0][0] == "all" and "error_rate=1" in faults[0][1]
    assert any("Metrics page" in m for m in messages(at, "info"))


# -- admin gate ----------------------------------------------------------------------------------
def test_with_a_password_only_a_signed_in_session_can_change_anything(monkeypatch):
    monkeypatch.setenv("GYROSCOPE_ADMIN_PASSWORD", PASSWORD)
    pauses = []
    clock = FakeClock()
    monkeypatch.setattr(admin, "PASSWORD_GATE", PasswordGate(
        delay_s=1.0, clock=clock.monotonic, sleep=lambda s: (pauses.append(1), clock.advance(s))))
    at = page()

    def locked(at: AppTest) -> bool:
        return ([b.key for b in at.button] == ["sign_in_button"]
                and not [f for f in at.form if f.key.startswith("group:")]
                and all(widget(at, s.name).disabled for s in SETTINGS))

    assert locked(at)
    with pytest.raises(AppTestError, match="disabled"):
        widget(at, "retry.max_retries").set_value(0)

    at.text_input(key="admin_password_input").set_value(PASSWORD + "x")
    at = run(at.button(key="sign_in_button").click())
    assert messages(at, "error") == ["Wrong password."] and pauses == [1] and locked(at)
    assert at.text_input(key="admin_password_input").value == ""  # not kept

    at.text_input(key="admin_password_input").set_value(PASSWORD)
    at = run(at.button(key="sign_in_button").click())
    assert not locked(at) and pauses == [1]
    assert any("Signed in as admin" in m for m in messages(at, "success"))
    at = save(at, retry__max_retries=2)
    assert service.default_service().settings.get("retry.max_retries") == 2
    assert table(at, "setting")[0]["who"] == "admin"
    assert PASSWORD not in rendered_text(at)

    at = run(at.button(key="logout").click())
    assert locked(at)


# -- secrets never leak --------------------------------------------------------------------------
def test_the_api_key_never_reaches_the_page_the_audit_trail_or_the_database(monkeypatch, env):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("GYROSCOPE_PROVIDER", "simulator")
    at = page()
    assert "API key: **set (hidden)**" in rendered_text(at)
    at = save(at, retry__max_retries=1)
    at = save(at, provider__extra_models="other-model")
    at = run(at.button(key="breaker_open").click())
    at = run(at.button(key="breaker_reset").click())
    at = run(at.button(key="fault_apply:Inject errors").click())
    at = run(at.button(key="fault_clear").click())
    at = run(at.button(key="cache_clear_all").click())
    generate(cache=True)
    at = run(at)
    assert table(at, "setting") and table(at, "kind")
    assert SECRET_KEY not in rendered_text(at)
    assert all(SECRET_KEY not in str(r) for r in service.default_service().settings.audit())
    service.default_service().db.flush()
    files = [p for p in env.iterdir() if p.name.startswith("app.db")]
    assert any(p.name == "app.db-wal" for p in files)
    for path in files:
        assert SECRET_KEY.encode() not in path.read_bytes(), path.name
    drop_service()  # checkpoint the WAL into the file, then look again
    for path in env.iterdir():
        if path.name.startswith("app.db"):
            assert SECRET_KEY.encode() not in path.read_bytes(), path.name


def test_a_real_provider_shows_no_credentials_and_no_rehearsal(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:hunter2@127.0.0.1:9/v1?token=t0k")
    at = page()
    text = rendered_text(at)
    assert "Provider **openai** at `http://127.0.0.1:9/v1`" in text
    for secret in (SECRET_KEY, "hunter2", "t0k"):
        assert secret not in text
    assert "Outage rehearsal needs the built-in simulator" in text
    assert not [b for b in at.button if b.key.startswith("fault")]


def test_times_are_the_viewers_with_the_zone_shown_and_no_settings_tab_in_settings():
    at = AppTest.from_file(PAGE, default_timeout=30)
    at.context = {"timezone": "Pacific/Kiritimati"}
    at = save(run(at), retry__max_retries=2)
    service.default_service().breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    at = run(at)
    assert [t.label for t in at.tabs] == ["Tuning", "Breakers", "Cache", "Outage rehearsal", "Audit trail"]
    zone = ZoneInfo("Pacific/Kiritimati")
    [change] = [r for r in table(at, "setting") if r["setting"] == "retry.max_retries"]
    shown = dt.datetime.strptime(change["when"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone)
    assert abs((dt.datetime.now(zone) - shown).total_seconds()) < 120
    assert any("times in Pacific/Kiritimati" in m for m in messages(at, "markdown"))
    [row] = [r for r in table(at, "breaker") if r["breaker"] == "simulator|gpt-4o-mini"]
    until = re.search(r"open until (\d\d:\d\d:\d\d)", row["state"]).group(1)
    probe = dt.datetime.now(zone) + dt.timedelta(seconds=30)
    assert time_of_day_gap_s(until, probe) < 120, (until, probe)
    assert any("Times in Pacific/Kiritimati" in c for c in messages(at, "caption"))
