"""Streamlit's front-end files served from memory (core/http/assets.py): the same bytes and
cache headers as Streamlit's own route, a 304 for a matching ETag, and everything odd left to
Streamlit. In-process over ASGI with Streamlit's installed files, then under `streamlit run`
over real HTTP (at the root and under a server.baseUrlPath)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import re

import pytest

from core.http import assets
from tests.browser import streamlit_app

JS = sorted((assets.STATIC / "static" / "js").glob("*.js"))
CSS = sorted((assets.STATIC / "static" / "css").glob("*.css"))
FONT = sorted((assets.STATIC / "static" / "media").glob("*.woff2"))


class Downstream:
    """Stands for Streamlit behind the middleware: records what reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"streamlit"})


def call(mw, path: str, method: str = "GET", headers: dict[str, str] | None = None):
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers":
             [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(mw(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_a_bundle_file_is_served_from_memory_with_streamlits_cache_headers():
    down = Downstream()
    mw = assets.StaticAssets(down)
    js, css, font = JS[0], CSS[0], FONT[0]
    for path, kind in ((js, "application/javascript"), (css, "text/css"), (font, "font/woff2")):
        rel = path.relative_to(assets.STATIC).as_posix()
        status, headers, body = call(mw, "/" + rel)
        assert status == 200 and body == path.read_bytes()
        assert headers["content-type"].startswith(kind)
        assert headers["cache-control"] == "public, immutable, max-age=31536000"
        assert int(headers["content-length"]) == len(body) and headers["etag"].startswith('"')
    assert down.paths == []                                           # nothing reached Streamlit
    rel = "/" + js.relative_to(assets.STATIC).as_posix()
    status, headers, body = call(mw, rel, "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) == js.stat().st_size
    etag = call(mw, rel)[1]["etag"]
    status, headers, body = call(mw, rel, headers={"If-None-Match": etag})
    assert status == 304 and body == b"" and headers["etag"] == etag
    assert call(mw, rel, headers={"If-None-Match": '"other"'})[0] == 200
    assert list(mw.assets) == [p.relative_to(assets.STATIC).as_posix() for p in (js, css, font)]  # read once each


@pytest.mark.parametrize("path", [
    "/static/js/no-such-file.js",                    # not there: Streamlit's answer (its index)
    "/static/js/../../index.html",                   # out of static/: never here
    "/static/../static/js/x.js", "/static//js/x.js", "/static/js/.hidden.js",
    "/static/index.html", "/static/js", "/index.html", "/", "/metrics", "/_stcore/health",
    "/media/abc.csv", "/static/js/sub/dir.js",
    "/static/js/" + "a" * 300 + ".js",               # a name too long for the file system: no 500
])
def test_anything_else_goes_to_streamlit_unchanged(path):
    down = Downstream()
    mw = assets.StaticAssets(down)
    status, _, body = call(mw, path)
    assert (status, body, down.paths) == (299, b"streamlit", [path])
    assert mw.assets == {}                           # nothing remembered for names that are not there


def test_ranges_writes_and_other_roots_go_to_streamlit_and_memory_is_capped():
    rel = "/" + JS[0].relative_to(assets.STATIC).as_posix()
    down = Downstream()
    mw = assets.StaticAssets(down)
    assert call(mw, rel, headers={"Range": "bytes=0-10"})[0] == 299       # a range: Streamlit's
    assert call(mw, rel, "POST")[0] == 299
    under = assets.StaticAssets(down, base_path="gyro/")
    assert call(under, "/gyro" + rel)[0] == 200 and call(under, rel)[0] == 299
    small = assets.StaticAssets(down, max_bytes=JS[0].stat().st_size - 1)
    assert call(small, rel)[0] == 299 and small.held == 0                 # too big to hold: Streamlit's
    assert len(down.paths) == 4


def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


@pytest.mark.parametrize("base", ["", "gyro"])
def test_under_streamlit_the_pages_files_come_from_memory_byte_for_byte(tmp_path, base):
    env = {"STREAMLIT_SERVER_BASE_URL_PATH": base} if base else {}
    root = f"/{base}" if base else ""
    with streamlit_app(tmp_path, **env) as url:
        index = get(url, root + "/")[2].decode()
        files = re.findall(r'(?:src|href)="\./(static/[^"]+)"', index)
        assert any(f.endswith(".js") for f in files) and any(f.endswith(".css") for f in files)
        for rel in files:
            status, headers, body = get(url, f"{root}/{rel}")
            assert status == 200 and body == (assets.STATIC / rel).read_bytes(), rel
            assert headers["etag"] == f'"{hashlib.md5(body).hexdigest()}"'   # ours (Starlette's hashes mtime and size)
            assert headers["cache-control"] == "public, immutable, max-age=31536000"
            assert get(url, f"{root}/{rel}", {"If-None-Match": headers["etag"]})[0] == 304
        status, headers, body = get(url, f"{root}/static/js/no-such-file.js")   # Streamlit's own answer
        assert status == 200 and headers["content-type"].startswith("text/html")


def test_uvicorn_parses_http_with_httptools():
    """The dependency is there and uvicorn's "auto" picks it (h11, its pure-Python parser,
    cost the server ~25 % more CPU per front-end file)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    assert AutoHTTPProtocol.__name__ == "HttpToolsProtocol"
