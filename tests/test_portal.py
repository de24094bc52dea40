"""The event loops Gyroscope owns (core/portal.py): uvloop's when it is installed, asyncio's
when GYROSCOPE_UVLOOP=0 or uvloop cannot be imported; the same coroutine runs on each."""

from __future__ import annotations

import asyncio
import sys

import pytest

from core import portal


async def _answer() -> str:
    await asyncio.sleep(0.001)
    fut = asyncio.get_running_loop().run_in_executor(None, lambda: "from a thread")
    return await fut


def _run_on(loop: asyncio.AbstractEventLoop) -> str:
    try:
        return loop.run_until_complete(_answer())
    finally:
        loop.close()


def test_owned_loops_are_uvloop_when_installed(monkeypatch):
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("GYROSCOPE_UVLOOP", raising=False)
    loop = portal.new_loop()
    assert isinstance(loop, uvloop.Loop)
    assert _run_on(loop) == "from a thread"
    # The portal's loop (batch jobs, the page's streams) is one of them.
    assert isinstance(portal.loop(), uvloop.Loop)
    assert portal.run(_answer(), timeout=10) == "from a thread"


def test_gyroscope_uvloop_0_keeps_asyncio_loop(monkeypatch):
    monkeypatch.setenv("GYROSCOPE_UVLOOP", "0")
    loop = portal.new_loop()
    assert type(loop).__module__.startswith("asyncio")
    assert _run_on(loop) == "from a thread"


def test_without_uvloop_asyncio_loop_is_used(monkeypatch):
    monkeypatch.delenv("GYROSCOPE_UVLOOP", raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)      # as if it were not installed
    loop = portal.new_loop()
    assert type(loop).__module__.startswith("asyncio")
    assert _run_on(loop) == "from a thread"
