"""Cache actors: one shard each (exact store, semantic index, single flight), durable.

The ingress sends each shard one `lookup` per batch; hits, exact or semantic, are
replayed from here (chunks or completion, then `done` with `cache: "exact"` or
`"semantic"`) without crossing Ray again; identical requests already in flight wait for
their leader (`actors._cache_flight`). Callers send fresh answers back with one
`put_many` per flush; the shard replays them to the waiting followers and writes them to
the compacted `<prefix>cache` topic, which a restarted shard reads back before serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from typing import Any, Final

import msgspec
import structlog
from aiokafka.errors import KafkaError

from actors._cache_flight import Flight, FlightNews, Flights, Looked, Outbox, Rerun
from actors._cache_keys import ROUTE_HEX, SemanticParts, semantic_parts, tenant_scope
from actors._cache_semantic import SemanticCache, check_semantic
from actors._cache_store import cache_topic, decode_record, encode_record
from actors._compacted import read_compacted
from actors._exact_cache import CacheKind, DropReason, ExactCache, replay, storable
from actors._kafka import make_producer, send_retrying
from actors._messages import CacheEntry, CacheLookup
from actors._process import tune_process
from actors._ray import named_actor
from actors._replies import ReplyStream
from topics.config import Config
from topics.errors import ConfigError
from topics.logs import configure_logging

__all__ = [
    "CacheShard",
    "cache_actor_name",
    "cache_actors",
    "check_cache_config",
    "shard_of",
]

log = structlog.get_logger("quotaflow.cache")

# How often flights are checked against `single_flight_timeout_s`.
_TICK_S: Final = 1.0
# How often expired entries are forgotten (and tombstoned) without being looked up.
_SWEEP_INTERVAL_S: Final = 30.0
# Lookup calls whose decision times make the latency percentiles in `stats`.
_LATENCY_SAMPLES: Final = 2048
# The reason of the `reset` in front of a replay to a resent id that replied before.
_RERUN_RESET: Final = "the request is answered again from the cache"
# Embedded once at start so that the model is loaded before the first lookup.
_WARM_TEXT: Final = "Is the cache warm?"


def shard_of(key: str, shards: int) -> int:
    """Shard for a cache key (hex): stable across processes and restarts; with the
    semantic cache on, the same for every key of one semantic scope."""
    return int(key[:ROUTE_HEX], 16) % shards


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


class CacheShard:
    """Actor body. `producer`, `records` and `semantic` replace the Kafka producer, the
    topic's restored records and the loaded semantic cache (unit tests)."""

    def __init__(
        self,
        config: Config,
        shard: int,
        *,
        producer: Any = None,
        records: dict[str, bytes] | None = None,
        semantic: SemanticCache | None = None,
    ) -> None:
        configure_logging(config.logging)
        tune_process(config)
        self._config = config
        self._cfg = config.cache
        self.shard = shard
        self.incarnation = uuid.uuid4().hex
        self.cache = ExactCache(config.cache, on_drop=self._dropped)
        self.flights = Flights(config.cache.single_flight_timeout_s)
        self.outbox = Outbox()
        self.semantic = semantic
        self._topic = cache_topic(config.topics.internal_prefix)
        self._producer: Any = producer
        self._records = records
        self._started: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._replays: set[asyncio.Task[None]] = set()
        self._writes: deque[tuple[str, bytes | None]] = deque()
        self._write_wake = asyncio.Event()
        self.writes_pending = 0
        self.writes_acked = 0
        self.writes_failed = 0
        self.restored = 0
        self.lookups = 0
        self.exact_hits = 0
        self.semantic_hits = 0
        self.semantic_lookups = 0
        self.replay_failures = 0
        self.not_storable = 0
        self.followers_answered = 0
        self.followers_released = 0
        self._decide_ms: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

    # -- start-up and restore -----------------------------------------------------------

    async def _ensure_started(self) -> None:
        started = self._started
        if started is None or (started.done() and (started.cancelled() or started.exception())):
            started = self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        if self._producer is None:
            self._producer = await make_producer(self._config, client_suffix=f"cache-{self.shard}")
        if self.semantic is None and self._cfg.semantic.enabled:
            self.semantic = await asyncio.to_thread(SemanticCache.load, self._cfg.semantic)
            await self.semantic.embed([_WARM_TEXT])  # loads the model now, not on a lookup
        if self._records is None:
            shards = self._cfg.shards
            records = await read_compacted(
                self._config,
                self._producer,
                self._topic,
                client_suffix=f"cache-{self.shard}-restore",
                keep=lambda key: shard_of(key, shards) == self.shard,
            )
        else:
            records = self._records
        await self._restore(records)
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._write_loop()), loop.create_task(self._tick_loop())]
        log.info(
            "cache_started",
            shard=self.shard,
            restored=self.restored,
            records=len(records),
            entries=len(self.cache),
            semantic=self.semantic is not None,
        )

    async def _restore(self, records: dict[str, bytes]) -> None:
        """Entries back from the topic, oldest first (so the LRU keeps the newest); the
        expired and undecodable ones are tombstoned, as are those the bounds evict."""
        stored = []
        for key, value in records.items():
            rec = decode_record(value)
            if rec is None or rec.entry.key != key or self.cache.expired(rec.entry):
                self._write(key, None)
                continue
            stored.append(rec)
        stored.sort(key=lambda r: r.entry.stored_at)
        for rec in stored:
            if self.cache.put(rec.entry):
                self.restored += 1
        sem = self.semantic
        if sem is None:
            return
        todo = [r for r in stored if r.entry.key in self.cache and r.entry.scope and r.entry.prompt]
        missing = [r for r in todo if r.vector is None]
        vectors = dict(
            zip(
                (r.entry.key for r in missing),
                await sem.embed([r.entry.prompt or "" for r in missing]),
                strict=True,
            )
        )
        for r in todo:
            e = r.entry
            if e.key not in self.cache or e.scope is None or e.prompt is None:
                continue
            vec = vectors.get(e.key) if r.vector is None else sem.from_bytes(r.vector)
            try:
                sem.add(e.scope, e.key, e.prompt, vec, model=e.model)
            except ValueError:  # another model's embedding (another size): exact only
                log.warning("cache_vector_unusable", shard=self.shard, key=e.key)

    async def warm(self) -> None:
        """Start the producer, load the semantic model and restore now, not on first use."""
        await self._ensure_started()

    # -- the changelog ------------------------------------------------------------------

    def _write(self, key: str, value: bytes | None) -> None:
        """Queue a record (None: a tombstone); the write loop sends them in order."""
        self._writes.append((key, value))
        self.writes_pending += 1
        self._write_wake.set()

    def _dropped(self, key: str, _reason: DropReason) -> None:
        if self.semantic is not None:
            self.semantic.remove(key)
        self._write(key, None)

    async def _write_loop(self) -> None:
        kafka = self._config.kafka
        while True:
            if not self._writes:
                self._write_wake.clear()
                await self._write_wake.wait()
            batch = list(self._writes)
            self._writes.clear()
            futures: list[Awaitable[Any]] = []
            try:
                for key, value in batch:
                    futures.append(
                        await send_retrying(
                            self._producer, kafka, self._topic, key=key.encode(), value=value
                        )
                    )
            except KafkaError as exc:
                log.warning("cache_write_failed", shard=self.shard, error=repr(exc))
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = sum(isinstance(r, BaseException) for r in results) + len(batch) - len(futures)
            self.writes_failed += failed
            self.writes_acked += len(batch) - failed
            self.writes_pending -= len(batch)

    async def _tick_loop(self) -> None:
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            for flight in self.flights.expire():
                self._release(flight)
            if time.monotonic() - last_sweep >= _SWEEP_INTERVAL_S:
                last_sweep = time.monotonic()
                self.cache.sweep()

    # -- lookups ------------------------------------------------------------------------

    def _parts(self, item: CacheLookup) -> SemanticParts | None:
        scope = tenant_scope(item.request.tenant, self._cfg)
        return semantic_parts(item.request, item.model, scope=scope)

    async def lookup(self, owner: str, items: list[CacheLookup]) -> Looked:
        """Answer each item: hit (replayed here), follower (waits for an identical
        request in flight) or leader (the rest: the ingress sends them upstream)."""
        await self._ensure_started()
        t0 = time.perf_counter()
        self.lookups += len(items)
        hits: list[tuple[CacheLookup, CacheEntry, CacheKind]] = []
        misses: list[CacheLookup] = []
        for item in items:
            entry = self.cache.get(item.key)
            if entry is not None:
                hits.append((item, entry, "exact"))
            else:
                misses.append(item)
        sem = self.semantic
        probes: dict[int, tuple[SemanticParts, Any]] = {}
        leader_parts: dict[int, SemanticParts] = {}
        if sem is not None and misses:
            asks: list[tuple[CacheLookup, SemanticParts]] = []
            for item in misses:
                if item.key in self.flights:
                    continue  # a follower: nothing to search or to index
                parts = self._parts(item)
                if parts is None:
                    continue
                leader_parts[item.ticket] = parts
                if item.request.cache == "default":
                    asks.append((item, parts))
            vectors = await sem.embed([p.text for _, p in asks])
            probes = {item.ticket: (p, v) for (item, p), v in zip(asks, vectors, strict=True)}
            self.semantic_lookups += len(asks)
        followers: list[int] = []
        for item in misses:
            # An answer may have landed while the texts were embedded.
            entry = self.cache.get(item.key, count=False)
            if entry is not None:
                hits.append((item, entry, "exact"))
                continue
            probe = probes.get(item.ticket)
            if sem is not None and probe is not None:
                parts, vector = probe
                found = sem.search(parts.scope, parts.text, vector, model=item.model)
                if found is not None:
                    entry = self.cache.get(found[0], count=False)
                    if entry is not None:
                        hits.append((item, entry, "semantic"))
                        continue
            flight = self.flights.join(owner, item)
            if flight is None:
                followers.append(item.ticket)
                continue
            parts = leader_parts.get(item.ticket)
            if parts is not None:
                flight.scope, flight.text = parts.scope, parts.text
                flight.vector = probe[1] if probe is not None else None
        self._decide_ms.append((time.perf_counter() - t0) * 1000.0)
        for _, _, kind in hits:
            if kind == "exact":
                self.exact_hits += 1
            else:
                self.semantic_hits += 1
        results = await asyncio.gather(*(self._replay(i, e, k) for i, e, k in hits))
        answered = [i.ticket for (i, _, _), r in zip(hits, results, strict=True) if r is None]
        rerun = [r for r in results if r is not None]
        return Looked(self.incarnation, answered, followers, rerun)

    async def _replay(self, item: CacheLookup, entry: CacheEntry, kind: CacheKind) -> Rerun | None:
        """Replay `entry` to `item`; on a Kafka failure, where its run must continue."""
        out = ReplyStream(
            self._producer,
            topic=item.reply_to,
            usage_topic=self._config.topics.usage,
            request_id=item.request.id,
            tenant=item.request.tenant,
            start_seq=item.seq,
            kafka=self._config.kafka,
        )
        try:
            if item.reset_first:
                await out.reset(_RERUN_RESET)
            await replay(entry, item.request, out, received_ms=item.received_ms, kind=kind)
        except KafkaError as exc:
            self.replay_failures += 1
            log.warning(
                "cache_replay_failed", request_id=item.request.id, shard=self.shard, error=repr(exc)
            )
            return Rerun(item.ticket, out.seq)
        return None

    # -- answers from callers -----------------------------------------------------------

    def _release(self, flight: Flight) -> None:
        self.followers_released += len(flight.followers)
        self.outbox.release(flight)

    async def put_many(self, entries: list[CacheEntry]) -> None:
        """Store fresh answers (and write them to the topic), replay them to the requests
        waiting for them; `failed` or unstorable ones release their waiting requests."""
        await self._ensure_started()
        landed: list[tuple[CacheEntry, Flight | None]] = []
        indexing: list[tuple[CacheEntry, Any]] = []
        for e in entries:
            flight = self.flights.land(e.key)
            if not storable(e):
                self.not_storable += not e.failed
                if flight is not None:
                    self._release(flight)
                continue
            entry = e
            if flight is not None and flight.scope is not None:
                entry = msgspec.structs.replace(e, scope=flight.scope, prompt=flight.text)
            if self.cache.put(entry):
                if self.semantic is not None and entry.scope and entry.prompt:
                    indexing.append((entry, flight.vector if flight is not None else None))
                else:
                    self._write(entry.key, encode_record(entry))
            landed.append((entry, flight))
        sem = self.semantic
        if sem is not None and indexing:
            missing = [e.prompt or "" for e, v in indexing if v is None]
            fresh = iter(await sem.embed(missing))
            for entry, vector in indexing:
                vec = next(fresh) if vector is None else vector
                if entry.key not in self.cache or entry.scope is None or entry.prompt is None:
                    continue  # evicted while embedding
                sem.add(entry.scope, entry.key, entry.prompt, vec, model=entry.model)
                self._write(entry.key, encode_record(entry, sem.to_bytes(vec)))
        # Followers are answered in the background: the caller's flush need not wait.
        loop = asyncio.get_running_loop()
        for entry, flight in landed:
            if flight is not None and flight.followers:
                task = loop.create_task(self._answer(entry, flight))
                self._replays.add(task)
                task.add_done_callback(self._replays.discard)

    async def _answer(self, entry: CacheEntry, flight: Flight) -> None:
        """Replay the leader's answer to every follower, then report them answered."""
        followers = flight.followers
        results = await asyncio.gather(*(self._replay(f.item, entry, "exact") for f in followers))
        for f, rerun in zip(followers, results, strict=True):
            if rerun is None:
                self.followers_answered += 1
                self.exact_hits += 1  # answered from cache, as a hit is
                self.outbox.answered(f.owner, f.item.ticket)
            else:
                self.outbox.rerun(f.owner, rerun)

    async def flight_news(
        self, owner: str, timeout_s: float, gone: list[tuple[str, int]], dropped: list[int]
    ) -> FlightNews:
        """Long poll for `owner`'s followers. `gone`: its leaders (key, ticket) that ended
        without an upstream call; `dropped`: followers it answered otherwise."""
        await self._ensure_started()
        for key, ticket in gone:
            flight = self.flights.abandon(key, owner, ticket)
            if flight is not None:
                self._release(flight)
        if dropped:
            self.flights.drop(owner, set(dropped))
        return await self.outbox.wait(owner, timeout_s, self.incarnation)

    # -- status -------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        await self._ensure_started()
        ordered = sorted(self._decide_ms)
        n = self.lookups
        out: dict[str, Any] = {
            "shard": self.shard,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            **self.cache.stats(),
            "lookups": n,
            "exact_hits": self.exact_hits,
            "semantic_hits": self.semantic_hits,
            "semantic_lookups": self.semantic_lookups,
            "hit_rate_exact": round(self.exact_hits / n, 4) if n else None,
            "hit_rate_semantic": round(self.semantic_hits / n, 4) if n else None,
            "lookup_ms_p50": _percentile(ordered, 0.5),
            "lookup_ms_p99": _percentile(ordered, 0.99),
            "replay_failures": self.replay_failures,
            "not_storable": self.not_storable,
            "followers_answered": self.followers_answered,
            "followers_released": self.followers_released,
            **self.flights.stats(),
            "restored": self.restored,
            "writes_pending": self.writes_pending,
            "writes_acked": self.writes_acked,
            "writes_failed": self.writes_failed,
        }
        if self.semantic is not None:
            out["semantic"] = self.semantic.stats()
        return out

    async def close(self) -> None:
        for task in self._loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops = []
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def cache_actor_name(shard: int) -> str:
    return f"quotaflow.cache.{shard}"


def check_cache_config(config: Config) -> None:
    """What the schema cannot check: model names in per-model settings, and that the
    semantic cache can load when it is enabled (raises naming the key)."""
    models = {m.name for m in config.models}
    cache = config.cache
    for path, names in (
        ("cache.ttl_s_by_model", cache.ttl_s_by_model),
        ("cache.semantic.thresholds", cache.semantic.thresholds),
    ):
        for name in names:
            if name not in models:
                raise ConfigError(
                    f"{path}: {name!r} is not a configured model name (known: {sorted(models)})"
                )
    if cache.enabled and cache.semantic.enabled:
        check_semantic(cache.semantic)


def cache_actors(config: Config) -> list[Any]:
    """Get or create the named cache shards (after `check_cache_config`)."""
    check_cache_config(config)
    return [
        named_actor(CacheShard, config, cache_actor_name(i), config, i, max_concurrency=100)
        for i in range(config.cache.shards)
    ]
