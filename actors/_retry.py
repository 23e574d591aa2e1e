"""When the gateway retries an upstream call: what can succeed, and after how long.

Exponential backoff with full jitter (AWS's "Exponential Backoff And Jitter"): retry n
waits uniformly in [0, min(max_backoff, base * 2**(n-1))], so retries of many requests
failing together spread out instead of returning in lockstep. A provider's own wait
(`retry-after-ms`, `retry-after`) is a floor on that wait; one longer than
`max_retry_after_ms` is not worth holding the request for.
"""

from __future__ import annotations

import random
from typing import Final

from topics.config import RetryConfig

__all__ = ["RETRYABLE_STATUS", "backoff_ms", "retry_delay_ms", "retryable_status"]

# 408 timeout, 409 conflict, 429 rate limit, 5xx server errors (529: Anthropic overloaded).
RETRYABLE_STATUS: Final = frozenset({408, 409, 429})


def retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def backoff_ms(attempt: int, cfg: RetryConfig, rng: random.Random | None = None) -> int:
    """Full-jitter wait before the retry that follows failed attempt `attempt` (1-based)."""
    cap = min(cfg.max_backoff_ms, cfg.base_backoff_ms * 2 ** max(0, attempt - 1))
    return int((rng or random).uniform(0, cap))


def retry_delay_ms(
    attempt: int,
    cfg: RetryConfig,
    *,
    retry_after_ms: int | None,
    rng: random.Random | None = None,
) -> int | None:
    """Wait before retrying after failed attempt `attempt`, or None when no retry is due.

    None when the attempt budget is spent or the provider asks for a longer wait than
    `max_retry_after_ms`.
    """
    if attempt >= cfg.max_attempts:
        return None
    if retry_after_ms is not None and retry_after_ms > cfg.max_retry_after_ms:
        return None
    return max(retry_after_ms or 0, backoff_ms(attempt, cfg, rng))
