"""How sync callers drive the async pipeline: with no event loop at all when its I/O is
blocking (``run_blocking``), else on an event loop of their own thread (no thread hop),
else on a shared background loop. And the other way round: how async code runs blocking
database work off its loop (``off_loop``)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Coroutine

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_log = logging.getLogger(__name__)


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a thread Gyroscope owns: uvloop's when it is installed (a batch
    row took ~6 % less CPU on it, median of 10 runs; see docs/benchmarks.md, batch
    throughput), else asyncio's. GYROSCOPE_UVLOOP=0 keeps asyncio's."""
    if os.environ.get("GYROSCOPE_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            try:
                return uvloop.new_event_loop()
            except Exception:  # noqa: BLE001 - a broken build must not stop the service
                _log.warning("uvloop is installed but its loop could not start; using asyncio's",
                             exc_info=True)
    return asyncio.new_event_loop()


def loop() -> asyncio.AbstractEventLoop:
    """The process's portal loop, started on first use in a daemon thread."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            new = new_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(new)
                new.call_soon(ready.set)
                new.run_forever()

            threading.Thread(target=main, name="gyroscope-portal", daemon=True).start()
            ready.wait()
            _loop = new
        return _loop


def submit(coro: Coroutine) -> Future:
    """Schedule a coroutine on the portal loop."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine, timeout: float | None = None) -> Any:
    """Run a coroutine on the portal loop and wait for its result."""
    return submit(coro).result(timeout)


def run_blocking(coro: Coroutine) -> Any:
    """Run a coroutine whose awaits never suspend (its I/O is blocking) on this thread,
    without an event loop: one ``send`` takes it to the end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_blocking: the coroutine waited for an event loop; use run_here")


_local = threading.local()


def run_here(coro: Coroutine) -> Any:
    """Run a coroutine to completion on this thread's own loop (kept for reuse, so its
    connections are too); from inside a running loop, fall back to the portal."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return run(coro)
    own = getattr(_local, "loop", None)
    if own is None or own.is_closed():
        own = _local.loop = new_loop()
    return own.run_until_complete(coro)


# Blocking database work called from an event loop (building the service, stats). Its own
# small pool, not the loop's default executor: calls stuck behind a locked file must not
# hold up what that executor does for the loop (name resolution of new connections).
_blocking = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gyroscope-off-loop")


async def off_loop(fn, *args: Any, timeout: float | None = None) -> Any:
    """Run blocking ``fn(*args)`` in a worker thread; TimeoutError after ``timeout`` s (the
    call itself runs on to its end in the thread)."""
    fut = asyncio.wrap_future(_blocking.submit(fn, *args))
    return await asyncio.wait_for(asyncio.shield(fut), timeout) if timeout else await fut
