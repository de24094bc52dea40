"""The guard's cost per request: the same tiny route called as an ASGI app in-process,
bare and behind core/http/guard.py's middleware (token, Host, Origin, JSON-only, body limit,
JSON limits), so the difference is the guard's own time, with no network or server in it.

    python bench/guard.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from core.http import guard  # noqa: E402

TOKEN = "bench-token"


async def endpoint(request):
    if request.method == "POST":
        await request.body()
    return JSONResponse({"ok": True})


def apps():
    routes = [Route("/api/x", endpoint, methods=["GET", "POST"])]
    config = guard.GuardConfig(api_token=TOKEN)
    bare = Starlette(routes=routes)
    guarded = Starlette(routes=[*routes, guard.JsonForUnknown(routes)],
                        middleware=guard.middleware(config, routes))
    return bare, guarded


def scope(method: str, body: bytes) -> dict:
    headers = [(b"host", b"127.0.0.1:8501"), (b"authorization", f"Bearer {TOKEN}".encode()),
               (b"origin", b"http://127.0.0.1:8501")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": "/api/x", "raw_path": b"/api/x", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8501)}


async def one(app, method: str, body: bytes) -> int:
    sent = False
    status = 0

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    t0 = time.perf_counter_ns()
    await app(scope(method, body), receive, send)
    elapsed = time.perf_counter_ns() - t0
    assert status == 200, status
    return elapsed


async def measure(app, method: str, body: bytes, n: int) -> list[float]:
    for _ in range(200):                       # warm up (middleware stack built, caches filled)
        await one(app, method, body)
    return [await one(app, method, body) / 1000 for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    bare, guarded = apps()
    small = json.dumps({"prompt": "Write a tagline for a bakery", "max_tokens": 60}).encode()
    big = json.dumps({"prompt": "word " * 12_000, "stop": [["x"] * 3] * 10}).encode()   # ~60 KB
    cases = [("GET, no body", "GET", b""), (f"POST {len(small)} B JSON", "POST", small),
             (f"POST {len(big) // 1024} KiB JSON", "POST", big)]
    print(f"{args.requests} requests per case, in-process ASGI calls (no network); µs per request")
    print(f"{'case':24} {'bare p50':>9} {'guarded p50':>12} {'guard p50':>10} {'guard p95':>10}")
    for name, method, body in cases:
        n = args.requests if len(body) < 10_000 else max(1000, args.requests // 10)
        # Interleave rounds so drift on a shared machine hits both alike.
        b_all, g_all = [], []
        for _ in range(4):
            b_all += asyncio.run(measure(bare, method, body, n // 4))
            g_all += asyncio.run(measure(guarded, method, body, n // 4))
        b50, g50 = statistics.median(b_all), statistics.median(g_all)
        b95 = statistics.quantiles(b_all, n=20)[18]
        g95 = statistics.quantiles(g_all, n=20)[18]
        print(f"{name:24} {b50:9.1f} {g50:12.1f} {g50 - b50:10.1f} {g95 - b95:10.1f}")


if __name__ == "__main__":
    main()
