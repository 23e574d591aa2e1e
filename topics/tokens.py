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
    "PromptCounter",
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


class PromptCounter:
    """Prompt tokens for reservations: a real tokenizer where one is installed for the
    model family, never less than the character estimate.

    OpenAI admits by a character-count estimate, so the estimate stays a floor; the
    tokenizer raises the count where characters undercount (CJK text, code). The
    tokenizer comes from the optional `bpe-openai` package (vocabularies embedded,
    nothing downloaded): `pip install 'quotaflow[tokenizers]'`. Without it, or for other
    families, the count is the estimate.
    """

    def __init__(self, upstream_models: Iterable[str]) -> None:
        self._encoders: dict[str, Any] = {}
        try:
            import bpe_openai  # optional extra; large, so imported only when wanted
        except ImportError:
            return
        for model in set(upstream_models):
            try:
                self._encoders[model] = bpe_openai.encoding_for_model(model)
            except Exception:  # noqa: BLE001 - not an OpenAI family: the estimate serves
                continue

    @property
    def models_with_tokenizer(self) -> list[str]:
        return sorted(self._encoders)

    def count(self, messages: list[Mapping[str, Any]], upstream_models: Iterable[str]) -> int:
        """Tokens to reserve for `messages` on any of `upstream_models`."""
        best = estimate_prompt_tokens(messages)
        for model in upstream_models:
            enc = self._encoders.get(model)
            if enc is None:
                continue
            tokens = REPLY_PRIMING_TOKENS
            for msg in messages:
                content = msg.get("content")
                if isinstance(content, list):
                    content = " ".join(
                        str(p.get("text", "")) for p in content if isinstance(p, Mapping)
                    )
                text = (content if isinstance(content, str) else "") + str(
                    msg.get("name", "") or ""
                )
                tokens += MESSAGE_OVERHEAD_TOKENS + len(enc.encode(text))
            best = max(best, tokens)
        return best
