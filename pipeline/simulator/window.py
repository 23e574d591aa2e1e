"""A sliding-window log of admissions: (admission time, tokens) entries over a horizon.

Providers count a request from the moment they admit it; a log (rather than a bucket)
lets the simulator say exactly when capacity comes back and prove no window went over.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["Clock", "SlidingWindow", "WindowEntry"]

Clock = Callable[[], float]


class WindowEntry:
    """One admission; `tokens` may be corrected later while the entry is still live."""

    __slots__ = ("live", "t", "tokens")

    def __init__(self, t: float, tokens: int) -> None:
        self.t = t
        self.tokens = tokens
        self.live = True


class SlidingWindow:
    """Entries admitted in the last `horizon` seconds, with their request and token sums.

    An entry admitted at `t` counts while `now < t + horizon`; at `t + horizon` it is gone.
    """

    def __init__(self, horizon: float, clock: Clock = time.monotonic) -> None:
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.horizon = horizon
        self.clock = clock
        self._entries: deque[WindowEntry] = deque()
        self._tokens = 0

    def expire(self, now: float | None = None) -> float:
        """Drop entries older than the horizon; returns the `now` used."""
        if now is None:
            now = self.clock()
        entries = self._entries
        cutoff = now - self.horizon
        while entries and entries[0].t <= cutoff:
            old = entries.popleft()
            old.live = False
            self._tokens -= old.tokens
        return now

    @property
    def requests(self) -> int:
        """Requests in the window as of the last `expire`."""
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens in the window as of the last `expire`."""
        return self._tokens

    def add(self, tokens: int, now: float) -> WindowEntry:
        """Record an admission at `now` (callers pass a `now` not before earlier ones)."""
        entry = WindowEntry(now, tokens)
        self._entries.append(entry)
        self._tokens += tokens
        return entry

    def adjust(self, entry: WindowEntry, tokens: int) -> None:
        """Correct an entry's tokens (no effect once it has left the window)."""
        if entry.live:
            self._tokens += tokens - entry.tokens
        entry.tokens = tokens

    def wait_for_requests(self, limit: int, wanted: int, now: float) -> float:
        """Seconds until `wanted` more requests fit under `limit` (0 if they fit now)."""
        excess = len(self._entries) + wanted - limit
        if excess <= 0:
            return 0.0
        if excess > len(self._entries):  # can never fit
            return float("inf")
        return max(0.0, self._entries[excess - 1].t + self.horizon - now)

    def wait_for_tokens(self, limit: int, wanted: int, now: float) -> float:
        """Seconds until `wanted` more tokens fit under `limit` (0 if they fit now).

        If `wanted` alone exceeds `limit`, it fits only in an empty window (the caller
        decides whether that is allowed at all).
        """
        if self._tokens + wanted <= limit:
            return 0.0
        if wanted > limit:
            return self.wait_until_empty(now)
        need = self._tokens + wanted - limit
        freed = 0
        for entry in self._entries:
            freed += entry.tokens
            if freed >= need:
                return max(0.0, entry.t + self.horizon - now)
        return self.wait_until_empty(now)  # pragma: no cover - sums are consistent

    def wait_until_empty(self, now: float) -> float:
        """Seconds until every current entry has left the window."""
        if not self._entries:
            return 0.0
        return max(0.0, self._entries[-1].t + self.horizon - now)

    def clear(self) -> None:
        """Forget every entry."""
        for entry in self._entries:
            entry.live = False
        self._entries.clear()
        self._tokens = 0
