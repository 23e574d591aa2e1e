"""The cache on the real stack (issue 5): Kafka, Ray, simulator, `quotaflow run`.

The exact cache runs on the session gateway (lane of `tests/_cache_stack.py`). The
semantic cache needs the optional extra (`quotaflow[semantic]`: the embedding model), so
its tests run against a second gateway of their own, in the session's Ray cluster but in
a namespace, consumer group and topics of its own, with `cache.semantic` enabled; they
are skipped, saying why, when the extra is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors._cache_keys import cache_key, tenant_scope
from actors.cache import shard_of
from pipeline.client import Answer, QuotaflowClient
from pipeline.stack import GatewayProcess, write_config
from tests._cache_stack import CACHE_KEY_ENV, CACHE_MODEL, CACHE_TTL_S, TTL_MODEL
from tests.conftest import Stack
from topics.config import Config
from topics.wire import CompletionReply, DoneReply, ResetReply

pytestmark = [pytest.mark.integration]

MAX_TOKENS = 16
ANSWER_TIMEOUT_S = 120.0
# A shard killed with SIGKILL is back (restarted by Ray, its entries restored) within this.
RESTART_TIMEOUT_S = 120.0
# How often a condition is looked at again while waiting for it.
POLL_S = 0.5
# Identical requests sent at once for the single-flight test.
FLIGHT_N = 8
# The semantic gateway loads the embedding model in each shard before it is ready.
SEMANTIC_READY_TIMEOUT_S = 600.0
SEMANTIC_THRESHOLD = 0.9


def _body(prompt: str, model: str = CACHE_MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def _done(answer: Answer) -> DoneReply:
    assert isinstance(answer.terminal, DoneReply), answer.terminal
    return answer.terminal


def _calls(stack: Stack, ids: set[str]) -> list[dict[str, Any]]:
    """The simulator's calls on the cache lane's key for these request ids."""
    return [
        rec
        for rec in stack.sim_log_records()
        if rec.get("client_request_id") in ids and rec.get("key") == CACHE_KEY_ENV
    ]


async def _ask(client: QuotaflowClient, body: dict[str, Any], **fields: Any) -> Answer:
    return await client.ask(body, timeout_s=ANSWER_TIMEOUT_S, **fields)


def _unique(what: str) -> str:
    return f"{what} #{uuid.uuid4().hex[:10]}"


# -- exact ---------------------------------------------------------------------------------


async def test_exact_hit_replays_the_answer_without_an_upstream_call(
    stack: Stack, client: QuotaflowClient
) -> None:
    body = _body(_unique("How do I reset my password?"), stream=True)
    first = await _ask(client, body)
    assert _done(first).cache == "miss"
    assert len(_calls(stack, {first.id})) == 1
    # The same question again, not streamed this time: the same answer, as a completion.
    second = await _ask(client, {**body, "stream": False}, metadata={"trace": "t-2"})
    done = _done(second)
    assert (done.cache, done.cost_usd, done.deployment, done.attempts) == ("exact", 0.0, None, 0)
    assert done.model == CACHE_MODEL
    assert done.metadata == {"trace": "t-2"}
    assert second.text == first.text
    assert done.usage == _done(first).usage
    assert [type(r) for r in second.replies] == [CompletionReply, DoneReply]
    assert _calls(stack, {second.id}) == []


async def test_a_resent_hit_is_answered_from_the_cache_again(
    stack: Stack, client: QuotaflowClient
) -> None:
    # A hit leaves its id's idempotency record `running` (no run stored a result); a
    # resend continues past the first answer's seqs and is looked up, not run upstream.
    body = _body(_unique("Where is my parcel?"))
    first = await _ask(client, body)
    assert _done(first).cache == "miss"
    request = client.build(body)
    hit = await client.ask(request, timeout_s=ANSWER_TIMEOUT_S)
    assert _done(hit).cache == "exact"
    again = await client.ask(request, timeout_s=ANSWER_TIMEOUT_S)
    assert _done(again).cache == "exact"
    assert isinstance(again.replies[0], ResetReply)
    assert again.text == first.text
    assert min(r.seq for r in again.replies) > max(r.seq for r in hit.replies)
    assert _calls(stack, {request.id}) == []


async def test_no_hit_across_tenants_and_bypass_skips_the_cache_both_ways(
    stack: Stack, client: QuotaflowClient
) -> None:
    body = _body(_unique("What are your opening hours?"))
    stored = await _ask(client, body, tenant="acme")
    assert _done(stored).cache == "miss"
    assert _done(await _ask(client, body, tenant="acme", cache="exact")).cache == "exact"
    other = await _ask(client, body, tenant="globex")
    assert _done(other).cache == "miss"
    assert len(_calls(stack, {other.id})) == 1
    bypassed = await _ask(client, body, tenant="acme", cache="bypass")
    assert _done(bypassed).cache == "miss"
    assert len(_calls(stack, {bypassed.id})) == 1
    # A bypassed answer is not stored either.
    fresh = _body(_unique("Do you ship abroad?"))
    await _ask(client, fresh, tenant="acme", cache="bypass")
    after = await _ask(client, fresh, tenant="acme")
    assert _done(after).cache == "miss"
    assert len(_calls(stack, {after.id})) == 1


async def test_sampled_requests_are_not_cached(stack: Stack, client: QuotaflowClient) -> None:
    body = _body(_unique("Tell me a story"), temperature=0.9)
    answers = [await _ask(client, body) for _ in range(2)]
    assert [_done(a).cache for a in answers] == ["miss", "miss"]
    assert len(_calls(stack, {a.id for a in answers})) == 2


async def test_single_flight_identical_requests_make_one_upstream_call(
    stack: Stack, client: QuotaflowClient
) -> None:
    body = _body(_unique("Summarise our refund policy"), stream=True)
    answers = await asyncio.gather(*(_ask(client, body) for _ in range(FLIGHT_N)))
    ids = {a.id for a in answers}
    assert len(ids) == FLIGHT_N
    assert len(_calls(stack, ids)) == 1
    caches = sorted(_done(a).cache for a in answers)
    assert caches == ["exact"] * (FLIGHT_N - 1) + ["miss"]
    assert {a.text for a in answers} == {answers[0].text}


async def test_entries_expire_after_their_models_ttl(stack: Stack, client: QuotaflowClient) -> None:
    assert stack.config.cache.ttl_s_by_model[TTL_MODEL] == CACHE_TTL_S
    body = _body(_unique("Is the shop open today?"), model=TTL_MODEL)
    first = await _ask(client, body)
    assert _done(first).cache == "miss"
    assert _done(await _ask(client, body)).cache == "exact"
    # Ask again until the entry has expired: the answer comes from upstream again.
    give_up = time.monotonic() + CACHE_TTL_S + ANSWER_TIMEOUT_S
    while True:
        again = await _ask(client, body)
        if _done(again).cache == "miss":
            break
        assert time.monotonic() < give_up, "the entry never expired"
        await asyncio.sleep(POLL_S)
    assert len(_calls(stack, {first.id, again.id})) == 2


def _tenant_used(status: dict[str, Any], tenant: str) -> dict[str, Any]:
    t: dict[str, Any] = status["quota"]["tenants"].get(tenant, {})
    return {k: t.get(k) for k in ("day_used_tokens", "day_used_usd", "month_used_usd")}


async def test_hits_spend_no_quota(stack: Stack, client: QuotaflowClient) -> None:
    tenant = f"frugal-{uuid.uuid4().hex[:8]}"
    body = _body(_unique("Where is my order?"))
    assert _done(await _ask(client, body, tenant=tenant)).cache == "miss"
    # The miss is settled (its real tokens counted) on the caller's next flush.
    give_up = time.monotonic() + ANSWER_TIMEOUT_S
    while not (before := _tenant_used(await asyncio.to_thread(stack.status), tenant))[
        "day_used_tokens"
    ]:
        assert time.monotonic() < give_up, "the miss was never settled"
        await asyncio.sleep(POLL_S)
    hits = [await _ask(client, body, tenant=tenant) for _ in range(3)]
    assert [_done(h).cache for h in hits] == ["exact"] * 3
    after = _tenant_used(await asyncio.to_thread(stack.status), tenant)
    assert after == before


def _shard_stats(status: dict[str, Any], shard: int) -> dict[str, Any]:
    stats: dict[str, Any] = status["caches"][shard]
    return stats


async def test_a_killed_shard_comes_back_with_its_entries(
    stack: Stack, client: QuotaflowClient
) -> None:
    tenant = f"durable-{uuid.uuid4().hex[:8]}"
    body = _body(_unique("How long does delivery take?"))
    request = client.build(body, tenant=tenant)
    first = await _ask(client, request)
    assert _done(first).cache == "miss"
    assert _done(await _ask(client, body, tenant=tenant)).cache == "exact"
    cfg = stack.config.cache
    key = cache_key(request, CACHE_MODEL, scope=tenant_scope(tenant, cfg))
    shard = shard_of(key, cfg.shards)
    # Wait until the shard's changelog writes are acknowledged, then kill its process.
    give_up = time.monotonic() + RESTART_TIMEOUT_S
    while (stats := _shard_stats(await asyncio.to_thread(stack.status), shard))["writes_pending"]:
        assert time.monotonic() < give_up, f"writes never acknowledged: {stats}"
        await asyncio.sleep(POLL_S)
    assert stats["entries"] >= 1
    os.kill(stats["pid"], signal.SIGKILL)
    give_up = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        try:
            reborn = _shard_stats(await asyncio.to_thread(stack.status), shard)
        except AssertionError:  # the status call may fail while Ray restarts the shard
            reborn = {}
        if reborn.get("pid") not in (None, stats["pid"]) and "error" not in reborn:
            break
        assert time.monotonic() < give_up, f"shard {shard} did not come back: {reborn}"
        await asyncio.sleep(POLL_S)
    assert reborn["incarnation"] != stats["incarnation"]
    assert reborn["restored"] >= 1
    after = await _ask(client, body, tenant=tenant)
    assert _done(after).cache == "exact"
    assert after.text == first.text
    assert _calls(stack, {after.id}) == []


# -- semantic (its own gateway) --------------------------------------------------------------


def _semantic_missing() -> str | None:
    """Why the semantic cache cannot run here, or None."""
    try:
        from actors._semantic import model_file

        model_file()
    except ImportError as exc:
        return f"the semantic extra is not installed (pip install 'quotaflow[semantic]'): {exc}"
    except Exception as exc:  # noqa: BLE001 - SemanticUnavailable and kin: say what it said
        return f"the semantic extra is not usable: {exc}"
    return None


@dataclass(frozen=True)
class SemanticStack:
    config: Config
    client: QuotaflowClient
    config_path: Path
    ray_address: str

    def entries(self) -> int:
        """Questions held by the semantic index of every shard (`quotaflow status`)."""
        out = subprocess.run(
            [
                *(sys.executable, "-m", "pipeline.cli", "status"),
                *("--config", str(self.config_path), "--once", "--json"),
            ],
            env={**os.environ, "RAY_ADDRESS": self.ray_address},
            capture_output=True,
            check=True,
            timeout=120,
        )
        shards = json.loads(out.stdout)["caches"]
        return sum(int((c.get("semantic") or {}).get("entries", 0)) for c in shards)


@pytest.fixture(scope="module")
async def semantic(stack: Stack, stack_dir: Path) -> AsyncIterator[SemanticStack]:
    """A second `quotaflow run` with the semantic cache on, joined to the session's Ray."""
    reason = _semantic_missing()
    if reason is not None:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:8]
    raw: dict[str, Any] = yaml.safe_load(stack.config_path.read_text())
    raw["topics"] = {
        "requests": f"semtest-{tag}.requests",
        "responses": f"semtest-{tag}.responses",
        "dlq": f"semtest-{tag}.dlq",
        "usage": f"semtest-{tag}.usage",
        "events": f"semtest-{tag}.events",
        "internal_prefix": f"semtest-{tag}-state.",
    }
    raw["kafka"]["group_id"] = f"semtest-{tag}"
    raw["gateway"]["ray_namespace"] = f"semtest-{tag}"
    raw["metrics"] = {"enabled": False}
    # Cosine alone (the verifier's own tests are tests/test_semantic.py): the pairs below
    # are far from the threshold either way, so the outcome depends on the pipeline only.
    raw["cache"] = {
        "semantic": {
            "enabled": True,
            "threshold": SEMANTIC_THRESHOLD,
            "verifier_min_probability": 0.0,
            "shared_tenants": ["shared-a", "shared-b"],
        }
    }
    path = stack_dir / f"semantic-{tag}.yaml"
    config = write_config(raw, path)
    gateway = GatewayProcess(
        path, stack_dir / f"semantic-{tag}.log", env={"RAY_ADDRESS": stack.ray_address()}
    )
    await gateway.start(ready_timeout_s=SEMANTIC_READY_TIMEOUT_S)
    try:
        async with QuotaflowClient(
            stack.bootstrap,
            requests_topic=config.topics.requests,
            reply_topic=config.topics.responses,
        ) as sem_client:
            yield SemanticStack(config, sem_client, path, stack.ray_address())
    finally:
        code = await gateway.stop()
        assert code == 0, f"semantic gateway exited with {code}; see {gateway.log_path}"


QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
UNRELATED = "What time does the store open on Sundays?"
SYSTEM = {"role": "system", "content": "You are the help desk of a bank."}


def _sem_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": CACHE_MODEL,
        "messages": [SYSTEM, {"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


async def _sem_ask(s: SemanticStack, text: str, **fields: Any) -> Answer:
    return await s.client.ask(_sem_body(text), timeout_s=ANSWER_TIMEOUT_S, **fields)


async def _sem_store(s: SemanticStack, text: str, **fields: Any) -> Answer:
    """Ask (a miss), then wait until the answer is in the semantic index: the caller hands
    it to the shard after the `done` reply, and the shard embeds it first."""
    before = await asyncio.to_thread(s.entries)
    answer = await _sem_ask(s, text, **fields)
    assert _done(answer).cache == "miss"
    give_up = time.monotonic() + ANSWER_TIMEOUT_S
    while await asyncio.to_thread(s.entries) <= before:
        assert time.monotonic() < give_up, "the answer never reached the semantic index"
        await asyncio.sleep(0.2)
    return answer


async def test_semantic_hit_above_the_threshold_and_miss_below(
    stack: Stack, semantic: SemanticStack
) -> None:
    tenant = f"sem-{uuid.uuid4().hex[:8]}"
    stored = await _sem_store(semantic, QUESTION, tenant=tenant)
    hit = await _sem_ask(semantic, PARAPHRASE, tenant=tenant)
    done = _done(hit)
    assert (done.cache, done.cost_usd, done.deployment) == ("semantic", 0.0, None)
    assert hit.text == stored.text  # the stored question's answer, not a fresh one
    assert _calls(stack, {hit.id}) == []
    miss = await _sem_ask(semantic, UNRELATED, tenant=tenant)
    assert _done(miss).cache == "miss"
    assert len(_calls(stack, {miss.id})) == 1
    # A different system prompt is another scope: no semantic hit there.
    other = await semantic.client.ask(
        {**_sem_body(PARAPHRASE), "messages": [{"role": "user", "content": PARAPHRASE}]},
        tenant=tenant,
        timeout_s=ANSWER_TIMEOUT_S,
    )
    assert _done(other).cache == "miss"


async def test_semantic_hits_stay_within_a_tenant_or_its_shared_scope(
    semantic: SemanticStack,
) -> None:
    mine = f"sem-{uuid.uuid4().hex[:8]}"
    await _sem_store(semantic, QUESTION, tenant=mine)
    theirs = await _sem_ask(semantic, PARAPHRASE, tenant=f"sem-{uuid.uuid4().hex[:8]}")
    assert _done(theirs).cache == "miss"
    text = _unique(QUESTION)
    await _sem_store(semantic, text, tenant="shared-a")
    shared = await _sem_ask(semantic, text.replace("do I", "can I"), tenant="shared-b")
    assert _done(shared).cache == "semantic"


async def test_exact_mode_forbids_semantic_hits(semantic: SemanticStack) -> None:
    tenant = f"sem-{uuid.uuid4().hex[:8]}"
    await _sem_store(semantic, QUESTION, tenant=tenant)
    strict = await _sem_ask(semantic, PARAPHRASE, tenant=tenant, cache="exact")
    assert _done(strict).cache == "miss"
    # The exact entry itself is still served in exact mode.
    assert _done(await _sem_ask(semantic, QUESTION, tenant=tenant, cache="exact")).cache == "exact"
