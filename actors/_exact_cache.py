"""The exact-match store of one cache shard: bounded LRU with a TTL per model, and replay.

Keys and eligibility are in `actors._cache_keys` (re-exported here). Entries expire
`cache.ttl_s_by_model[model]` (else `cache.ttl_s`) seconds after they were stored; a
shard holds at most `max_entries` entries and `max_bytes` bytes, and the least recently
used entry goes first when a new one does not fit. Only answers a replay reproduces are
stored (`storable`): text content with a final finish reason, no tool calls.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Literal

from actors._cache_keys import cache_key, cacheable
from actors._messages import CacheEntry
from actors._replies import ReplyStream
from topics.config import CacheConfig
from topics.wire import Request, Timing

__all__ = ["CacheKind", "DropReason", "ExactCache", "cache_key", "cacheable", "replay", "storable"]

CacheKind = Literal["exact", "semantic"]
DropReason = Literal["evicted", "expired"]
# Finish reasons whose answer is not (only) the text: a replay of the text would be wrong.
_NOT_REPLAYABLE: Final = frozenset({"tool_calls", "function_call"})


def storable(entry: CacheEntry) -> bool:
    """Is `entry` an answer a replay reproduces (text content, final, no tool calls)?"""
    return (
        not entry.failed
        and bool(entry.text)
        and entry.finish_reason is not None
        and entry.finish_reason not in _NOT_REPLAYABLE
    )


class ExactCache:
    """Bounded by entries and bytes; least recently used goes first; entries expire by TTL.

    `on_drop(key, reason)` hears of every entry forgotten other than by being replaced
    (the shard removes it from the semantic index and tombstones it on the topic).
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_drop: Callable[[str, DropReason], None] | None = None,
    ) -> None:
        self._ttl = config.ttl_s
        self._ttl_by_model = dict(config.ttl_s_by_model)
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        self._clock = clock
        self._on_drop = on_drop
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def ttl_s(self, model: str) -> float:
        return self._ttl_by_model.get(model, self._ttl)

    def expired(self, entry: CacheEntry) -> bool:
        return self._clock() - entry.stored_at > self.ttl_s(entry.model)

    def get(self, key: str, *, count: bool = True) -> CacheEntry | None:
        """The live entry for `key` (now the most recently used), or None.

        `count=False`: a second look within one lookup, not counted as a hit or miss."""
        entry = self._entries.get(key)
        if entry is not None and self.expired(entry):
            self._forget(key, "expired")
            entry = None
        if entry is None:
            self.misses += count
            return None
        self._entries.move_to_end(key)
        self.hits += count
        return entry

    def put(self, entry: CacheEntry) -> bool:
        """Store `entry` (replacing one with its key); False if it can never fit.
        Evicts least recently used entries until the bounds hold."""
        if entry.size_bytes > self._max_bytes:
            return False
        if entry.key in self._entries:
            self._drop(entry.key)
        self._entries[entry.key] = entry
        self.bytes += entry.size_bytes
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            self._forget(next(iter(self._entries)), "evicted")
        return True

    def sweep(self) -> int:
        """Forget every expired entry now; returns how many."""
        gone = [k for k, e in self._entries.items() if self.expired(e)]
        for k in gone:
            self._forget(k, "expired")
        return len(gone)

    def entries(self) -> list[CacheEntry]:
        """Every entry held, least recently used first."""
        return list(self._entries.values())

    def _forget(self, key: str, reason: DropReason) -> None:
        self._drop(key)
        if reason == "evicted":
            self.evictions += 1
        else:
            self.expirations += 1
        if self._on_drop is not None:
            self._on_drop(key, reason)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size_bytes

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
        }


async def replay(
    entry: CacheEntry,
    request: Request,
    out: ReplyStream,
    *,
    received_ms: float,
    kind: CacheKind = "exact",
) -> None:
    """Answer `request` from `entry` as a fresh call would: chunks (the whole text in one,
    then the finish reason, then usage if `stream_options.include_usage`) or a completion,
    then `done` with `cache` = `kind`, no deployment, no attempt and no cost."""
    created = int(entry.stored_at)
    rid = f"chatcmpl-cache-{entry.key[:24]}"
    usage = {
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
        "total_tokens": entry.prompt_tokens + entry.completion_tokens,
    }
    body = request.request
    if body.get("stream"):
        base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": entry.upstream_model,
        }
        await out.chunk(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": entry.text},
                        "finish_reason": None,
                    }
                ],
            }
        )
        first_ms = time.time() * 1000.0
        await out.chunk(
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": entry.finish_reason}]}
        )
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await out.chunk({**base, "choices": [], "usage": usage})
    else:
        await out.completion(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": entry.upstream_model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": entry.text},
                        "finish_reason": entry.finish_reason,
                    }
                ],
                "usage": usage,
            }
        )
        first_ms = time.time() * 1000.0
    now_ms = time.time() * 1000.0
    await out.done(
        finish_reason=entry.finish_reason,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        model=entry.model,
        deployment=None,
        cache=kind,
        attempts=0,
        cost=0.0,
        timing=Timing(
            queued_ms=0.0,
            ttft_ms=round(first_ms - received_ms, 3),
            total_ms=round(now_ms - received_ms, 3),
        ),
        metadata=request.metadata,
    )
