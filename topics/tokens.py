"""Prompt token estimate shared by the quota actor and the provider simulator.

Both sides must count the same way: the gateway reserves `estimate + max_tokens` and the
simulator charges the same at admission, as OpenAI does. The estimate is deliberately
an over-count (4 characters a token, rounded up, plus per-message framing), so a
reservation is never smaller than what the provider charges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = [
    "CHARS_PER_TOKEN",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "estimate_prompt_tokens",
]

CHARS_PER_TOKEN: Final = 4
# OpenAI's chat format spends ~3 tokens framing each message and 3 priming the reply.
MESSAGE_OVERHEAD_TOKENS: Final = 3
REPLY_PRIMING_TOKENS: Final = 3


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        total = 0
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
        return total
    return 0


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Upper-leaning estimate of the prompt tokens of a Chat Completions `messages` list."""
    tokens = REPLY_PRIMING_TOKENS
    for msg in messages:
        chars = _text_len(msg.get("content")) + len(str(msg.get("name", "") or ""))
        tokens += MESSAGE_OVERHEAD_TOKENS + -(-chars // CHARS_PER_TOKEN)
    return tokens
