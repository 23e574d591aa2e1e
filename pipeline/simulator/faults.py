"""Per-request fault decisions, drawn from one seeded PRNG so a run can be replayed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from topics.config import SimFaults

__all__ = ["FaultName", "FaultPlan", "Faults"]

FaultName = Literal["error_500", "error_503", "drop_mid_stream"]


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What goes wrong with one request: at most one failure, plus an optional delay."""

    failure: FaultName | None
    slow_extra_ms: int

    @property
    def name(self) -> str | None:
        """The fault to log: the failure, else "slow" if delayed, else None."""
        if self.failure is not None:
            return self.failure
        return "slow" if self.slow_extra_ms else None


class Faults:
    """Draws a FaultPlan per request; always four draws, so the sequence is stable."""

    def __init__(self, config: SimFaults) -> None:
        self.config = config
        self._rng = random.Random(config.seed)

    def draw(self) -> FaultPlan:
        """The plan for the next admitted request (500 before 503 before drop)."""
        cfg = self.config
        r500, r503, rdrop, rslow = (self._rng.random() for _ in range(4))
        failure: FaultName | None = None
        if r500 < cfg.error_500_rate:
            failure = "error_500"
        elif r503 < cfg.error_503_rate:
            failure = "error_503"
        elif rdrop < cfg.drop_mid_stream_rate:
            failure = "drop_mid_stream"
        slow = cfg.slow_extra_ms if rslow < cfg.slow_rate else 0
        return FaultPlan(failure, slow)
