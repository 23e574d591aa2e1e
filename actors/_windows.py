"""Sliding-window logs: the bucket shape that can never over-admit against a provider.

Providers count the last 60 s (or quantize it to 1 s). A log of (time, amount) entries
that expire `window + margin` after they were granted admits exactly what a sliding
window admits, minus the margin that covers the grant-to-provider delay; a token bucket
with burst = limit would allow up to 2x the limit in one provider window.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Entry", "SlidingWindow"]


class Entry:
    """One admission in a window; `amount` can be corrected when the real usage is known."""

    __slots__ = ("amount", "expires_at")

    def __init__(self, expires_at: float, amount: int) -> None:
        self.expires_at = expires_at
        self.amount = amount


class SlidingWindow:
    """Sum of amounts admitted in the last `span_s` seconds, against `limit`."""

    __slots__ = ("_entries", "_used", "limit", "span_s")

    def __init__(self, limit: int, span_s: float) -> None:
        self.limit = limit
        self.span_s = span_s
        self._entries: deque[Entry] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0].expires_at <= now:
            self._used -= entries.popleft().amount

    def used(self, now: float) -> int:
        self._expire(now)
        return self._used

    def remaining(self, now: float) -> int:
        return max(0, self.limit - self.used(now))

    def fits(self, amount: int, now: float) -> bool:
        return self.used(now) + amount <= self.limit

    def add(self, amount: int, now: float) -> Entry:
        """Record an admission at `now` (callers check `fits` first)."""
        entry = Entry(now + self.span_s, amount)
        self._entries.append(entry)
        self._used += amount
        return entry

    def adjust(self, entry: Entry, amount: int, now: float) -> None:
        """Correct an entry to the real usage; a no-op once it has expired."""
        self._expire(now)
        if entry.expires_at > now:
            self._used += amount - entry.amount
            entry.amount = amount

    def free_at(self, amount: int, now: float) -> float | None:
        """Earliest time `amount` fits, assuming nothing else is added; None if never."""
        if amount > self.limit:
            return None
        excess = self.used(now) + amount - self.limit
        if excess <= 0:
            return now
        for entry in self._entries:
            excess -= entry.amount
            if excess <= 0:
                return entry.expires_at
        return now  # unreachable while the sum is kept consistent

    def reset_at(self, now: float) -> float:
        """When the window will be empty again (for `x-ratelimit-reset-*`-style status)."""
        self._expire(now)
        return self._entries[-1].expires_at if self._entries else now
