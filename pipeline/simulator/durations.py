"""Go-style duration strings, as OpenAI writes them in `x-ratelimit-reset-*` headers.

OpenAI's servers format durations with Go's `time.Duration.String()` (`1s`, `6m0s`,
`120ms`, `9.816s`); clients parse that form, so the simulator writes the same.
"""

from __future__ import annotations

import math

__all__ = ["ceil_ms", "format_go_duration"]


def ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (a wait told to a client must never be too short)."""
    if seconds <= 0:
        return 0
    # Round away float noise first so 0.644 s is 644 ms, not 645.
    return math.ceil(round(seconds * 1000.0, 6))


def format_go_duration(ms: int) -> str:
    """Format a non-negative millisecond count the way Go's Duration.String() does."""
    if ms < 0:
        raise ValueError(f"duration must be non-negative, got {ms} ms")
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    sec_text = str(secs) if frac == 0 else f"{secs}.{frac:03d}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"
