"""Foundation: configuration, provider plugins (built-in and through entry points), the app
entrypoint under AppTest, and the HTTP API over real HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import uvicorn
from streamlit.testing.v1 import AppTest

import core.service
from core import providers
from core.config import load_config
from core.errors import ConfigError
from core.models import GenerationRequest

ROOT = Path(__file__).resolve().parents[1]


# -- configuration ---------------------------------------------------------------------------
def test_no_key_means_simulator_and_a_key_means_openai(tmp_path):
    none = tmp_path / "none.toml"
    assert load_config({}, none).provider == "simulator"
    cfg = load_config({"OPENAI_API_KEY": "sk-abc", "GYROSCOPE_DB": str(tmp_path / "x.db")}, none)
    assert cfg.provider == "openai" and cfg.db_path == tmp_path / "x.db"
    assert "sk-abc" not in repr(cfg)
    assert load_config({"OPENAI_BASE_URL": "http://localhost:11434/v1/"}, none).base_url == "http://localhost:11434/v1"
    assert str(load_config({}, none).db_path) == "data/gyroscope.db"


def test_secrets_toml_is_read_and_env_wins(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('OPENAI_API_KEY = "sk-from-file"\nGYROSCOPE_ADMIN_PASSWORD = "pw"\n')
    assert load_config({}, secrets).api_key == "sk-from-file"
    assert load_config({"OPENAI_API_KEY": "sk-env"}, secrets).api_key == "sk-env"
    assert load_config({}, secrets).admin_password == "pw"
    secrets.write_text("not = [toml")
    with pytest.raises(ConfigError, match="secrets.toml could not be read"):
        load_config({}, secrets)


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://x/v1", "not a url", "http://u:p@host:99999/v1",
                                 "https://u:p@[::1/v1"])
def test_bad_base_url_is_named_in_a_clear_message(tmp_path, url):
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL=.*is not a usable http") as info:
        load_config({"OPENAI_BASE_URL": url}, tmp_path / "none.toml")
    assert "u:p@" not in str(info.value)


# -- provider plugins ------------------------------------------------------------------------
def test_builtins_are_registered_explicitly():
    assert {"openai", "simulator"} <= set(providers.names())


def test_openai_provider_against_the_simulator(simulator, tmp_path):
    from core.providers.openai_provider import OpenAIProvider
    from core.config import Config
    provider = OpenAIProvider("sk-test", simulator.base_url)
    gyro = core.service.Gyroscope(Config("openai", simulator.base_url, tmp_path / "p.db"), provider=provider)
    result = gyro.generate(GenerationRequest(prompt="Describe a lighthouse", max_tokens=30, source="test"))
    assert result.outcome == "ok" and result.usage.completion_tokens <= 30
    assert "gpt-4o-mini" in gyro.models()
    gyro.close()


def test_third_party_provider_through_the_entry_point_group(tmp_path, monkeypatch, simulator):
    pkg = tmp_path / "src"
    (pkg / "echo_provider").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "gyroscope-echo-provider"
        version = "0.1"
        [project.entry-points."gyroscope.providers"]
        echo = "echo_provider:factory"
    """))
    (pkg / "echo_provider" / "__init__.py").write_text(textwrap.dedent("""
        from core.providers.base import Completion, Provider, Usage

        class EchoProvider(Provider):
            name = "echo"
            base_url = "echo://"
            async def complete(self, params, timeout):
                text = params["messages"][-1]["content"][::-1]
                return Completion(text, params["model"], "stop", Usage(1, len(text)))
            async def stream(self, params, timeout):
                raise NotImplementedError
            async def models(self):
                return ["echo-1"]

        def factory(config):
            return EchoProvider()
    """))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(pkg)], check=True, capture_output=True, timeout=300)
    monkeypatch.syspath_prepend(str(target))
    providers.reload()
    try:
        assert "echo" in providers.names()
        from core.config import Config
        provider = providers.create("echo", Config("echo", None, tmp_path / "e.db"))
        gyro = core.service.Gyroscope(Config("echo", None, tmp_path / "e.db"), provider=provider)
        result = gyro.generate(GenerationRequest(prompt="abc", model="echo-1", source="test"))
        assert result.content == "cba" and result.cost is None
        gyro.db.flush()
        row = gyro.db.query_one("SELECT provider, cost_unknown FROM requests")
        assert row == {"provider": "echo", "cost_unknown": 1}
        gyro.close()
    finally:
        monkeypatch.undo()
        providers.reload()
    with pytest.raises(ConfigError, match="Unknown provider 'echo'"):
        providers.create("echo", None)


# -- the app ---------------------------------------------------------------------------------
def test_the_app_starts_under_apptest_on_the_generate_page(app_env):
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "Generate"
    assert any("Simulated responses" in i.value for i in at.info)


# -- the HTTP API over real HTTP -----------------------------------------------------------------
def _serve(app) -> tuple[str, uvicorn.Server]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def _post(url: str, body, token: str | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def api(app_env):
    from core.api import asgi_app
    gyro = core.service.default_service()
    url, server = _serve(asgi_app())      # behind the guard, as streamlit_app.py serves it
    yield url, gyro
    server.should_exit = True


def test_api_generate_json_stream_and_bad_input(api):
    url, gyro = api
    status, body = _post(url + "/api/generate", {"prompt": "Name a river", "max_tokens": 20})
    data = json.loads(body)
    assert status == 200 and data["outcome"] == "ok" and data["usage"]["completion_tokens"] <= 20
    status, body = _post(url + "/api/generate", {"prompt": "Name a lake", "max_tokens": 20, "stream": True})
    events = [block for block in body.decode().split("\n\n") if block.strip()]
    deltas = [json.loads(e.split("data: ", 1)[1])["text"] for e in events if e.startswith("event: delta")]
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: done") and "".join(deltas) == done["content"]
    for bad, message in ((b"{nope", "must be JSON"), ({"promt": "x"}, "Unknown field"),
                         ({"prompt": ""}, "prompt is empty"), ({"prompt": "x", "max_tokens": 0}, "max_tokens")):
        status, body = _post(url + "/api/generate", bad)
        assert status == 400 and message in json.loads(body)["error"]["message"]
    stats = json.loads(urllib.request.urlopen(url + "/api/stats", timeout=10).read())
    cli = subprocess.run([sys.executable, "-m", "core", "stats", "--json"], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ})
    # Refused bodies (a range too, now checked by the request model) leave no row.
    assert stats["total_requests"] == json.loads(cli.stdout)["total_requests"] == 2


def test_api_open_breaker_answers_503_with_retry_after(api):
    url, gyro = api
    gyro.breakers.get("simulator", "gpt-4o-mini").force_open(actor="test")
    status, body = _post(url + "/api/generate", {"prompt": "Hello", "cache": False})
    assert status == 503 and json.loads(body)["error"]["kind"] == "circuit_open"


def test_api_token_is_required_when_configured(app_env, monkeypatch):
    monkeypatch.setenv("GYROSCOPE_API_TOKEN", "t0ken-123")
    from core.api import asgi_app
    core.service.default_service().provider.sim.set_latency(ttft_ms=0, tokens_per_s=0)
    url, server = _serve(asgi_app())
    try:
        status, body = _post(url + "/api/generate", {"prompt": "Hi"})
        assert status == 401 and b"t0ken-123" not in body
        assert _post(url + "/api/generate", {"prompt": "Hi", "max_tokens": 5}, token="t0ken-123")[0] == 200
        # Health too: a caller without the token learns nothing (tests/test_http_guard.py).
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/api/health", timeout=5)
        assert refused.value.code == 401
    finally:
        server.should_exit = True


def test_simulator_runs_standalone_from_the_command_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "core", "simulator", "--port", str(port),
                             "--ttft-ms", "0", "--tokens-per-s", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read())
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        assert "gpt-4o-mini" in {m["id"] for m in body["data"]}
    finally:
        proc.terminate()
        proc.wait(10)


def test_api_client_that_goes_away_mid_stream_is_a_stop(api):
    url, gyro = api
    gyro.provider.sim.set_latency(ttft_ms=0, tokens_per_s=30)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "A long story about a harbour town", "stream": True, "cache": False})
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        received = b""
        while received.count(b"event: delta") < 3:
            received += sock.recv(4096)
    deadline = time.time() + 5
    row = None
    while time.time() < deadline:
        gyro.db.flush()
        row = gyro.db.query_one("SELECT outcome, completion_tokens FROM requests WHERE source = 'api'")
        if row:
            break
        time.sleep(0.05)
    assert row is not None and row["outcome"] == "cancelled" and row["completion_tokens"] >= 1
    deadline = time.time() + 3
    while gyro.provider.sim.stats()["streams_disconnected"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert gyro.provider.sim.stats()["streams_disconnected"] == 1


def test_credentials_in_the_base_url_never_reach_the_database(simulator, tmp_path):
    from core.config import Config
    from core.providers.openai_provider import OpenAIProvider
    url = simulator.base_url.replace("http://", "http://alice:hunter2-pw@")
    provider = OpenAIProvider("sk-live-SECRET-key", url)
    gyro = core.service.Gyroscope(Config("openai", provider.base_url, tmp_path / "c.db"), provider=provider)
    gyro.generate(GenerationRequest(prompt="Name a mountain", max_tokens=10, source="test"))
    gyro.close()
    data = b"".join(p.read_bytes() for p in tmp_path.glob("c.db*"))
    for secret in (b"hunter2-pw", b"sk-live-SECRET-key", b"alice"):
        assert secret not in data
    assert provider.base_url == simulator.base_url


def test_a_base_url_without_the_api_path_is_explained(simulator, tmp_path):
    from core.config import Config
    from core.errors import BadRequest
    from core.providers.openai_provider import OpenAIProvider
    url = simulator.base_url.removesuffix("/v1") + "/nothing-here"
    gyro = core.service.Gyroscope(Config("openai", url, tmp_path / "u.db"), provider=OpenAIProvider("sk", url))
    with pytest.raises(BadRequest, match="no chat completions endpoint .*Check OPENAI_BASE_URL"):
        gyro.generate(GenerationRequest(prompt="Hi", source="test"))
    gyro.close()


def test_api_stream_announces_retries_even_when_it_fails(api):
    url, gyro = api
    gyro.settings.set_many({"retry.max_retries": 2, "retry.base_delay_s": 0.01, "retry.max_delay_s": 0.02})
    gyro.provider.sim.set_faults(error_rate=1.0, error_status=503)
    status, body = _post(url + "/api/generate", {"prompt": "Hi", "stream": True, "cache": False})
    kinds = [block.split("\n")[0] for block in body.decode().split("\n\n") if block.strip()]
    assert kinds == ["event: retry", "event: retry", "event: error"]
    assert '"attempt": 2' in body.decode() and '"kind": "server_error"' in body.decode()
