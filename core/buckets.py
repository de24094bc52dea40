"""Local days and hours of a time zone (DST-correct) as SQL buckets, and their aggregates."""

from __future__ import annotations

import bisect
import datetime as dt
import math
from typing import Any
from zoneinfo import ZoneInfo

from .errors import InvalidParameter


def _offset_segments(tz: str, start: float, end: float) -> list[tuple[float, int]]:
    """[(from_ts, utc_offset_s)] covering start..end, one entry per offset change.

    A change is found to the exact second (zones change offset on whole seconds), so the
    hour that starts at a DST change is wholly on its new side.
    """
    zone = ZoneInfo(tz)

    def offset(ts: float) -> int:
        return int(dt.datetime.fromtimestamp(ts, zone).utcoffset().total_seconds())

    segments = [(start, offset(start))]
    step = 6 * 3600
    t = math.floor(start)
    while t < end:
        nxt = min(t + step, math.ceil(end))
        if offset(nxt) != segments[-1][1]:
            lo, hi = t, nxt  # whole seconds: offset(lo) is the old one, offset(hi) the new
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if offset(mid) == segments[-1][1]:
                    lo = mid
                else:
                    hi = mid
            segments.append((hi, offset(hi)))
        t = nxt
    return segments


class _Buckets:
    """Local days or hours of ``tz`` over start..end: their SQL, numbers and UTC extents."""

    def __init__(self, unit: str, tz: str, start: float, end: float) -> None:
        self.size = {"day": 86400, "hour": 3600}.get(unit)
        if self.size is None:
            raise InvalidParameter("unit must be 'day' or 'hour'.")
        self.unit, self.start, self.end = unit, start, end
        self.segments = _offset_segments(tz, start, end)

    def sql(self, col: str = "ts") -> tuple[str, list[Any]]:
        """SQL for the bucket number of ``col``, and its params."""
        offset, params = self.offset_sql(col)
        return f"CAST(({col} + {offset}) / {self.size} AS INTEGER)", params

    def offset_sql(self, col: str = "ts") -> tuple[str, list[Any]]:
        """SQL for the zone's UTC offset at ``col`` (one per offset segment), and its params."""
        segments = self.segments
        if len(segments) == 1:
            return "?", [segments[0][1]]
        case, params = "CASE", []
        for (_, off), (nxt, _) in zip(segments, segments[1:]):
            case += f" WHEN {col} < ? THEN ?"
            params += [nxt, off]
        case += " ELSE ? END"
        params.append(segments[-1][1])
        return f"({case})", params

    def number(self, ts: float) -> int:
        """The bucket number of ``ts`` (what ``sql()`` computes)."""
        i = bisect.bisect_right([s for s, _ in self.segments], ts) - 1
        return int((ts + self.segments[max(i, 0)][1]) // self.size)

    def cuts(self) -> list[float]:
        """Every instant strictly inside start..end where the bucket may change."""
        cuts = set()
        bounds = [s for s, _ in self.segments[1:]] + [self.end]
        for (frm, off), upto in zip(self.segments, bounds):
            cuts.add(frm)
            k = math.ceil((frm + off) / self.size)
            while k * self.size - off < upto:
                cuts.add(k * self.size - off)
                k += 1
        return sorted(c for c in cuts if self.start < c < self.end)

    def extents(self) -> list[tuple[int, list[tuple[float, float]]]]:
        """[(bucket number, [(from_ts, to_ts), ...])] in bucket order; a bucket has two
        extents when a DST change repeats its local hour."""
        points = [self.start, *self.cuts(), self.end]
        out: dict[int, list[tuple[float, float]]] = {}
        for lo, hi in zip(points, points[1:]):
            ranges = out.setdefault(self.number(lo), [])
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        return sorted(out.items())


def _ranges_sql(col: str, ranges: list[tuple[float, float]]) -> tuple[str, list[Any]]:
    """``(col >= ? AND col < ?) OR ...`` for half-open ranges."""
    params: list[Any] = []
    for lo, hi in ranges:
        params += [lo, hi]
    return "(" + " OR ".join(f"({col} >= ? AND {col} < ?)" for _ in ranges) + ")", params


def nearest_rank(values: list[float], p: float) -> float | None:
    """The nearest-rank p-th percentile (p in 0..100) of sorted values, as SQL `percentile`."""
    if not values:
        return None
    return values[max(1, math.ceil(p / 100.0 * len(values))) - 1]


class _AnsweredStats:
    """SQL aggregate ``answered_stats(latency_ms, ttft_ms)``: 'p50,p95,ttft_p50' (repr)."""

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.ttft: list[float] = []

    def step(self, latency: float | None, ttft: float | None) -> None:
        if latency is not None:
            self.latency.append(latency)
        if ttft is not None:
            self.ttft.append(ttft)

    def finalize(self) -> str:
        self.latency.sort()
        self.ttft.sort()
        found = (nearest_rank(self.latency, 50), nearest_rank(self.latency, 95),
                 nearest_rank(self.ttft, 50))
        return ",".join("" if v is None else repr(v) for v in found)


def _floats(text: str) -> list[float | None]:
    return [float(v) if v else None for v in text.split(",")]


def bucket_label(unit: str, number: int) -> str:
    """The local date ('2026-11-25') or hour ('2026-11-25 14:00') of a bucket number."""
    epoch = dt.datetime(1970, 1, 1)
    if unit == "day":
        return (epoch + dt.timedelta(days=number)).date().isoformat()
    return (epoch + dt.timedelta(hours=number)).strftime("%Y-%m-%d %H:00")
