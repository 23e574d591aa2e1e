"""The messages on quotaflow's topics (CONTRACT.md), one frozen Struct each.

Replies are a tagged union on `type`; `chunk` and `completion` carry the OpenAI objects
as they came from upstream, so they stay plain JSON objects here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "CacheMode",
    "ChunkReply",
    "CompletionReply",
    "DoneReply",
    "ErrorBody",
    "ErrorReply",
    "Reply",
    "Request",
    "ResetReply",
    "Tier",
    "Timing",
    "TokenUsage",
    "Usage",
]

Tier = Literal["economy", "standard", "premium"]
CacheMode = Literal["default", "exact", "bypass"]
CacheResult = Literal["miss", "exact", "semantic"]


class Request(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A value on `llm.requests`. `request` is an OpenAI Chat Completions body."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    request: dict[str, Any]
    tenant: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "default"
    reply_to: Annotated[str, msgspec.Meta(min_length=1, max_length=249)] | None = None
    deadline_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 5
    tier: Tier | None = None
    task: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    cache: CacheMode = "default"
    metadata: dict[str, Any] | None = None
    # Extension: models whose worst-case cost (prompt estimate + max_tokens at the
    # deployment's prices) exceeds this are not used for the request.
    max_cost_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None


class _Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str
    seq: Annotated[int, msgspec.Meta(ge=0)]


class ChunkReply(_Reply, frozen=True, tag="chunk"):
    """Streamed output: an OpenAI `chat.completion.chunk` object (may hold several tokens)."""

    chunk: dict[str, Any]


class CompletionReply(_Reply, frozen=True, tag="completion"):
    """The whole answer for `stream: false`: an OpenAI `chat.completion` object."""

    completion: dict[str, Any]


class ResetReply(_Reply, frozen=True, tag="reset"):
    """Discard chunks received so far for this id: a retry or fallback restarted the stream."""

    reason: str


class TokenUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Timing(msgspec.Struct, frozen=True, kw_only=True):
    queued_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0


class DoneReply(_Reply, frozen=True, tag="done"):
    """Terminal success."""

    finish_reason: str | None
    usage: TokenUsage
    model: str
    deployment: str | None
    cache: CacheResult = "miss"
    attempts: int = 1
    cost_usd: float = 0.0
    timing: Timing = msgspec.field(default_factory=Timing)
    metadata: dict[str, Any] | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None


class ErrorReply(_Reply, frozen=True, tag="error"):
    """Terminal failure."""

    error: ErrorBody
    metadata: dict[str, Any] | None = None


Reply = ChunkReply | CompletionReply | ResetReply | DoneReply | ErrorReply


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """A value on `llm.usage`: one per finished request."""

    id: str
    tenant: str
    model: str | None
    deployment: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cache: CacheResult
    status: str
    ts_ms: int
