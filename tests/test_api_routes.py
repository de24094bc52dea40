"""The seed's routes over real HTTP against the simulator: SSE on /api/generate/stream, the
metrics equal to the history and `stats --json`, the admin routes (password, audit, nothing
changed by a bad value), and the OpenAPI document the handlers' models produce."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import core.service
from core import admin
from core.api import ENDPOINTS, OPENAPI, routes
from core.http import schemas
from core.signin import PasswordGate
from tests.support import FakeClock
from tests.test_foundation import _serve, api  # noqa: F401 - the API over real HTTP, as a fixture
from tests.test_http_guard import JSON, call

PASSWORD = "correct horse battery staple"


def post(url: str, path: str, body, **headers):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(url, "POST", path, raw, **JSON, **headers)


def sse(raw: bytes) -> list[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events body."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            name, data = block.split("\n", 1)
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


# -- /api/generate/stream ------------------------------------------------------------------------
def test_generate_stream_sends_deltas_then_done(api):
    url, gyro = api
    for body in ({"prompt": "Name a river", "max_tokens": 30}, {"prompt": "Name a lake", "stream": False}):
        status, headers, raw = post(url, "/api/generate/stream", body)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = sse(raw)
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"}
        assert "".join(d["text"] for k, d in events if k == "delta") == events[-1][1]["content"]
    gyro.db.flush()
    assert gyro.db.query_one("SELECT count(*) AS n FROM requests WHERE source = 'api'")["n"] == 2


def test_generate_stream_announces_retries_then_the_error(api):
    url, gyro = api
    gyro.settings.set_many({"retry.max_retries": 1, "retry.base_delay_s": 0.01, "retry.max_delay_s": 0.02})
    gyro.provider.sim.set_faults(error_rate=1.0, error_status=503)
    status, _, raw = post(url, "/api/generate/stream", {"prompt": "Hi", "cache": False})
    events = sse(raw)
    assert [k for k, _ in events] == ["retry", "error"]
    assert events[0][1]["attempt"] == 2 and events[1][1]["kind"] == "server_error"


def test_generate_stream_refuses_bad_input_before_streaming(api):
    url, gyro = api
    status, _, data = post(url, "/api/generate/stream", {"prompt": "Hi", "cache": "no"})
    assert status == 400 and "cache must be true or false" in data["error"]["message"]
    gyro.db.flush()
    assert gyro.db.query_one("SELECT count(*) AS n FROM requests")["n"] == 0


# -- /api/generate/metrics -----------------------------------------------------------------------
def test_metrics_equal_the_history_and_stats_json(api):
    url, gyro = api
    for prompt in ("Name a river", "Name a river", "Name a hill"):       # a cache hit among them
        assert post(url, "/api/generate", {"prompt": prompt, "max_tokens": 12})[0] == 200
    gyro.settings.set("retry.max_retries", 0)
    gyro.provider.sim.set_faults(error_rate=1.0, error_status=503)          # a failure, not retried
    assert post(url, "/api/generate", {"prompt": "Fail", "cache": False})[0] >= 400
    gyro.provider.sim.clear_faults()
    gyro.breakers.get("simulator", "other-model").force_open(actor="test")
    gyro.db.flush()
    status, _, metrics = call(url, "GET", "/api/generate/metrics")
    assert status == 200
    assert set(metrics) == {"total_requests", "cached_requests", "failed_requests", "total_cost",
                            "total_tokens", "cache_hit_rate", "failure_rate", "average_cost", "breakers"}
    # The history, counted here in SQL.
    row = gyro.db.query_one(
        "SELECT count(*) AS total, sum(from_cache) AS cached, sum(outcome = 'error') AS failed, "
        "sum(prompt_tokens + completion_tokens) AS tokens, sum(coalesce(cost, 0)) AS cost, "
        "sum(outcome = 'ok') AS ok FROM requests")
    assert (metrics["total_requests"], metrics["cached_requests"], metrics["failed_requests"],
            metrics["total_tokens"]) == (4, 1, 1, row["tokens"])
    assert (row["total"], row["cached"], row["failed"]) == (4, 1, 1)
    assert metrics["total_cost"] == pytest.approx(row["cost"])
    assert metrics["cache_hit_rate"] == pytest.approx(1 / 3) and metrics["failure_rate"] == 0.25
    assert metrics["average_cost"] == pytest.approx(row["cost"] / row["ok"])
    # `python -m core stats --json` on the same file prints the same numbers.
    cli = subprocess.run([sys.executable, "-m", "core", "stats", "--json"], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    printed = json.loads(cli.stdout)
    assert {k: printed[k] for k in metrics if k != "breakers"} == {k: v for k, v in metrics.items() if k != "breakers"}
    breakers = {(b["upstream"], b["model"]): b for b in metrics["breakers"]}
    assert breakers[("simulator", "other-model")]["state"] == "open"
    assert breakers[("simulator", "gpt-4o-mini")]["state"] == "closed"
    assert breakers[("simulator", "gpt-4o-mini")]["window_calls"] >= 3
    # The CLI (another process) sees the breakers in the file; a closed one that never
    # changed state lives in this process's memory only.
    assert printed["breakers"].items() <= {f"{u}|{m}": b["state"] for (u, m), b in breakers.items()}.items()
    assert printed["breakers"]["simulator|other-model"] == "open"
    status, _, data = call(url, "GET", "/api/generate/metrics?tz=Mars/Olympus")
    assert status == 400 and "Unknown time zone" in data["error"]["message"]


# -- admin routes ------------------------------------------------------------------------------
def _audit(gyro) -> list[tuple]:
    return [(e["kind"], e["subject"], e["actor"]) for e in gyro.history.events()]


def test_admin_routes_without_a_password_are_open_to_loopback_and_audited(api):
    url, gyro = api
    status, _, data = call(url, "GET", "/api/settings")
    assert status == 200 and data["version"] == 0 and data["settings"]["retry.max_retries"] == 3
    status, _, data = call(url, "PATCH", "/api/settings", json.dumps(
        {"retry.max_retries": 5, "cache.enabled": True, "breaker.mode": "consecutive"}).encode(), **JSON)
    assert status == 200 and data["changed"] == ["breaker.mode", "retry.max_retries"]   # cache.enabled was already on
    assert data["version"] == 1 and data["settings"]["retry.max_retries"] == 5
    assert gyro.settings.get("retry.max_retries") == 5
    assert sorted(_audit(gyro)) == [("setting", "breaker.mode", "api:local"),
                                    ("setting", "retry.max_retries", "api:local")]


@pytest.mark.parametrize("patch, words", [
    ({"retry.max_retries": 11}, "retry.max_retries must be at most 10"),
    ({"retry.max_retries": "5"}, "retry.max_retries must be a whole number"),
    ({"retry.jitter": True}, "retry.jitter must be a number"),
    ({"cache.enabled": "yes"}, "cache.enabled must be true or false"),
    ({"breaker.mode": "sometimes"}, "breaker.mode must be one of rate, consecutive"),
    ({"retry.max_retries": None}, "retry.max_retries must be a whole number"),
    ({"retry.max_retries": 2, "no.such": 1}, "Unknown setting 'no.such'"),
    ({"retry.max_retries": 2, "retry.jitter": 7}, "retry.jitter must be at most 1"),
    ({"retry.base_delay_s": 30, "retry.max_delay_s": 10}, "must not exceed retry.max_delay_s"),
    ({"provider.default_model": " "}, "must name a model"),
    (["retry.max_retries", 2], "must be a JSON object"),
])
def test_a_bad_settings_patch_changes_nothing(api, patch, words):
    url, gyro = api
    status, _, data = call(url, "PATCH", "/api/settings", json.dumps(patch).encode(), **JSON)
    assert status == 400 and words in data["error"]["message"], data
    assert gyro.settings.snapshot().version == 0 and _audit(gyro) == []


def test_cache_clear_and_breaker_reset_are_audited(api):
    url, gyro = api
    assert post(url, "/api/generate", {"prompt": "Name a river", "max_tokens": 8})[0] == 200
    assert post(url, "/api/generate", {"prompt": "Name a sea", "max_tokens": 8})[0] == 200
    for bad, words in (({"before": "2026-13-01"}, "before must be a real day"),
                       ({"before": "yesterday"}, "before must look like 2026-11-30"),
                       ({"all": True}, "Unknown field(s): all"), ([], "must be a JSON object")):
        status, _, data = post(url, "/api/cache/clear", bad)
        assert status == 400 and words in data["error"]["message"], data
    assert gyro.history.events() == [] and gyro.cache.stats()["entries"] == 2   # nothing cleared
    status, _, data = call(url, "POST", "/api/cache/clear", b"", **JSON)       # no body: all
    assert status == 200 and data == {"removed": 2}
    gyro.breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    gyro.breakers.get("simulator", "other").force_open(actor="test")
    status, _, data = post(url, "/api/breaker/reset", {"upstream": "nowhere"})
    assert status == 404 and "Upstreams: simulator" in data["error"]["message"]
    status, _, data = post(url, "/api/breaker/reset", {"upstream": "simulator", "model": "other"})
    assert status == 200 and [(b["model"], b["state"]) for b in data["reset"]] == [("other", "closed")]
    assert gyro.breakers.get("simulator", "gpt-4o-mini").info()["state"] == "open"
    status, _, data = post(url, "/api/breaker/reset", {})
    assert status == 200 and {b["state"] for b in data["reset"]} == {"closed"}
    events = gyro.history.events()
    assert ("cache", "clear all", "api:local") in _audit(gyro)
    resets = [e for e in events if e["kind"] == "breaker" and e["new"] == "closed"]
    assert [e["cause"] for e in resets] == ["reset by api:local"] * 2


def test_admin_routes_need_the_password_when_one_is_set(app_env, monkeypatch):
    from core.api import asgi_app
    monkeypatch.setenv("GYROSCOPE_ADMIN_PASSWORD", PASSWORD)
    clock = FakeClock()
    monkeypatch.setattr(admin, "PASSWORD_GATE", PasswordGate(delay_s=1.0, clock=clock.monotonic,
                                                             sleep=clock.sleep_blocking))
    gyro = core.service.default_service()
    url, server = _serve(asgi_app())
    patch = json.dumps({"retry.max_retries": 1}).encode()
    try:
        for method, path, body in (("GET", "/api/settings", None), ("PATCH", "/api/settings", patch),
                                   ("POST", "/api/cache/clear", b"{}"), ("POST", "/api/breaker/reset", b"{}")):
            status, _, data = call(url, method, path, body, **JSON)
            assert status == 401 and "X-Admin-Password" in data["error"]["message"], (path, data)
        status, _, data = call(url, "PATCH", "/api/settings", patch, X_Admin_Password="guess", **JSON)
        assert status == 403 and data["error"]["message"] == "Wrong password. Nothing was changed."
        assert clock.slept == [1.0]                                   # the page's pause, per client
        assert gyro.settings.snapshot().version == 0 and _audit(gyro) == []
        status, _, data = call(url, "PATCH", "/api/settings", patch, X_Admin_Password=PASSWORD, **JSON)
        assert status == 200 and data["settings"]["retry.max_retries"] == 1
        assert _audit(gyro) == [("setting", "retry.max_retries", "api:admin")]
        assert PASSWORD not in json.dumps(data)
    finally:
        server.should_exit = True


# -- OpenAPI ---------------------------------------------------------------------------------------
def test_the_openapi_document_covers_every_route_from_the_handlers_models(api):
    url, gyro = api
    status, _, doc = call(url, "GET", "/api/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(OPENAPI)) and doc["openapi"] == "3.1.0"
    served = {(m, r.path.replace(":path", "")) for r in routes() if hasattr(r, "path")
              for m in r.methods - {"HEAD"}}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    # The body schemas are the very models the handlers validate with.
    for op, _ in ENDPOINTS:
        if op.body:
            ref = doc["paths"][op.path][op.method.lower()]["requestBody"]["content"]["application/json"]
            name = ref["schema"]["$ref"].rsplit("/", 1)[1]
            assert doc["components"]["schemas"][name]["properties"] == \
                op.body.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
    assert set(doc["components"]["schemas"]["SettingsPatch"]["properties"]) == \
        set(schemas.SettingsPatch.model_json_schema(by_alias=True)["properties"])
