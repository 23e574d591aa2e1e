"""Exact-match response cache: canonical request hash, eligibility policy, bounded LRU + TTL.

The key hashes everything in the body that can change the answer (all fields but the
transport ones in `_NOT_IN_KEY`) plus the resolved public model and the tenant, so one
tenant's answers are never served to another. Only requests at or below
`cache.max_temperature` are stored: a sampled answer replayed would hide the variation
the client asked for.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import msgspec

from actors._messages import CacheEntry
from actors._replies import ReplyStream
from topics.config import CacheConfig
from topics.wire import Request, Timing

__all__ = ["ExactCache", "cache_key", "cacheable", "replay"]

# Fields that shape delivery, not the answer.
_NOT_IN_KEY: Final = frozenset({"stream", "stream_options", "user", "metadata", "store", "model"})
_CANON: Final = msgspec.json.Encoder(order="sorted")
# OpenAI's default when a request omits temperature.
_DEFAULT_TEMPERATURE: Final = 1.0


def cacheable(request: Request, config: CacheConfig) -> bool:
    """May this request be looked up in and stored to the exact cache?"""
    if not config.enabled or request.cache == "bypass":
        return False
    body = request.request
    temperature = body.get("temperature", _DEFAULT_TEMPERATURE)
    if not isinstance(temperature, int | float) or temperature > config.max_temperature:
        return False
    return bool(body.get("n", 1) == 1)


def cache_key(request: Request, model: str) -> str:
    """Hash of the canonical form of everything that changes the answer."""
    body = {k: v for k, v in request.request.items() if k not in _NOT_IN_KEY}
    canon = _CANON.encode({"tenant": request.tenant, "model": model, "body": body})
    return hashlib.sha256(canon).hexdigest()


class ExactCache:
    """Bounded by entries and bytes; least recently used goes first; entries expire by TTL."""

    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._ttl = config.ttl_s
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if self._clock() - entry.stored_at > self._ttl:
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, entry: CacheEntry) -> None:
        if entry.size_bytes > self._max_bytes:
            return
        if entry.key in self._entries:
            self._drop(entry.key)
        self._entries[entry.key] = entry
        self.bytes += entry.size_bytes
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions += 1

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
        }


async def replay(
    entry: CacheEntry, request: Request, out: ReplyStream, *, received_ms: float
) -> None:
    """Answer `request` from `entry` as a fresh call would: chunks or a completion, then done."""
    created = int(entry.stored_at)
    rid = f"chatcmpl-cache-{entry.key[:24]}"
    if request.request.get("stream"):
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
                "usage": {
                    "prompt_tokens": entry.prompt_tokens,
                    "completion_tokens": entry.completion_tokens,
                    "total_tokens": entry.prompt_tokens + entry.completion_tokens,
                },
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
        cache="exact",
        attempts=0,
        cost=0.0,
        timing=Timing(
            queued_ms=0.0,
            ttft_ms=round(first_ms - received_ms, 3),
            total_ms=round(now_ms - received_ms, 3),
        ),
        metadata=request.metadata,
    )
