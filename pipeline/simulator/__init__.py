"""An OpenAI-compatible provider simulator that enforces limits the way OpenAI does.

It charges prompts with `topics.tokens.estimate_prompt_tokens` (as the gateway reserves),
keeps RPM/TPM over sliding 60 s windows per (key, model), answers 429s in OpenAI's exact
shape with its headers, injects seeded faults and writes deterministic completions, so
the gateway can be tested end to end without a real provider.
"""

from __future__ import annotations

from pipeline.simulator.durations import format_go_duration
from pipeline.simulator.limiter import Limiter, Rejection, Ticket
from pipeline.simulator.run import run_simulator
from pipeline.simulator.server import Simulator
from pipeline.simulator.text import completion_tokens_for, expected_text, finish_reason_for
from pipeline.simulator.window import SlidingWindow

__all__ = [
    "Limiter",
    "Rejection",
    "Simulator",
    "SlidingWindow",
    "Ticket",
    "completion_tokens_for",
    "expected_text",
    "finish_reason_for",
    "format_go_duration",
    "run_simulator",
]
