"""Test support: an injected clock that tests advance instead of sleeping."""

from __future__ import annotations

import asyncio

from core.pipeline import Clock


class FakeClock:
    """Wall and monotonic time that only move when told (or when the code 'sleeps')."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleep_blocking(seconds)
        await asyncio.sleep(0)

    def sleep_blocking(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def as_clock(self) -> Clock:
        return Clock(time=self.time, monotonic=self.monotonic, sleep=self.sleep,
                     sleep_blocking=self.sleep_blocking)
