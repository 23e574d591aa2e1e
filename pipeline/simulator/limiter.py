"""Admission for one (key, model): RPM and TPM over sliding windows, as OpenAI enforces.

The 60 s window holds every admitted request (successful or not: failures count, as they
do at OpenAI). Requests refused with 429 never enter it, so a client retrying a refused
request spends nothing. With `quantize_per_second`, a 1 s window with a sixtieth of each
limit is checked too, as providers may enforce "60 RPM" as "1 per second".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from pipeline.simulator.durations import ceil_ms, format_go_duration
from pipeline.simulator.window import Clock, SlidingWindow, WindowEntry

__all__ = ["Limiter", "Rejection", "Ticket"]

MINUTE = 60.0
SECOND = 1.0


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was refused; `retry_after_ms` is None when waiting cannot help."""

    kind: Literal["requests", "tokens"]
    limit: int
    used: int
    requested: int
    retry_after_ms: int | None
    too_large: bool = False


@dataclass(slots=True)
class Ticket:
    """An admitted request's place in the windows, used to correct it on completion."""

    charged: int
    entry_minute: WindowEntry
    entry_second: WindowEntry | None
    finished: bool = False


class Limiter:
    """RPM/TPM admission for one (key, model); a None limit means unlimited."""

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        quantize_per_second: bool = False,
        adjust_on_completion: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.adjust_on_completion = adjust_on_completion
        self.clock = clock
        self.minute = SlidingWindow(MINUTE, clock)
        self.second = SlidingWindow(SECOND, clock) if quantize_per_second else None
        # Per-second capacities when quantized: a sixtieth of the per-minute limit.
        self.rps = math.ceil(rpm / 60) if rpm is not None else None
        self.tps = math.ceil(tpm / 60) if tpm is not None else None
        self.max_requests_in_any_60s = 0
        self.max_tokens_in_any_60s = 0

    @property
    def limited(self) -> bool:
        """Whether any limit applies (and so x-ratelimit headers are sent)."""
        return self.rpm is not None or self.tpm is not None

    def _expire(self) -> float:
        now = self.minute.expire()
        if self.second is not None:
            self.second.expire(now)
        return now

    def try_admit(self, tokens: int) -> Ticket | Rejection:
        """Admit a request charging `tokens`, or say why not and for how long."""
        now = self._expire()
        minute, second = self.minute, self.second
        if self.tpm is not None and tokens > self.tpm:
            return Rejection("tokens", self.tpm, minute.tokens, tokens, None, too_large=True)
        wait_req = 0.0
        wait_tok = 0.0
        if self.rpm is not None:
            wait_req = minute.wait_for_requests(self.rpm, 1, now)
            if second is not None and self.rps is not None:
                wait_req = max(wait_req, second.wait_for_requests(self.rps, 1, now))
        if self.tpm is not None:
            wait_tok = minute.wait_for_tokens(self.tpm, tokens, now)
            if second is not None and self.tps is not None:
                # Bigger than a second's share: admitted only into an empty 1 s window.
                wait_tok = max(wait_tok, second.wait_for_tokens(self.tps, tokens, now))
        if wait_req > 0 or wait_tok > 0:
            if wait_req >= wait_tok and self.rpm is not None:
                kind: Literal["requests", "tokens"] = "requests"
                limit, used, requested = self.rpm, minute.requests, 1
            else:
                assert self.tpm is not None
                kind, limit, used, requested = "tokens", self.tpm, minute.tokens, tokens
            wait_ms = max(1, ceil_ms(max(wait_req, wait_tok)))
            return Rejection(kind, limit, used, requested, wait_ms)
        entry = minute.add(tokens, now)
        entry_s = second.add(tokens, now) if second is not None else None
        self.max_requests_in_any_60s = max(self.max_requests_in_any_60s, minute.requests)
        self.max_tokens_in_any_60s = max(self.max_tokens_in_any_60s, minute.tokens)
        return Ticket(tokens, entry, entry_s)

    def finish(self, ticket: Ticket, actual_tokens: int) -> int:
        """Correct a finished request's charge to `actual_tokens`; returns tokens refunded."""
        if ticket.finished or not self.adjust_on_completion:
            ticket.finished = True
            return 0
        ticket.finished = True
        self.minute.adjust(ticket.entry_minute, actual_tokens)
        if ticket.entry_second is not None and self.second is not None:
            self.second.adjust(ticket.entry_second, actual_tokens)
        return ticket.charged - actual_tokens

    def occupancy(self) -> tuple[int, int]:
        """(requests, tokens) in the 60 s window now."""
        self._expire()
        return self.minute.requests, self.minute.tokens

    def reset_max(self) -> None:
        """Forget the observed maxima (the windows themselves are kept)."""
        self.max_requests_in_any_60s = 0
        self.max_tokens_in_any_60s = 0

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the current state (empty when unlimited).

        `reset` is the time until the window is back to its initial (empty) state, as
        OpenAI documents it; only the configured dimensions are reported.
        """
        if not self.limited:
            return {}
        now = self._expire()
        reset = format_go_duration(ceil_ms(self.minute.wait_until_empty(now)))
        out: dict[str, str] = {}
        if self.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(self.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.rpm - self.minute.requests))
            out["x-ratelimit-reset-requests"] = reset
        if self.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.tpm - self.minute.tokens))
            out["x-ratelimit-reset-tokens"] = reset
        return out
