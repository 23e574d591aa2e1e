"""Latency histograms and outcome tallies kept in plain process memory, for `/metrics`.

Each process (a caller actor, the ingress) records its own figures here; the metrics
endpoint collects their `snapshot()`s and sums them, so nothing here knows Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any, Final

from topics.errors import QuotaflowError

__all__ = [
    "LATENCY_BOUNDS_MS",
    "Histogram",
    "LatencySet",
    "Tally",
    "merge_histograms",
]

# Upper bounds (ms, inclusive, as Prometheus' `le`) of the latency buckets: from the
# gateway's own overhead (a few ms) to a long reasoning stream (minutes). +Inf follows.
LATENCY_BOUNDS_MS: Final[tuple[float, ...]] = (
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    120_000.0,
    300_000.0,
)


class Histogram:
    """Counts of observations (ms) per bucket, their sum and count; mergeable by summing."""

    __slots__ = ("_counts", "bounds", "count", "sum_ms")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> None:
        if not bounds or any(b >= c for b, c in pairwise(bounds)):
            raise QuotaflowError(f"histogram bounds {tuple(bounds)!r} must increase strictly")
        self.bounds = tuple(float(b) for b in bounds)
        # One count per bound, then the +Inf bucket; not cumulative here.
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum_ms = 0.0
        self.count = 0

    def observe(self, ms: float) -> None:
        # The first bound >= ms: the bucket `le` that first holds the observation.
        self._counts[bisect_left(self.bounds, ms)] += 1
        self.sum_ms += ms
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """`cumulative[i]`: observations <= `bounds_ms[i]`; the last one (+Inf) is `count`."""
        cumulative: list[int] = []
        running = 0
        for n in self._counts:
            running += n
            cumulative.append(running)
        return {
            "bounds_ms": list(self.bounds),
            "cumulative": cumulative,
            "sum_ms": self.sum_ms,
            "count": self.count,
        }


def merge_histograms(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Sum `Histogram.snapshot()`s taken with the same bounds (None for none)."""
    merged: dict[str, Any] | None = None
    for snap in snapshots:
        if merged is None:
            merged = {
                "bounds_ms": list(snap["bounds_ms"]),
                "cumulative": list(snap["cumulative"]),
                "sum_ms": float(snap["sum_ms"]),
                "count": int(snap["count"]),
            }
            continue
        if list(snap["bounds_ms"]) != merged["bounds_ms"]:
            raise QuotaflowError(
                f"histogram bounds_ms {snap['bounds_ms']!r} differ from {merged['bounds_ms']!r}: "
                "every process must use the same bounds"
            )
        merged["cumulative"] = [
            a + b for a, b in zip(merged["cumulative"], snap["cumulative"], strict=True)
        ]
        merged["sum_ms"] += float(snap["sum_ms"])
        merged["count"] += int(snap["count"])
    return merged


class LatencySet:
    """The latency histograms of one public model's successful upstream requests."""

    __slots__ = ("overhead", "queued", "total", "ttft")

    def __init__(self) -> None:
        self.queued = Histogram()
        self.ttft = Histogram()
        self.total = Histogram()
        # Our time to first token minus the upstream's own (see README, "Metrics").
        self.overhead = Histogram()

    def observe(
        self,
        *,
        queued_ms: float,
        ttft_ms: float | None,
        total_ms: float,
        upstream_ttft_ms: float | None,
    ) -> None:
        self.queued.observe(queued_ms)
        self.total.observe(total_ms)
        if ttft_ms is not None:
            self.ttft.observe(ttft_ms)
            if upstream_ttft_ms is not None:
                # Clamped: with the ingress and the caller on different hosts, clock skew
                # can make the difference of their wall clocks negative.
                self.overhead.observe(max(0.0, ttft_ms - upstream_ttft_ms))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            "queued": self.queued.snapshot(),
            "ttft": self.ttft.snapshot(),
            "total": self.total.snapshot(),
            "overhead": self.overhead.snapshot(),
        }


class Tally:
    """Counts keyed by a tuple of label values (e.g. status and model)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str, n: int = 1) -> None:
        self._counts[labels] = self._counts.get(labels, 0) + n

    def get(self, *labels: str) -> int:
        return self._counts.get(labels, 0)

    def rows(self) -> list[tuple[tuple[str, ...], int]]:
        """`(labels, count)` pairs; safe to call from another thread (the dict is copied
        in one step under the GIL)."""
        return list(self._counts.copy().items())

    def __structlog__(self) -> dict[str, int]:
        """How structlog's JSON renderer shows it (e.g. in `gateway_stopped`)."""
        return {"/".join(k): v for k, v in self._counts.copy().items()}
