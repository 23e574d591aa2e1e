"""Counters behind `GET /stats`: totals, and per (key, model) lane with window maxima.

`max_requests_in_any_60s` / `max_tokens_in_any_60s` are the highest sliding-window
occupancies seen at any admission, so a test can prove no minute went over a limit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.simulator.limiter import Limiter

__all__ = ["Lane", "Totals"]


@dataclass(slots=True)
class Lane:
    """One (key, model): its limiter and counters. Keys are named by `api_key_env`."""

    key: str
    model: str
    limiter: Limiter
    admitted: int = 0
    tokens_charged: int = 0
    tokens_refunded: int = 0
    rejected_429: int = 0
    in_flight: int = 0

    @property
    def name(self) -> str:
        """`KEY_ENV/model`, the lane's name in /stats."""
        return f"{self.key}/{self.model}"

    def reset(self) -> None:
        """Clear counters and maxima; the window and in-flight count are kept."""
        self.admitted = self.tokens_charged = self.tokens_refunded = self.rejected_429 = 0
        self.limiter.reset_max()

    def snapshot(self) -> dict[str, Any]:
        """The lane's /stats entry."""
        requests, tokens = self.limiter.occupancy()
        return {
            "key": self.key,
            "model": self.model,
            "rpm": self.limiter.rpm,
            "tpm": self.limiter.tpm,
            "admitted": self.admitted,
            "tokens_charged": self.tokens_charged,
            "tokens_refunded": self.tokens_refunded,
            "rejected_429": self.rejected_429,
            "in_flight": self.in_flight,
            "requests": requests,
            "tokens": tokens,
            "max_requests_in_any_60s": self.limiter.max_requests_in_any_60s,
            "max_tokens_in_any_60s": self.limiter.max_tokens_in_any_60s,
        }


@dataclass(slots=True)
class Totals:
    """Counters over every chat completion request."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    rate_limited_429: int = 0
    insufficient_quota_429: int = 0
    too_large_429: int = 0
    dropped: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        """Zero every counter."""
        self.requests = self.rate_limited_429 = self.insufficient_quota_429 = 0
        self.too_large_429 = self.dropped = 0
        self.by_status.clear()
        self.faults.clear()

    def snapshot(self) -> dict[str, Any]:
        """The totals part of /stats (status codes as string keys, as JSON needs)."""
        return {
            "requests": self.requests,
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "rate_limited_429": self.rate_limited_429,
            "insufficient_quota_429": self.insufficient_quota_429,
            "too_large_429": self.too_large_429,
            "dropped": self.dropped,
            "faults": dict(sorted(self.faults.items())),
        }
