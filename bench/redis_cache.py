"""A Redis-backed cache hit: the lookup alone, and a whole request answered from the cache.

Helicone reports 1.6 ms for its gateway's Redis-backed cache hit. Three figures here:
- the lookup (RedisCache.get: one Lua round trip that reads, checks age, moves the entry
  in the LRU order and counts the hit) against the SQLite cache's lookup;
- a whole request answered from the cache through the pipeline (``agenerate``: validate,
  key, lookup, record the history row), Redis-backed and SQLite-backed;
- the same over HTTP through /v1/chat/completions (the OpenAI client, in its own process,
  to the gateway), with the gateway's own time per request (x-gyroscope-overhead-ms).

Redis is the one in GYROSCOPE_REDIS_URL, else 127.0.0.1:6379, else a redis-server started
here (no persistence), under a throw-away key prefix removed afterwards.

    python bench/redis_cache.py [--entries 10000] [--lookups 5000] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from bench._sim import free_port  # noqa: E402
from core.cache import cache_key  # noqa: E402
from core.config import Config, redact_url  # noqa: E402
from core.models import GenerationRequest  # noqa: E402
from core.providers.simulator_provider import SimulatorProvider  # noqa: E402
from core.service import Gyroscope  # noqa: E402
from core.simulator import start_in_background  # noqa: E402


def _redis_url(tmp: Path) -> tuple[str, subprocess.Popen | None]:
    url = os.environ.get("GYROSCOPE_REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.3).ping()
        return url, None
    except redis.RedisError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("No Redis answers and redis-server is not installed (apt-get install redis-server).")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return url, proc
        except redis.RedisError:
            time.sleep(0.02)
    sys.exit("redis-server did not start")


def _pct(times: list[float], q: float) -> float:
    times = sorted(times)
    return times[min(len(times) - 1, int(len(times) * q))] * 1000.0


def _line(name: str, times: list[float]) -> str:
    return (f"  {name:<34} p50 {statistics.median(times) * 1000:7.3f} ms   p95 {_pct(times, .95):7.3f} ms"
            f"   p99 {_pct(times, .99):7.3f} ms")


def _service(tmp: Path, name: str, url: str | None, prefix: str, sim) -> Gyroscope:
    cfg = Config(provider="simulator", base_url=None, db_path=tmp / f"{name}.db", redis_url=url,
                 redis_prefix=prefix)
    gyro = Gyroscope(cfg, provider=SimulatorProvider(sim))
    gyro.settings.set("cache.max_entries", 1_000_000, actor="bench")
    return gyro


def lookups(gyro: Gyroscope, entries: int, n: int) -> tuple[list[float], list[float]]:
    body = "A plausible answer of a few sentences. " * 12
    keys = [cache_key(provider="simulator", base_url="simulator", model="gpt-4o-mini",
                      messages=[{"role": "user", "content": f"prompt {i}"}], max_tokens=256)
            for i in range(entries)]
    for k in keys:
        gyro.cache.put(k, provider="simulator", model="gpt-4o-mini", content=body, finish_reason="stop",
                       prompt_tokens=20, completion_tokens=120, cost=0.0001)
    gyro.db.flush()
    hits, misses = [], []
    for i in range(n):
        k = keys[(i * 7919) % entries]
        t = time.perf_counter()
        assert gyro.cache.get(k) is not None
        hits.append(time.perf_counter() - t)
    for i in range(n // 2):
        t = time.perf_counter()
        gyro.cache.get(f"missing-{i}")
        misses.append(time.perf_counter() - t)
    return hits, misses


def requests(gyro: Gyroscope, n: int) -> list[float]:
    req = lambda: GenerationRequest(prompt="Write a tagline for a bakery.", max_tokens=40, source="api")  # noqa: E731

    async def main() -> list[float]:
        await gyro.agenerate(req())           # the miss that fills the cache
        times = []
        for _ in range(n):
            t = time.perf_counter()
            result = await gyro.agenerate(req())
            times.append(time.perf_counter() - t)
            assert result.from_cache
        return times
    return asyncio.run(main())


CLIENT = """
import time
from openai import OpenAI
client = OpenAI(base_url="{url}", api_key="unused", max_retries=0)
ask = dict(model="gpt-4o-mini", max_tokens=40, messages=[{{"role": "user", "content": "Write a tagline for a bakery."}}])
client.chat.completions.create(**ask)
for _ in range({n}):
    t = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(**ask)
    took = time.perf_counter() - t
    assert raw.headers["x-gyroscope-cache"] == "hit"
    print(took, raw.headers["x-gyroscope-overhead-ms"])
"""


def over_http(gyro_env: dict, n: int) -> list[float]:
    """/v1/chat/completions answered from the Redis cache, timed at the OpenAI client."""
    import uvicorn

    from core import service
    from core.api import asgi_app
    old = {k: os.environ.get(k) for k in gyro_env}
    os.environ.update(gyro_env)
    service._default = None
    gyro = service.default_service()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(asgi_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    # The client runs in its own process: in this one it would share the GIL with the
    # server's thread and measure that contention (~50 ms a request here) instead.
    code = CLIENT.format(url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", n=n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pairs = [line.split() for line in out.stdout.splitlines()]
    times = [float(t) for t, _ in pairs]
    own = sorted(float(ms) for _, ms in pairs)
    print(f"  (the gateway's own time, x-gyroscope-overhead-ms: p50 {own[len(own) // 2]:.3f} ms)")
    server.should_exit = True
    thread.join(timeout=10)
    gyro.close()
    service._default = None
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--lookups", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    url, proc = _redis_url(tmp)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    sim = start_in_background()
    client = redis.Redis.from_url(url)
    try:
        info = client.info("server")
        print(f"Redis {info['redis_version']} at {redact_url(url)}; {args.entries:,} entries, "
              f"{args.lookups:,} lookups, {args.requests:,} requests per case")
        shared = _service(tmp, "redis", url, prefix, sim)
        local = _service(tmp, "sqlite", None, prefix, sim)
        r_hits, r_miss = lookups(shared, args.entries, args.lookups)
        s_hits, s_miss = lookups(local, args.entries, args.lookups)
        print("cache lookup (RedisCache.get / ResponseCache.get)")
        print(_line("Redis hit", r_hits))
        print(_line("Redis miss", r_miss))
        print(_line("SQLite hit", s_hits))
        print(_line("SQLite miss", s_miss))
        print("whole request answered from the cache (Gyroscope.agenerate, history row included)")
        print(_line("Redis-backed hit", requests(shared, args.requests)))
        print(_line("SQLite-backed hit", requests(local, args.requests)))
        shared.close()
        local.close()
        print("over HTTP: /v1/chat/completions from the OpenAI client (Helicone: 1.6 ms)")
        env = {"GYROSCOPE_DB": str(tmp / "http.db"), "GYROSCOPE_REDIS_URL": url,
               "GYROSCOPE_REDIS_PREFIX": prefix, "OPENAI_BASE_URL": sim.base_url,
               "OPENAI_API_KEY": "sk-bench"}
        print(_line("Redis-backed hit", over_http(env, args.requests)))
        env = {**env, "GYROSCOPE_DB": str(tmp / "http-sqlite.db"), "GYROSCOPE_REDIS_URL": ""}
        print(_line("SQLite-backed hit", over_http(env, args.requests)))
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        sim.stop()
        if proc is not None:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
