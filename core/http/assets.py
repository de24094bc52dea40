"""Streamlit's front-end bundle, served from memory.

A browser opening the dashboard with an empty cache asks for ~100 of Streamlit's JavaScript
and CSS files (``/static/js/*.js``, ``/static/css/*.css``, fonts). Streamlit serves each
through Starlette's StaticFiles: a stat, an open and a thread hop per 64 KiB chunk, in the
event loop that also runs the sessions. A cold visit to the Metrics page is CPU-bound on this
2-core machine (the browser's processes and the server share the two cores); the server spent
~0.4 s of CPU on one, most of it on those files. From memory, with httptools parsing, it
spends ~0.15 s, the page's script run included (docs/benchmarks.md, fourth round).

The files are content-hashed and never change while the server runs (Streamlit serves them
``immutable`` for a year), so this middleware reads each one once, the first time it is asked
for, and answers later requests from memory with the same cache headers. Only plain file
names under ``static/<folder>/`` are served here; anything else (an odd path, a file that is
not there, a range request, a file over the memory cap) goes on to Streamlit unchanged.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from email.utils import formatdate
from pathlib import Path

import streamlit

STATIC = Path(streamlit.__file__).parent / "static"
IMMUTABLE = b"public, immutable, max-age=31536000"     # as Streamlit's own static route
# static/<kind>/<hashed file name>: no "..", no hidden files, no query in the name.
SAFE = re.compile(r"static/[A-Za-z0-9_-]{1,40}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,150}\.[A-Za-z0-9]{1,10}")
TYPES = {".js": "application/javascript", ".css": "text/css", ".woff2": "font/woff2",
         ".woff": "font/woff", ".ttf": "font/ttf", ".svg": "image/svg+xml", ".png": "image/png",
         ".json": "application/json", ".wasm": "application/wasm"}


class Asset:
    __slots__ = ("body", "etag", "headers")

    def __init__(self, body: bytes, path: Path) -> None:
        self.body = body
        self.etag = b'"' + hashlib.md5(body, usedforsecurity=False).hexdigest().encode() + b'"'
        kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/javascript":
            kind += "; charset=utf-8"
        self.headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                        (b"accept-ranges", b"bytes"),
                        (b"cache-control", IMMUTABLE), (b"etag", self.etag),
                        (b"last-modified", formatdate(path.stat().st_mtime, usegmt=True).encode())]


class StaticAssets:
    """ASGI middleware: GET/HEAD of ``{root}/static/<kind>/<file>`` from memory."""

    def __init__(self, app, base_path: str = "", directory: Path = STATIC,
                 max_bytes: int = 64 * 1024 * 1024) -> None:
        self.app = app
        root = base_path.strip("/")
        self.prefix = f"/{root}/" if root else "/"
        self.directory = directory.resolve()
        self.max_bytes = max_bytes
        self.held = 0
        # The files there are, listed once: a request for any other name goes on to Streamlit
        # without touching the disk, and nothing is remembered for it.
        try:
            self.names = {p.relative_to(self.directory).as_posix()
                          for p in self.directory.glob("static/*/*") if p.is_file()}
        except OSError:
            self.names = set()
        self.assets: dict[str, Asset] = {}

    def _asset(self, rel: str) -> Asset | None:
        if rel in self.assets:
            return self.assets[rel]
        if rel not in self.names:
            return None
        try:
            path = (self.directory / rel).resolve()
            if not path.is_relative_to(self.directory):
                return None
            size = path.stat().st_size
            if self.held + size > self.max_bytes:
                return None
            asset = Asset(path.read_bytes(), path)
        except OSError:          # gone or unreadable since the listing: Streamlit answers
            return None
        self.held += size
        self.assets[rel] = asset
        return asset

    async def __call__(self, scope, receive, send) -> None:
        asset, headers = None, {}
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            rel = path[len(self.prefix):] if path.startswith(self.prefix) else ""
            if SAFE.fullmatch(rel):
                headers = dict(scope["headers"])
                if b"range" not in headers:
                    asset = self._asset(rel)
        if asset is None:
            await self.app(scope, receive, send)
            return
        if asset.etag in headers.get(b"if-none-match", b""):
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"etag", asset.etag), (b"cache-control", IMMUTABLE)]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": asset.headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else asset.body})
