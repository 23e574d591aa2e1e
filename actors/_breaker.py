"""A circuit breaker per deployment: closed -> open -> half-open probes -> closed.

Closed: calls flow; the outcomes of the last `window_s` are kept. It opens after
`consecutive_failures` failures in a row, or when at least `min_calls` calls ended in the
window and `failure_ratio` of them failed. Open: no call for `open_s`. Half-open: at most
`half_open_probes` calls at once; that many successes in a row close it, one failure
opens it again. Plain class, no Ray: the quota book owns one per deployment.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from topics.config import BreakerConfig

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """The breaker of one deployment; times are the caller's monotonic seconds."""

    def __init__(self, config: BreakerConfig) -> None:
        self._cfg = config
        self._state: BreakerState = "closed"
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._failures_in_window = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened_total = 0

    def state(self, now: float) -> BreakerState:
        if self._state == "open" and now - self._opened_at >= self._cfg.open_s:
            self._state = "half_open"
            self._probes_in_flight = 0
            self._probe_successes = 0
        return self._state

    def open_until(self) -> float | None:
        return self._opened_at + self._cfg.open_s if self._state == "open" else None

    def allows(self, now: float) -> bool:
        """May a call start now? (Half-open: only while a probe slot is free.)"""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "open":
            return False
        return self._probes_in_flight < self._cfg.half_open_probes

    def started(self, now: float) -> None:
        """A call was granted; in half-open it takes a probe slot."""
        if self.state(now) == "half_open":
            self._probes_in_flight += 1

    def record(self, failed: bool, now: float, *, probe: bool) -> BreakerState:
        """A call ended. Returns the state after it."""
        state = self.state(now)
        if state == "half_open":
            if not probe:
                return state  # granted before the breaker opened: says nothing about now
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
            if failed:
                self._open(now)
            else:
                self._probe_successes += 1
                if self._probe_successes >= self._cfg.half_open_probes:
                    self._close()
            return self._state
        if state == "open":
            return state  # a call granted before the breaker opened; it changes nothing
        self._outcomes.append((now, failed))
        self._failures_in_window += failed
        self._consecutive = self._consecutive + 1 if failed else 0
        self._trim(now)
        n = len(self._outcomes)
        if self._consecutive >= self._cfg.consecutive_failures or (
            n >= self._cfg.min_calls and self._failures_in_window >= self._cfg.failure_ratio * n
        ):
            self._open(now)
        return self._state

    def release(self, now: float, *, probe: bool) -> None:
        """A granted call was not made (grant given back): free its probe slot."""
        if probe and self.state(now) == "half_open":
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def _trim(self, now: float) -> None:
        horizon = now - self._cfg.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, failed = self._outcomes.popleft()
            self._failures_in_window -= failed

    def _open(self, now: float) -> None:
        self._state = "open"
        self._opened_at = now
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened_total += 1

    def _close(self) -> None:
        self._state = "closed"
        self._outcomes.clear()
        self._failures_in_window = 0
        self._consecutive = 0

    def snapshot(self, now: float) -> dict[str, object]:
        self._trim(now)
        return {
            "state": self.state(now),
            "calls_in_window": len(self._outcomes),
            "failures_in_window": self._failures_in_window,
            "consecutive_failures": self._consecutive,
            "opened_total": self.opened_total,
        }
