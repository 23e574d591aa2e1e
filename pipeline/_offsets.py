"""Which offsets are safe to commit: only up to the oldest request not yet answered."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["OffsetTracker"]

TP = TypeVar("TP", bound=Hashable)


class OffsetTracker(Generic[TP]):
    """Per partition: offsets in flight and the next offset after the last one seen.

    The committable offset of a partition is its oldest in-flight offset, or one past the
    last seen when nothing is in flight, so a crash re-delivers every unanswered request.
    """

    def __init__(self) -> None:
        self._in_flight: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}

    def add(self, tp: TP, offset: int) -> None:
        self._in_flight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        pending = self._in_flight.get(tp)
        if pending is not None:
            pending.discard(offset)

    def forget(self, tp: TP) -> None:
        """The partition was revoked: its offsets are no longer ours to commit."""
        self._in_flight.pop(tp, None)
        self._next.pop(tp, None)
        self._committed.pop(tp, None)

    def committable(self) -> dict[TP, int]:
        """Offsets that moved since the last `mark_committed`."""
        out: dict[TP, int] = {}
        for tp, nxt in self._next.items():
            pending = self._in_flight.get(tp)
            offset = min(pending) if pending else nxt
            if self._committed.get(tp) != offset:
                out[tp] = offset
        return out

    def mark_committed(self, offsets: dict[TP, int]) -> None:
        self._committed.update(offsets)

    def in_flight(self) -> int:
        return sum(len(v) for v in self._in_flight.values())
