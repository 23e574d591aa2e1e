"""Cache actors: one shard of the exact cache each, replaying hits to Kafka themselves.

The ingress sends each shard one `lookup` per batch; hits are answered here (chunks or
completion, then `done` with `cache: "exact"`) without crossing Ray again. Callers send
fresh answers back with one `put_many` per flush.
"""

from __future__ import annotations

import time
from typing import Any

from actors._exact_cache import ExactCache, replay
from actors._kafka import make_producer
from actors._messages import CacheEntry, CacheLookup
from actors._ray import named_actor
from actors._replies import ReplyStream
from topics.config import Config
from topics.logs import configure_logging

__all__ = ["CacheShard", "cache_actor_name", "cache_actors", "shard_of"]


def shard_of(key: str, shards: int) -> int:
    """Shard for a cache key (a hex sha256): stable across processes and restarts."""
    return int(key[:8], 16) % shards


class CacheShard:
    """Actor body: an ExactCache plus a Kafka producer for replays."""

    def __init__(self, config: Config, shard: int) -> None:
        configure_logging(config.logging)
        self._config = config
        self.shard = shard
        self.cache = ExactCache(config.cache)
        self._producer: Any = None
        self._lookup_ns = 0
        self._lookups = 0

    async def _ensure_producer(self) -> Any:
        if self._producer is None:
            self._producer = await make_producer(self._config, client_suffix=f"cache-{self.shard}")
        return self._producer

    async def warm(self) -> None:
        """Start the producer now, so the first hit pays no start-up."""
        await self._ensure_producer()

    async def lookup(self, items: list[CacheLookup]) -> list[int]:
        """Answer the hits among `items` from cache; returns their tickets."""
        t0 = time.perf_counter_ns()
        hits = [(item, entry) for item in items if (entry := self.cache.get(item.key)) is not None]
        self._lookup_ns += time.perf_counter_ns() - t0
        self._lookups += len(items)
        if not hits:
            return []
        producer = await self._ensure_producer()
        for item, entry in hits:
            out = ReplyStream(
                producer,
                topic=item.reply_to,
                usage_topic=self._config.topics.usage,
                request_id=item.request.id,
                tenant=item.request.tenant,
                kafka=self._config.kafka,
            )
            await replay(entry, item.request, out, received_ms=item.received_ms)
        return [item.ticket for item, _ in hits]

    async def put_many(self, entries: list[CacheEntry]) -> None:
        for e in entries:
            self.cache.put(e)

    async def stats(self) -> dict[str, Any]:
        out = self.cache.stats()
        out["shard"] = self.shard
        out["lookup_us_avg"] = (
            round(self._lookup_ns / 1000 / self._lookups, 3) if self._lookups else None
        )
        return out

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def cache_actor_name(shard: int) -> str:
    return f"quotaflow.cache.{shard}"


def cache_actors(config: Config) -> list[Any]:
    """Get or create the named cache shards."""
    return [
        named_actor(CacheShard, config, cache_actor_name(i), config, i, max_concurrency=100)
        for i in range(config.cache.shards)
    ]
