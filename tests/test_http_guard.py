"""The guard at the HTTP edge, over real HTTP: token first, Host and Origin allow-lists (on
the dashboard's websocket too, under `streamlit run`), JSON-only bodies, 413 without reading
the body, nesting and number limits, JSON 404/405. No refusal reaches the upstream, writes
a row or changes a setting."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

import core.service
from core.config import redact_url
from core.http.guard import GuardConfig
from tests.browser import streamlit_app
from tests.test_foundation import _serve

PROMPT = json.dumps({"prompt": "Name a river", "max_tokens": 5}).encode()


def call(url: str, method: str, path: str, body: bytes | None = None, **headers: str):
    """(status, headers, parsed JSON or raw bytes) of one request, any Host/Origin we like."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw
    return resp.status, resp.headers, data


def untouched(gyro) -> None:
    """No request row, no upstream call, no setting changed."""
    assert gyro.db.query_one("SELECT count(*) AS n FROM requests")["n"] == 0
    assert gyro.provider.sim.stats()["chat_requests"] == 0
    assert gyro.settings.snapshot().version == 0


@pytest.fixture
def guarded(app_env):
    """The API behind a guard that also allows gyro.example.com, *.corp.test and one origin."""
    from core.api import asgi_app
    gyro = core.service.default_service()
    config = GuardConfig(allowed_hosts=("localhost", "127.0.0.1", "::1", "gyro.example.com", "*.corp.test"),
                         allowed_origins=("https://tools.example.com",), max_body_bytes=64 * 1024)
    url, server = _serve(asgi_app(config))
    yield url, gyro
    server.should_exit = True


JSON = {"Content-Type": "application/json"}


# -- Host ------------------------------------------------------------------------------------
def test_a_rebinding_host_is_refused_before_anything_runs(guarded):
    url, gyro = guarded
    for host in ("rebind.attacker.test", "rebind.attacker.test:8501", "127.0.0.1.attacker.test",
                 "user@127.0.0.1", "", "corp.test.evil"):
        status, _, data = call(url, "POST", "/api/generate", PROMPT, Host=host, **JSON)
        assert status == 400 and data["error"]["kind"] == "host_not_allowed", (host, data)
        assert "GYROSCOPE_ALLOWED_HOSTS" in data["error"]["message"]
    status, _, data = call(url, "GET", "/v1/models", Host="rebind.attacker.test")
    assert status == 400 and data["error"]["type"] == "invalid_request_error"   # OpenAI's shape
    untouched(gyro)
    for host in ("localhost", "LOCALHOST:1", "[::1]:80", "gyro.example.com", "a.b.corp.test"):
        status, _, data = call(url, "GET", "/api/health", Host=host)
        assert status == 200 and data["status"] == "ok", (host, data)


def test_hosts_and_body_limit_come_from_the_environment():
    config = GuardConfig.from_env({"GYROSCOPE_ALLOWED_HOSTS": " gyro.lan, *.corp.test ,",
                                   "GYROSCOPE_ALLOWED_ORIGINS": "https://Tools.example.com/",
                                   "GYROSCOPE_MAX_BODY_BYTES": "2048", "GYROSCOPE_API_TOKEN": " tok "})
    assert config.allowed_hosts == ("localhost", "127.0.0.1", "::1", "gyro.lan", "*.corp.test")
    assert config.allowed_origins == ("https://tools.example.com",)
    assert config.max_body_bytes == 2048 and config.api_token == "tok" and "tok" not in repr(config)
    assert GuardConfig.from_env({}).max_body_bytes == 1024 * 1024
    for bad in ("1 MB", "12"):
        with pytest.raises(ValueError, match="GYROSCOPE_MAX_BODY_BYTES"):
            GuardConfig.from_env({"GYROSCOPE_MAX_BODY_BYTES": bad})


# -- Origin and content type ---------------------------------------------------------------------
def test_a_cross_site_post_never_reaches_the_upstream(guarded):
    url, gyro = guarded
    port = url.rsplit(":", 1)[1]
    # The attack: a text/plain POST (no preflight) from another site.
    status, _, data = call(url, "POST", "/api/generate", PROMPT, Origin="http://evil.test",
                           Content_Type="text/plain")
    assert status == 403 and data["error"]["kind"] == "origin_not_allowed"
    for origin in ("http://evil.test", "null", f"http://127.0.0.1.evil.test:{port}",
                   "http://127.0.0.1:1", "ftp://127.0.0.1"):
        status, _, data = call(url, "POST", "/api/generate", PROMPT, Origin=origin, **JSON)
        assert status == 403, (origin, data)
    # Without an Origin (not a browser) the content type still has to be JSON.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, data = call(url, "POST", "/api/generate", PROMPT, Content_Type=ctype)
        assert status == 415 and "Content-Type: application/json" in data["error"]["message"]
    status, _, data = call(url, "POST", "/api/generate", PROMPT)
    assert status == 415
    untouched(gyro)
    # Another local web app is another site, even on a loopback name.
    status, _, data = call(url, "POST", "/api/generate", PROMPT, Origin="http://localhost:3000", **JSON)
    assert status == 403
    # The server's own page, a listed origin, a page on a host the operator allowed (a proxy
    # may pass another Host on), and a charset parameter are fine.
    for origin in (f"http://127.0.0.1:{port}", "https://tools.example.com", "https://gyro.example.com",
                   "https://a.corp.test:8443"):
        status, _, data = call(url, "POST", "/api/generate", PROMPT, Origin=origin,
                               Content_Type="application/json; charset=utf-8")
        assert status == 200 and data["outcome"] == "ok", (origin, data)


# -- token first -----------------------------------------------------------------------------------
def test_without_the_token_nothing_about_the_configuration_shows(app_env, monkeypatch):
    from core.api import asgi_app
    monkeypatch.setenv("GYROSCOPE_API_TOKEN", "t0ken-abc")
    # A broken configuration whose URL carries a password and no scheme (the leak).
    monkeypatch.setenv("OPENAI_BASE_URL", "alice:hunter2@llm.internal/v1")
    url, server = _serve(asgi_app())
    try:
        for method, path in (("GET", "/api/health"), ("GET", "/api/stats"), ("POST", "/api/generate"),
                             ("GET", "/v1/models"), ("GET", "/api/nothing"), ("POST", "/api/generate/stream")):
            status, headers, data = call(url, method, path, PROMPT if method == "POST" else None,
                                         Content_Type="text/plain")
            text = json.dumps(data)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (path, data)
            for leak in ("hunter2", "alice", "llm.internal", "OPENAI_BASE_URL", "t0ken"):
                assert leak not in text
        status, _, data = call(url, "GET", "/v1/models", Authorization="Bearer wrong")
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
        # With the token the operator sees the problem, still without the password.
        status, _, data = call(url, "GET", "/api/health", Authorization="Bearer t0ken-abc")
        text = json.dumps(data)
        assert status == 400 and "llm.internal/v1" in text and "hunter2" not in text and "alice" not in text
    finally:
        # Health started building the service in the background: let it fail here, under
        # this test's environment, not build one on the next test's.
        import core.api
        while core.api._starting is not None and not core.api._starting.done():
            time.sleep(0.01)
        server.should_exit = True


def test_the_openai_sdk_meets_the_token_as_its_own_errors(app_env, monkeypatch):
    import openai
    from core.api import asgi_app
    monkeypatch.setenv("GYROSCOPE_API_TOKEN", "t0ken-abc")
    url, server = _serve(asgi_app())
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=url + "/v1", api_key="t0ken-abc", max_retries=0).models.list()
        assert "gpt-4o-mini" in [m.id for m in models.data]
        # A body over the limit is the SDK's own status error too (413), never sent upstream.
        client = openai.OpenAI(base_url=url + "/v1", api_key="t0ken-abc", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "x" * 2_000_000}])
        assert err.value.status_code == 413
        assert core.service.default_service().provider.sim.stats()["chat_requests"] == 0
    finally:
        server.should_exit = True


@pytest.mark.parametrize("url, shown", [
    ("alice:hunter2@llm.internal/v1", "llm.internal/v1"),
    ("http://alice:hunter2@llm.internal:8000/v1?key=sk-1#x", "http://llm.internal:8000/v1"),
    ("alice:hunter2@[::1]:9000/v1", "[::1]:9000/v1"),
    ("localhost:8000/v1", "localhost:8000/v1"),
    ("http://alice:hunter2@:99999/", "<unparseable URL>"),
])
def test_redaction_drops_credentials_with_or_without_a_scheme(url, shown):
    assert redact_url(url) == shown


# -- size, depth, numbers ----------------------------------------------------------------------
def _raw(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    return sock


def _status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split()[1]), rest


def test_a_body_over_the_limit_is_413_without_being_read(guarded):
    url, gyro = guarded
    # 100 MB announced: refused from the headers alone, before a byte of body is sent.
    sock = _raw(url, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
    status, rest = _status(sock)
    sock.close()
    assert status == 413 and b"GYROSCOPE_MAX_BODY_BYTES" in rest
    # Chunked (no length): refused once the bytes received pass the limit (64 KiB here).
    sock = _raw(url, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b'{"prompt": "' + b"x" * 16384
    sent = 0
    sock.settimeout(0.05)
    status = None
    for _ in range(6400):              # up to 100 MB, if the server never answered
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:                # the server answered and closed
            break
        sent += len(piece)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except (TimeoutError, BlockingIOError):
            continue
    sock.settimeout(10)
    status, _ = _status(sock)
    sock.close()
    assert status == 413 and sent < 1024 * 1024, sent      # stopped near 64 KiB, not 100 MB
    untouched(gyro)


def test_deep_nesting_and_huge_numbers_are_400_naming_the_problem(guarded):
    url, gyro = guarded
    cases = [
        (b'{"prompt": "Hi", "stop": ' + b"[" * 70 + b"]" * 70 + b"}", "nested too deeply"),
        (b'{"prompt": "Hi", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"prompt": "Hi", "seed": ' + b"9" * 65 + b"}", "too many digits"),
        (b'{"prompt": "Hi", "temperature": 1e999}', "too large"),
        (b'{"prompt": "Hi", "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "Hi", "temperature": -Infinity}', "-Infinity is not a JSON number"),
    ]
    for body, words in cases:
        status, _, data = call(url, "POST", "/api/generate", body, **JSON)
        assert status == 400 and words in data["error"]["message"], (body[:40], data)
    status, _, data = call(url, "POST", "/v1/chat/completions", cases[0][0], **JSON)
    assert status == 400 and "nested too deeply" in data["error"]["message"]
    assert data["error"]["type"] == "invalid_request_error"
    # Sixty levels and a 20-digit seed are fine (the handler then judges the fields).
    status, _, data = call(url, "POST", "/api/generate",
                           b'{"prompt": "Hi", "max_tokens": 5, "seed": 12345678901234567890, "stop": ["x"]}',
                           **JSON)
    assert status in (200, 400) and "too many digits" not in json.dumps(data)
    gyro.db.flush()


# -- JSON for the unknown ----------------------------------------------------------------------
def test_unknown_paths_and_wrong_methods_answer_json(guarded):
    url, gyro = guarded
    status, headers, data = call(url, "GET", "/api/nothing/here")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert data["error"]["kind"] == "not_found" and "/api/nothing/here" in data["error"]["message"]
    status, _, data = call(url, "GET", "/v1/engines")
    assert status == 404 and set(data["error"]) == {"message", "type", "param", "code"}
    status, headers, data = call(url, "GET", "/api/generate")
    assert status == 405 and headers["Allow"] == "POST" and data["error"]["kind"] == "method_not_allowed"
    status, headers, data = call(url, "POST", "/api/health", b"{}", **JSON)
    assert status == 405 and "GET" in headers["Allow"]
    status, headers, data = call(url, "GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST" and data["error"]["type"] == "invalid_request_error"
    for path in ("/api", "/v1", "/api/"):
        assert call(url, "GET", path)[0] == 404
    untouched(gyro)


# -- under `streamlit run`: the dashboard's websocket and the SPA's catch-all ---------------------
@pytest.fixture(scope="module")
def streamlit_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    with streamlit_app(tmp, unset=("GYROSCOPE_API_TOKEN", "GYROSCOPE_ADMIN_PASSWORD"),
                       GYROSCOPE_PROVIDER="simulator") as url:
        yield url, tmp / "app.db"


def _handshake(url: str, host: str, origin: str | None) -> int:
    """The HTTP status a websocket upgrade on /_stcore/stream gets (101 = opened)."""
    origin_line = f"Origin: {origin}\r\n" if origin else ""
    sock = _raw(url, (f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: streamlit\r\n"
                      f"{origin_line}\r\n").encode())
    status, _ = _status(sock)
    sock.close()
    return status


def test_the_dashboards_websocket_refuses_foreign_hosts_and_origins(streamlit_server):
    url, _ = streamlit_server
    own = url.removeprefix("http://")
    # The attack: attacker Host and a matching Origin (Streamlit alone accepts it).
    assert _handshake(url, "rebind.attacker.test", "http://rebind.attacker.test") == 403
    assert _handshake(url, own, "http://evil.test") == 403
    assert _handshake(url, own, "null") == 403
    assert _handshake(url, own, url) == 101
    from websockets.sync.client import connect
    with connect(url.replace("http", "ws") + "/_stcore/stream", origin=url,
                 subprotocols=["streamlit"], open_timeout=10) as ws:
        assert ws.subprotocol == "streamlit"


def test_under_streamlit_the_api_is_guarded_and_unknown_paths_are_json(streamlit_server):
    url, db = streamlit_server
    status, _, data = call(url, "POST", "/api/generate", PROMPT, Origin="http://evil.test",
                           Content_Type="text/plain")
    assert status == 403
    status, _, data = call(url, "POST", "/api/generate", PROMPT, Host="rebind.attacker.test", **JSON)
    assert status == 400
    status, headers, data = call(url, "GET", "/api/models")    # the dashboard's HTML until now
    assert status == 404 and headers["Content-Type"] == "application/json"
    status, _, data = call(url, "GET", "/v1/nothing")
    assert status == 404 and data["error"]["type"] == "invalid_request_error"
    status, _, data = call(url, "GET", "/settings", Host="rebind.attacker.test")   # a page, too
    assert status == 400
    assert call(url, "GET", "/settings")[0] == 200
    # Nothing was served: the service was never even built (no history table).
    assert not db.exists()


def test_a_content_length_no_server_would_pass_on_is_a_400_not_a_crash():
    # uvicorn's h11 refuses such a header itself, so this one is called as ASGI directly:
    # the guard must not rely on the server for it ('²'.isdigit() is true, int('²') fails).
    import asyncio

    from core.http.guard import BodyLimit
    sent = []

    async def app(scope, receive, send):        # never reached
        raise AssertionError("the app ran")

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    for value in ("²", "-1", "1e3", "0x10"):
        sent.clear()
        scope = {"type": "http", "path": "/api/generate", "method": "POST",
                 "headers": [(b"content-length", value.encode("latin-1"))]}
        asyncio.run(BodyLimit(app)(scope, receive, send))
        assert sent[0]["status"] == 400 and b"Content-Length" in sent[1]["body"]
