"""The simulator's deterministic completions: text, length and finish reason.

A test (or the gateway's own checks) can compute exactly what the simulator will answer
for a request, so reassembled streams and cached replies can be compared byte for byte.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from topics.config import SimulatorConfig

__all__ = ["VOCABULARY", "completion_tokens_for", "expected_text", "finish_reason_for"]

# Each completion "token" is one of these words; small and fixed so text is reproducible.
VOCABULARY: Final[tuple[str, ...]] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "quota", "flow", "token", "window", "limit", "stream",
)  # fmt: skip


def _seed(model: str, messages: Sequence[Any]) -> int:
    """A stable seed from the model and messages (hashlib, so it survives restarts)."""
    digest = hashlib.sha256()
    digest.update(model.encode())
    digest.update(b"\x00")
    digest.update(msgspec.json.encode(messages, order="sorted"))
    return int.from_bytes(digest.digest()[:8], "big")


def expected_text(model: str, messages: Sequence[dict[str, Any]], n_tokens: int) -> str:
    """The completion text the simulator answers with: `n_tokens` words, space-joined."""
    if n_tokens <= 0:
        return ""
    rng = random.Random(_seed(model, messages))
    return " ".join(rng.choice(VOCABULARY) for _ in range(n_tokens))


def token_pieces(model: str, messages: Sequence[dict[str, Any]], n_tokens: int) -> list[str]:
    """`expected_text` split into its stream deltas: the first word bare, the rest " word"."""
    words = expected_text(model, messages, n_tokens).split(" ") if n_tokens > 0 else []
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def completion_tokens_for(max_tokens: int | None, config: SimulatorConfig) -> int:
    """How many tokens a completion has: `output_tokens`, capped by the request's max."""
    if max_tokens is None:
        return config.output_tokens
    return min(max_tokens, config.output_tokens)


def finish_reason_for(max_tokens: int | None, config: SimulatorConfig) -> str:
    """The finish reason: `length` when max_tokens cut the answer, else `stop`."""
    if max_tokens is not None and max_tokens <= config.output_tokens:
        return "length"
    return "stop"
