"""The cache without Kafka or Ray: keys, eligibility, scopes, the LRU/TTL store, single
flight, the changelog records, and one shard driven through its methods with a fake
producer (and, where numpy and `actors._semantic` are installed, a real vector index fed
by a fake embedder whose similarities the tests choose)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
from aiokafka.errors import KafkaError

from actors._cache_flight import Digest, FlightNews, Flights, FlightWatch, Outbox, Rerun
from actors._cache_keys import cache_key, cacheable, semantic_parts, tenant_scope
from actors._cache_semantic import SemanticCache
from actors._cache_store import decode_record, encode_record
from actors._exact_cache import ExactCache, storable
from actors._idempotency import RERUN_SEQ_STRIDE
from actors._messages import CacheEntry, CacheLookup
from actors.cache import CacheShard, check_cache_config, shard_of
from topics.config import CacheConfig, Config, parse_config
from topics.errors import ConfigError, QuotaflowError
from topics.specs import REPLY_DECODER, USAGE_DECODER
from topics.wire import ChunkReply, CompletionReply, DoneReply, Request

BASE: dict[str, Any] = {
    "deployments": [
        {"name": "a", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "KA", "model": "m"},
    ],
    "models": [
        {"name": "fast", "deployments": ["a"], "aliases": ["small"]},
        {"name": "big", "deployments": ["a"]},
    ],
}
USER = [{"role": "user", "content": "How do I reset my password?"}]


def _req(
    messages: list[dict[str, Any]] | None = None,
    *,
    tenant: str = "t1",
    cache: str = "default",
    rid: str = "r1",
    **body: Any,
) -> Request:
    return msgspec.convert(
        {
            "id": rid,
            "tenant": tenant,
            "cache": cache,
            "request": {"model": "fast", "messages": messages or USER, **body},
        },
        Request,
    )


def _key(req: Request, model: str = "fast", cfg: CacheConfig | None = None) -> str:
    return cache_key(req, model, scope=tenant_scope(req.tenant, cfg or CacheConfig()))


# -- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.2},
        {"top_p": 0.5},
        {"max_tokens": 5},
        {"max_completion_tokens": 5},
        {"stop": ["\n"]},
        {"seed": 7},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"reasoning_effort": "high"},
        {"messages": [{"role": "user", "content": "How do I reset my PIN?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, *USER]},
    ],
)
def test_every_field_that_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    base = _req(temperature=0)
    changed = msgspec.convert(
        {**msgspec.to_builtins(base), "request": {**base.request, **change}}, Request
    )
    assert _key(changed) != _key(base)


@pytest.mark.parametrize(
    "change",
    [
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"user": "someone"},
        {"metadata": {"trace": "x"}},
        {"store": True},
        {"service_tier": "flex"},
        {"model": "small"},  # an alias: the key uses the resolved model
        {"top_p": 1},  # OpenAI's default, same as leaving it out
        {"n": 1},
        {"seed": None},  # null is the same as absent
        {"temperature": 0.0},  # 0 and 0.0 are one number
    ],
)
def test_delivery_fields_and_spellings_leave_the_key_alone(change: dict[str, Any]) -> None:
    base = _req(temperature=0)
    changed = msgspec.convert(
        {**msgspec.to_builtins(base), "request": {**base.request, **change}}, Request
    )
    assert _key(changed) == _key(base)


def test_request_envelope_fields_are_not_in_the_key() -> None:
    base = _req(temperature=0)
    other = msgspec.structs.replace(
        base, id="r2", priority=0, metadata={"a": 1}, reply_to="x", deadline_ms=5, cache="exact"
    )
    assert _key(other) == _key(base)


def test_the_resolved_model_and_the_tenant_are_in_the_key() -> None:
    base = _req(temperature=0)
    assert _key(base, "big") != _key(base)
    assert _key(msgspec.structs.replace(base, tenant="t2")) != _key(base)


def test_shared_tenants_share_keys_and_nobody_else_does() -> None:
    cfg = msgspec.convert({"semantic": {"shared_tenants": ["t1", "t2"]}}, CacheConfig)
    a, b, c = (_req(temperature=0, tenant=t) for t in ("t1", "t2", "t3"))
    assert _key(a, cfg=cfg) == _key(b, cfg=cfg)
    assert _key(c, cfg=cfg) != _key(a, cfg=cfg)
    assert _key(a) != _key(b)  # without the opt-in


def test_only_deterministic_replayable_requests_are_cacheable() -> None:
    cfg = CacheConfig()
    assert cacheable(_req(temperature=0), cfg)
    assert not cacheable(_req(), cfg)  # OpenAI's default temperature is 1
    assert not cacheable(_req(temperature=0.3), cfg)
    assert cacheable(_req(temperature=0.3), CacheConfig(max_temperature=0.5))
    assert not cacheable(_req(temperature=0, cache="bypass"), cfg)
    assert cacheable(_req(temperature=0, cache="exact"), cfg)
    assert not cacheable(_req(temperature=0, n=2), cfg)
    assert not cacheable(_req(temperature=0, logprobs=True), cfg)
    assert not cacheable(_req(temperature=0, modalities=["text", "audio"]), cfg)
    assert not cacheable(_req(temperature=0), CacheConfig(enabled=False))


# -- semantic scope ---------------------------------------------------------------------


def _parts(req: Request, model: str = "fast", cfg: CacheConfig | None = None) -> Any:
    return semantic_parts(req, model, scope=tenant_scope(req.tenant, cfg or CacheConfig()))


def test_semantic_scope_is_everything_but_the_last_user_turns_text() -> None:
    system = {"role": "system", "content": "You are a help desk."}
    q1 = _req([system, {"role": "user", "content": "How do I reset my password?"}], temperature=0)
    q2 = _req([system, {"role": "user", "content": "How can I change my password?"}], temperature=0)
    p1, p2 = _parts(q1), _parts(q2)
    assert p1.scope == p2.scope
    assert (p1.text, p2.text) == ("How do I reset my password?", "How can I change my password?")
    other_system = _req(
        [{"role": "system", "content": "You are a pirate."}, q2.request["messages"][1]],
        temperature=0,
    )
    earlier = _req(
        [
            system,
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            q2.request["messages"][1],
        ],
        temperature=0,
    )
    for different in (
        _parts(other_system),
        _parts(earlier),
        _parts(msgspec.structs.replace(q2, tenant="t2")),
        _parts(q2, "big"),
        _parts(_req(q2.request["messages"], temperature=0, max_tokens=9)),
    ):
        assert different.scope != p1.scope
    # Delivery fields do not split scopes either.
    assert _parts(_req(q2.request["messages"], temperature=0, stream=True)).scope == p1.scope


def test_semantic_parts_need_a_user_turn_of_text() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert _parts(_req([{"role": "user", "content": parts}])).text == "first\nsecond"
    image = [*parts, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert _parts(_req([{"role": "user", "content": image}])) is None
    assert _parts(_req([{"role": "system", "content": "only a system prompt"}])) is None
    assert _parts(_req([{"role": "user", "content": "   "}])) is None


# -- the store ----------------------------------------------------------------------------


def _entry(key: str, text: str = "x", *, at: float = 0.0, model: str = "fast") -> CacheEntry:
    return CacheEntry(
        key=key,
        text=text,
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
        upstream_model="m",
        model=model,
        stored_at=at,
    )


def test_ttl_is_per_model_with_a_default() -> None:
    now = [100.0]
    dropped: list[tuple[str, str]] = []
    cfg = CacheConfig(ttl_s=50, ttl_s_by_model={"big": 5})
    cache = ExactCache(cfg, clock=lambda: now[0], on_drop=lambda k, r: dropped.append((k, r)))
    cache.put(_entry("f", at=100.0))
    cache.put(_entry("b", at=100.0, model="big"))
    now[0] = 100.0 + 5.5
    assert cache.get("b") is None
    assert cache.get("f") is not None
    now[0] = 100.0 + 50.5
    assert cache.sweep() == 1
    assert dropped == [("b", "expired"), ("f", "expired")]
    assert len(cache) == 0


def test_eviction_at_the_entry_bound_takes_the_least_recently_used() -> None:
    dropped: list[tuple[str, str]] = []
    cache = ExactCache(
        CacheConfig(max_entries=3), clock=lambda: 0.0, on_drop=lambda k, r: dropped.append((k, r))
    )
    for k in "abc":
        cache.put(_entry(k))
    assert cache.get("a") is not None  # b is now the least recently used
    cache.put(_entry("d"))
    assert dropped == [("b", "evicted")]
    assert [e.key for e in cache.entries()] == ["c", "a", "d"]
    assert (len(cache), cache.evictions) == (3, 1)


def test_eviction_at_the_byte_bound() -> None:
    one = _entry("a", "x" * 500).size_bytes
    cache = ExactCache(CacheConfig(max_bytes=2 * one + 1), clock=lambda: 0.0)
    for k in "abc":
        cache.put(_entry(k, "x" * 500))
    assert [e.key for e in cache.entries()] == ["b", "c"]
    assert cache.bytes == 2 * one
    assert not cache.put(_entry("huge", "x" * (3 * one)))  # never fits: not stored


def test_only_replayable_answers_are_storable() -> None:
    ok = _entry("k")
    assert storable(ok)
    assert not storable(msgspec.structs.replace(ok, failed=True))
    assert not storable(msgspec.structs.replace(ok, text=""))
    assert not storable(msgspec.structs.replace(ok, finish_reason="tool_calls"))
    assert not storable(msgspec.structs.replace(ok, finish_reason=None))
    assert storable(msgspec.structs.replace(ok, finish_reason="length"))


def test_changelog_records_round_trip() -> None:
    e = msgspec.structs.replace(_entry("k"), scope="s", prompt="p")
    back = decode_record(encode_record(e, b"\x00\x01"))
    assert back is not None
    assert (back.entry, back.vector) == (e, b"\x00\x01")
    assert decode_record(b"not msgpack at all \xff") is None


def test_shard_of_is_stable_and_spreads() -> None:
    keys = [_key(_req(temperature=0, rid=str(i), seed=i)) for i in range(200)]
    shards = [shard_of(k, 4) for k in keys]
    assert shards == [shard_of(k, 4) for k in keys]
    assert set(shards) == {0, 1, 2, 3}


def test_per_model_settings_must_name_models() -> None:
    check_cache_config(parse_config({**BASE, "cache": {"ttl_s_by_model": {"fast": 5}}}))
    for cache in (
        {"ttl_s_by_model": {"small": 5}},  # an alias is not the resolved model
        {"semantic": {"thresholds": {"nope": 0.9}}},
    ):
        with pytest.raises(ConfigError, match=r"cache\.(ttl_s_by_model|semantic\.thresholds)"):
            check_cache_config(parse_config({**BASE, "cache": cache}))


# -- single flight, plain -------------------------------------------------------------------


def _lookup(ticket: int, key: str, req: Request | None = None, model: str = "fast") -> CacheLookup:
    request = req or _req(temperature=0, rid=f"r{ticket}")
    return CacheLookup(ticket, key, request, "replies", 0.0, model=model)


def test_flights_lead_follow_land_and_abandon() -> None:
    flights = Flights(10.0, clock=lambda: 0.0)
    assert flights.join("ing-a", _lookup(1, "k")) is not None  # leader
    assert flights.join("ing-b", _lookup(7, "k")) is None  # follower
    assert flights.join("ing-a", _lookup(2, "k")) is None
    assert flights.abandon("k", "ing-b", 7) is None  # only the leader can abandon
    flights.drop("ing-a", {2})
    flight = flights.land("k")
    assert flight is not None
    assert [(f.owner, f.item.ticket) for f in flight.followers] == [("ing-b", 7)]
    assert "k" not in flights
    assert flights.join("ing-a", _lookup(3, "k")) is not None  # a new flight
    abandoned = flights.abandon("k", "ing-a", 3)
    assert abandoned is not None
    assert len(flights) == 0


def test_flights_time_out() -> None:
    now = [0.0]
    flights = Flights(10.0, clock=lambda: now[0])
    flights.join("o", _lookup(1, "k1"))
    now[0] = 6.0
    flights.join("o", _lookup(2, "k2"))
    flights.join("o", _lookup(3, "k2"))
    now[0] = 10.5
    assert [f.ticket for f in flights.expire()] == [1]
    now[0] = 16.5
    [late] = flights.expire()
    assert [f.item.ticket for f in late.followers] == [3]


class _P:
    def __init__(self, caller: int | None) -> None:
        self.caller = caller


def test_watch_reports_leaders_gone_without_a_call_and_lost_followers() -> None:
    watch = FlightWatch()
    running: dict[int, Any] = {1: _P(None), 2: _P(0), 3: _P(None), 4: None, 5: None}
    watch.lead(0, 1, "k1", running[1])
    watch.lead(0, 2, "k2", running[2])
    watch.lead(0, 3, "k3", running[3])
    assert watch.follow(0, "inc-1", [4, 5]) == Digest()
    assert watch.report(0, running) == ([], [])
    for t in (1, 2, 5):
        del running[t]
    # 1 was answered without an upstream call; 2's caller reports to the shard itself.
    assert watch.report(0, running) == ([("k1", 1)], [5])
    assert watch.report(0, running) == ([], [])
    running[6] = None
    watch.follow(0, "inc-2", [6])
    news = watch.digest(0, FlightNews("inc-2", answered=[6, 5]), running)
    assert news == Digest(answered=[6], run=[4])  # 4 died with inc-1; 5 is not held


def test_watch_keeps_news_that_overtook_the_lookup_reply() -> None:
    watch = FlightWatch()
    running: dict[int, Any] = {7: None, 8: None, 9: None}
    rerun = Rerun(9, 3)
    early = FlightNews("inc", answered=[7], run=[8], rerun=[rerun])
    assert watch.digest(0, early, running) == Digest()
    assert watch.follow(0, "inc", [7, 8, 9]) == Digest(answered=[7], run=[8], rerun=[rerun])
    assert watch.followers(0) == 0
    # News for a ticket that is not running any more is dropped, not kept.
    assert watch.digest(0, FlightNews("inc", answered=[99]), running) == Digest()
    assert watch.follow(0, "inc", [99]) == Digest()


async def test_outbox_long_poll() -> None:
    box = Outbox()
    empty = await box.wait("o", 0.01, "inc")
    assert (empty.answered, empty.run) == ([], [])
    waiter = asyncio.ensure_future(box.wait("o", 30.0, "inc"))
    await asyncio.sleep(0)
    box.answered("o", 4)
    box.run("p", 5)
    news = await asyncio.wait_for(waiter, 5.0)
    assert (news.incarnation, news.answered, news.run) == ("inc", [4], [])
    assert (await box.wait("p", 0.0, "inc")).run == [5]


# -- one shard, through its methods ---------------------------------------------------------


class _Delivered(asyncio.Future[Any]):
    def __init__(self) -> None:
        super().__init__()
        self.set_result(None)


class FakeProducer:
    """Records every send; `fail_topic` sends raise a KafkaError-like failure."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, **_: Any
    ) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value))
        return _Delivered()

    async def stop(self) -> None:
        return None

    def replies(self, request_id: str) -> list[Any]:
        return [
            REPLY_DECODER.decode(v)
            for t, k, v in self.sent
            if t == "replies" and k == request_id.encode() and v is not None
        ]

    def records(self, topic: str = "quotaflow.cache") -> dict[str, bytes | None]:
        return {k.decode(): v for t, k, v in self.sent if t == topic and k is not None}

    def usage(self) -> list[Any]:
        return [USAGE_DECODER.decode(v) for t, _, v in self.sent if t == "llm.usage" and v]


def _config(**cache: Any) -> Config:
    return parse_config({**BASE, "cache": {"shards": 1, **cache}})


def _shard(
    config: Config,
    records: dict[str, bytes] | None = None,
    semantic: SemanticCache | None = None,
) -> tuple[CacheShard, FakeProducer]:
    producer = FakeProducer()
    return CacheShard(config, 0, producer=producer, records=records or {}, semantic=semantic), (
        producer
    )


ANSWER = "Open settings, then Security."


def _answer(item: CacheLookup, text: str = ANSWER, **kw: Any) -> CacheEntry:
    return CacheEntry(
        key=item.key,
        text=text,
        finish_reason=kw.pop("finish_reason", "stop"),
        prompt_tokens=7,
        completion_tokens=5,
        upstream_model="m-2025",
        model=item.model,
        stored_at=kw.pop("stored_at", time.time()),
        **kw,
    )


async def _settle(shard: CacheShard) -> None:
    """Let the write loop send what is queued."""
    for _ in range(100):
        if shard.writes_pending == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the shard's writes did not drain")


def _text_of(replies: list[Any]) -> str:
    out = []
    for r in replies:
        if isinstance(r, ChunkReply):
            out += [(c.get("delta") or {}).get("content") or "" for c in r.chunk["choices"]]
        if isinstance(r, CompletionReply):
            out.append(r.completion["choices"][0]["message"]["content"])
    return "".join(out)


async def test_miss_store_then_exact_hit_replayed_at_zero_cost() -> None:
    config = _config()
    shard, producer = _shard(config)
    req = _req(temperature=0, stream=True, stream_options={"include_usage": True})
    item = _lookup(1, _key(req), req)
    first = await shard.lookup("ing", [item])
    assert (first.answered, first.followers) == ([], [])  # a leader: goes upstream
    await shard.put_many([_answer(item)])
    await _settle(shard)
    again = msgspec.structs.replace(req, id="r2")
    hit = await shard.lookup("ing", [_lookup(2, item.key, again)])
    assert hit.answered == [2]
    replies = producer.replies("r2")
    assert [type(r).__name__ for r in replies] == [
        "ChunkReply",
        "ChunkReply",
        "ChunkReply",
        "DoneReply",
    ]
    assert [r.seq for r in replies] == [0, 1, 2, 3]
    assert _text_of(replies) == "Open settings, then Security."
    assert replies[2].chunk["usage"]["total_tokens"] == 12
    done = replies[-1]
    assert isinstance(done, DoneReply)
    assert (done.cache, done.cost_usd, done.deployment, done.attempts) == ("exact", 0.0, None, 0)
    assert [u.cache for u in producer.usage()] == ["exact"]
    assert item.key in producer.records()
    stats = await shard.stats()
    assert (stats["lookups"], stats["exact_hits"], stats["entries"]) == (2, 1, 1)
    assert stats["hit_rate_exact"] == 0.5
    assert stats["writes_acked"] == 1


async def test_a_rerun_is_replayed_past_its_earlier_seqs_after_a_reset() -> None:
    # A resent id that ran before (here: answered from the cache) continues at its seq.
    shard, producer = _shard(_config())
    req = _req(temperature=0)
    item = _lookup(1, _key(req), req)
    await shard.lookup("ing", [item])
    await shard.put_many([_answer(item)])
    await _settle(shard)
    again = msgspec.structs.replace(item, ticket=2, seq=RERUN_SEQ_STRIDE, reset_first=True)
    assert (await shard.lookup("ing", [again])).answered == [2]
    replies = producer.replies(req.id)
    assert [type(r).__name__ for r in replies] == ["ResetReply", "CompletionReply", "DoneReply"]
    assert [r.seq for r in replies] == [RERUN_SEQ_STRIDE + i for i in range(3)]
    assert _text_of(replies) == ANSWER


async def test_single_flight_followers_get_the_leaders_answer() -> None:
    shard, producer = _shard(_config())
    key = _key(_req(temperature=0))
    leader, f1, f2 = (
        _lookup(t, key, _req(temperature=0, rid=f"r{t}", stream=t == 3)) for t in (1, 2, 3)
    )
    assert (await shard.lookup("ing-a", [leader])).followers == []
    assert (await shard.lookup("ing-a", [f1])).followers == [2]
    assert (await shard.lookup("ing-b", [f2])).followers == [3]
    assert producer.replies("r2") == []  # nothing until the leader's answer
    await shard.put_many([_answer(leader)])
    news_a = await shard.flight_news("ing-a", 5.0, [], [])
    news_b = await shard.flight_news("ing-b", 5.0, [], [])
    assert (news_a.answered, news_b.answered) == ([2], [3])
    assert _text_of(producer.replies("r2")) == _text_of(producer.replies("r3"))
    assert isinstance(producer.replies("r2")[0], CompletionReply)  # each in its own form
    assert isinstance(producer.replies("r3")[0], ChunkReply)
    assert producer.replies("r1") == []  # the leader's replies are its caller's


@pytest.mark.parametrize(
    "outcome",
    [{"failed": True, "text": "", "finish_reason": None}, {"finish_reason": "tool_calls"}],
)
async def test_followers_run_themselves_when_the_leader_has_nothing_to_replay(
    outcome: dict[str, Any],
) -> None:
    shard, producer = _shard(_config())
    key = _key(_req(temperature=0))
    leader, follower = _lookup(1, key), _lookup(2, key)
    await shard.lookup("ing", [leader])
    await shard.lookup("ing", [follower])
    await shard.put_many([_answer(leader, **outcome)])
    news = await shard.flight_news("ing", 5.0, [], [])
    assert (news.answered, news.run) == ([], [2])
    assert len(shard.cache) == 0
    assert producer.replies("r2") == []


async def test_a_leader_answered_without_a_call_releases_its_followers() -> None:
    shard, _ = _shard(_config())
    key = _key(_req(temperature=0))
    await shard.lookup("ing-a", [_lookup(1, key)])
    await shard.lookup("ing-b", [_lookup(2, key)])
    await shard.flight_news("ing-a", 0.0, [(key, 99)], [])  # not its leader: no effect
    assert key in shard.flights
    await shard.flight_news("ing-a", 0.0, [(key, 1)], [])
    assert (await shard.flight_news("ing-b", 5.0, [], [])).run == [2]


async def test_restart_restores_entries_and_tombstones_the_expired() -> None:
    now = time.time()
    config = _config(ttl_s_by_model={"big": 30})
    shard, producer = _shard(config)
    live, old = _lookup(1, "a" * 64), _lookup(2, "b" * 64, model="big")
    await shard.lookup("ing", [live, old])
    await shard.put_many([_answer(live), _answer(old, stored_at=now - 10)])
    await _settle(shard)
    records = {k: v for k, v in producer.records().items() if v is not None}
    assert set(records) == {live.key, old.key}
    # The next incarnation, 25 s later for `big`: the old entry has expired meanwhile.
    stale = encode_record(_answer(old, stored_at=now - 40))
    reborn, producer2 = _shard(config, records={**records, old.key: stale})
    hit = await reborn.lookup("ing", [_lookup(3, live.key)])
    assert hit.answered == [3]
    assert (await reborn.stats())["restored"] == 1
    await _settle(reborn)
    assert producer2.records() == {old.key: None}  # a tombstone for the expired one


async def test_evicted_entries_are_tombstoned() -> None:
    shard, producer = _shard(_config(max_entries=2))
    items = [_lookup(i, f"{i:064x}") for i in range(3)]
    await shard.lookup("ing", items)
    await shard.put_many([_answer(i) for i in items])
    await _settle(shard)
    assert producer.records()[items[0].key] is None
    assert producer.records()[items[2].key] is not None
    assert len(shard.cache) == 2


# -- semantic, with a real index and a fake embedder -----------------------------------------


def _unit(n: int, cos: float, dim: int) -> list[float]:
    """A unit vector at angle acos(cos) from basis vector 0, towards basis vector n."""
    v = [0.0] * dim
    v[0] = cos
    v[n] = math.sqrt(max(0.0, 1 - cos * cos))
    return v


class FakeEmbedder:
    """Texts to the vectors a test chose: `cosines[text]` is its cosine with the anchor."""

    def __init__(self, np: Any, dim: int, cosines: dict[str, float]) -> None:
        self._np = np
        self._dim = dim
        self._cos = cosines
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> Any:
        self.calls.append(list(texts))
        order = list(self._cos)
        rows = [_unit(1 + order.index(t), self._cos[t], self._dim) for t in texts]
        return self._np.asarray(rows, dtype="float32")


ANCHOR = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
UNRELATED = "What is the capital of France?"


def _semantic(cfg: dict[str, Any]) -> Callable[[], tuple[SemanticCache, FakeEmbedder]]:
    np = pytest.importorskip("numpy")
    mod = pytest.importorskip("actors._semantic")
    config = _config(semantic=cfg).cache.semantic

    def make() -> tuple[SemanticCache, FakeEmbedder]:
        embedder = FakeEmbedder(
            np, mod.EMBEDDING_DIM, {ANCHOR: 1.0, PARAPHRASE: 0.95, UNRELATED: 0.5}
        )
        index = mod.SemanticIndex(
            threshold=config.threshold,
            thresholds=dict(config.thresholds),
            min_probability=config.verifier_min_probability,
            verifier=None,
        )
        return SemanticCache(config, embedder=embedder, index=index, np=np), embedder

    return make


SEM_CFG = {"enabled": True, "threshold": 0.9, "verifier_min_probability": 0.0}


async def _stored(shard: CacheShard, text: str, *, tenant: str = "t1") -> CacheLookup:
    req = _req([{"role": "user", "content": text}], temperature=0, tenant=tenant, rid="seed")
    item = _lookup(1, _key(req, cfg=shard._cfg), req)
    await shard.lookup("ing", [item])
    await shard.put_many([_answer(item, text=f"answer to {text}")])
    return item


def _ask(text: str, ticket: int, *, tenant: str = "t1", cache: str = "default") -> CacheLookup:
    req = _req(
        [{"role": "user", "content": text}],
        temperature=0,
        tenant=tenant,
        cache=cache,
        rid=f"q{ticket}",
    )
    return _lookup(ticket, _key(req), req)


async def test_semantic_hit_above_the_threshold_and_miss_below() -> None:
    make = _semantic(SEM_CFG)
    sem, embedder = make()
    shard, producer = _shard(_config(semantic=SEM_CFG), semantic=sem)
    await _stored(shard, ANCHOR)
    looked = await shard.lookup("ing", [_ask(PARAPHRASE, 2), _ask(UNRELATED, 3)])
    assert looked.answered == [2]
    done = producer.replies("q2")[-1]
    assert isinstance(done, DoneReply)
    assert done.cache == "semantic"
    assert _text_of(producer.replies("q2")) == f"answer to {ANCHOR}"
    assert producer.replies("q3") == []
    # One embedding call per lookup batch (and one for the stored answer's lookup).
    assert embedder.calls[-1] == [PARAPHRASE, UNRELATED]
    stats = await shard.stats()
    assert (stats["semantic_hits"], stats["semantic_lookups"]) == (1, 3)


async def test_semantic_never_crosses_tenants_unless_shared() -> None:
    cfg = {**SEM_CFG, "shared_tenants": ["s1", "s2"]}
    sem, _ = _semantic(cfg)()
    shard, _ = _shard(_config(semantic=cfg), semantic=sem)
    await _stored(shard, ANCHOR, tenant="t1")
    await _stored(shard, ANCHOR, tenant="s1")
    looked = await shard.lookup(
        "ing",
        [_ask(PARAPHRASE, 2, tenant="t2"), _ask(PARAPHRASE, 3, tenant="s2")],
    )
    assert looked.answered == [3]


async def test_exact_mode_forbids_semantic_hits() -> None:
    sem, _ = _semantic(SEM_CFG)()
    shard, _ = _shard(_config(semantic=SEM_CFG), semantic=sem)
    await _stored(shard, ANCHOR)
    looked = await shard.lookup("ing", [_ask(PARAPHRASE, 2, cache="exact")])
    assert looked.answered == []


async def test_semantic_entries_come_back_with_their_vectors_after_a_restart() -> None:
    make = _semantic(SEM_CFG)
    sem, _ = make()
    config = _config(semantic=SEM_CFG)
    shard, producer = _shard(config, semantic=sem)
    await _stored(shard, ANCHOR)
    await _settle(shard)
    records = {k: v for k, v in producer.records().items() if v is not None}
    [rec] = [decode_record(v) for v in records.values()]
    assert rec is not None
    assert rec.vector is not None
    assert rec.entry.prompt == ANCHOR
    sem2, embedder2 = make()
    reborn, _ = _shard(config, records=records, semantic=sem2)
    looked = await reborn.lookup("ing", [_ask(PARAPHRASE, 2)])
    assert looked.answered == [2]
    assert embedder2.calls == [[PARAPHRASE]]  # the stored vector was not recomputed


async def test_an_evicted_entry_leaves_the_semantic_index() -> None:
    cfg = _config(semantic=SEM_CFG, max_entries=1)
    sem, _ = _semantic(SEM_CFG)()
    shard, _ = _shard(cfg, semantic=sem)
    await _stored(shard, ANCHOR)
    assert len(sem) == 1
    await _stored(shard, UNRELATED)
    assert len(sem) == 1
    assert (await shard.lookup("ing", [_ask(PARAPHRASE, 5)])).answered == []


def test_with_semantic_on_a_scope_lives_on_one_shard() -> None:
    cfg = CacheConfig()
    texts = [f"Question number {i}: how do I reset my password?" for i in range(50)]
    reqs = [_req([{"role": "user", "content": t}], temperature=0) for t in texts]
    keys = [cache_key(r, "fast", scope=tenant_scope(r.tenant, cfg), semantic=True) for r in reqs]
    assert len(set(keys)) == len(keys)  # still one key per request
    for shards in (2, 3, 7):
        assert len({shard_of(k, shards) for k in keys}) == 1
    plain = [_key(r) for r in reqs]
    assert len({shard_of(k, 7) for k in plain}) > 1


class _BrokenReplies(FakeProducer):
    """The reply topic refuses every record (a broker that cannot take them)."""

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, **kw: Any
    ) -> asyncio.Future[Any]:
        if topic == "replies":
            raise KafkaError("reply topic unavailable")
        return await super().send(topic, value=value, key=key, **kw)


async def test_a_failed_replay_hands_the_request_back_to_run() -> None:
    producer = _BrokenReplies()
    shard = CacheShard(_config(), 0, producer=producer, records={})
    item = _lookup(1, "c" * 64)
    await shard.lookup("ing", [item])
    await shard.put_many([_answer(item)])
    looked = await shard.lookup("ing", [_lookup(2, item.key)])
    assert looked.answered == []
    assert [(r.ticket, r.next_seq) for r in looked.rerun] == [(2, 1)]


def test_semantic_enabled_without_the_extra_fails_at_start_naming_key_and_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import actors._cache_semantic as glue

    monkeypatch.setattr(glue, "SEMANTIC_MODULE", "actors._no_such_semantic_module")
    config = parse_config({**BASE, "cache": {"semantic": {"enabled": True}}})
    with pytest.raises(QuotaflowError) as err:
        check_cache_config(config)
    assert "cache.semantic.enabled" in str(err.value)
    assert "pip install 'quotaflow[semantic]'" in str(err.value)
    check_cache_config(parse_config(BASE))  # off by default: nothing to load
