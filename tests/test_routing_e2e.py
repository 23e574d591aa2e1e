"""Model selection and cost on the real stack (issue 6): Kafka, Ray, simulator, `quotaflow run`.

The session config carries the models and rules of `tests/_routing_stack.py`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import msgspec
import pytest

from actors._complexity import ComplexityScorer
from actors._routing import worst_case_cost
from pipeline.client import Answer, QuotaflowClient
from tests._routing_stack import ROUTE_PRICES, ROUTING, SAT_LANES, SAT_MODEL
from tests.conftest import Stack
from topics.config import Config
from topics.tokens import estimate_prompt_tokens
from topics.wire import DoneReply, ErrorReply

pytestmark = [pytest.mark.integration]

FAQ = "What are your opening hours on Sunday?"
REASONING = (
    "A train leaves at 3 pm at 60 km/h and a second one at 4 pm at 80 km/h on the same "
    "track. Prove when the second catches up: solve the equation 60 * t = 80 * (t - 1) "
    "step by step, then explain why the answer does not depend on the distance."
)
MAX_TOKENS = 16
ANSWER_TIMEOUT_S = 120.0
# Under the 60 s window: a request still waiting then can never get a slot before it.
SAT_DEADLINE_S = 50.0
SAT_EXTRA = 4
REPORT_TIMEOUT_S = 60.0


def _body(prompt: str, model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def _rule_model(**conditions: Any) -> str:
    """The model of the session's rule with exactly these conditions."""
    for rule in ROUTING["rules"]:
        if {k: v for k, v in rule.items() if k != "model"} == conditions:
            return str(rule["model"])
    raise AssertionError(f"no rule {conditions} in {ROUTING}")


def _price(config: Config, deployment: str) -> tuple[float, float]:
    p = config.deployment(deployment).price
    return p.input_per_mtok, p.output_per_mtok


def _done(answer: Answer) -> DoneReply:
    assert isinstance(answer.terminal, DoneReply), answer.terminal
    return answer.terminal


async def test_auto_routes_by_rules_and_done_names_the_model_and_its_cost(
    stack: Stack, client: QuotaflowClient
) -> None:
    scorer = ComplexityScorer(stack.config.routing.complexity)
    score_rule = _rule_model(min_score=0.4)
    assert scorer.score(_body(REASONING)["messages"]).score >= 0.4
    assert scorer.score(_body(FAQ)["messages"]).score < 0.4
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tier": "premium"}, _rule_model(tier="premium")),
        ({"tier": "economy"}, _rule_model(tier="economy")),
        ({"task": "code"}, _rule_model(task="code")),
        ({}, ROUTING["default_model"]),  # a FAQ without hints
        ({"task": "no-such-task", "tier": "standard"}, ROUTING["default_model"]),
    ]
    asks = [client.ask(_body(FAQ), timeout_s=ANSWER_TIMEOUT_S, **hints) for hints, _ in cases]
    asks.append(client.ask(_body(REASONING), timeout_s=ANSWER_TIMEOUT_S))
    answers = await asyncio.gather(*asks)
    expected = [m for _, m in cases] + [score_rule]
    for answer, model in zip(answers, expected, strict=True):
        done = _done(answer)
        assert done.model == model
        served_by = next(m for m in stack.config.models if m.name == model).deployments
        assert done.deployment in served_by
        assert done.deployment is not None
        inp, out = _price(stack.config, done.deployment)
        cost = (done.usage.prompt_tokens * inp + done.usage.completion_tokens * out) / 1e6
        assert done.usage.prompt_tokens > 0
        assert done.cost_usd == pytest.approx(cost, rel=1e-6, abs=1e-12)


async def test_max_cost_excludes_models_that_could_exceed_it(
    stack: Stack, client: QuotaflowClient
) -> None:
    premium = _rule_model(tier="premium")
    default = ROUTING["default_model"]
    messages = _body(FAQ)["messages"]
    prompt = estimate_prompt_tokens(messages)
    dear = worst_case_cost(stack.config.deployment(premium), prompt, MAX_TOKENS)
    fallback_deps = next(m for m in stack.config.models if m.name == default).deployments
    cheap = max(
        worst_case_cost(stack.config.deployment(d), prompt, MAX_TOKENS) for d in fallback_deps
    )
    assert cheap < dear
    bound = (cheap + dear) / 2
    request = msgspec.structs.replace(client.build(_body(FAQ), tier="premium"), max_cost_usd=bound)
    done = _done(await client.ask(request, timeout_s=ANSWER_TIMEOUT_S))
    assert done.model == default  # the premium rule's model could cost more than the bound
    assert done.cost_usd <= bound

    # A named model whose cheapest deployment exceeds the bound: refused before any call.
    too_low = dear / 2
    request = msgspec.structs.replace(client.build(_body(FAQ, model=premium)), max_cost_usd=too_low)
    answer = await client.ask(request, timeout_s=ANSWER_TIMEOUT_S)
    assert isinstance(answer.terminal, ErrorReply)
    err = answer.terminal.error
    assert err.code == "invalid_request"
    assert err.retryable is False
    assert "max_cost_usd" in err.message
    assert f"${dear:.8f}" in err.message
    assert stack.sim_calls(request.id) == []


@pytest.mark.fresh_quota
async def test_saturation_keeps_both_deployments_busy(
    stack: Stack, client: QuotaflowClient
) -> None:
    """More than both limits at once: each deployment serves its whole limit while the
    rest waits; the rest is never granted a slot before its deadline (under 60 s)."""
    limits = {dep: rpm for dep, _, rpm in SAT_LANES}
    n = sum(limits.values()) + SAT_EXTRA
    # A restarted gateway restores its quota conservatively: it holds what its last
    # checkpoint could have missed for one window span. `fresh_quota` runs this before
    # the tests that restart it; the wait is for a session run in another order.
    give_up = time.monotonic() + 2 * 60 + ANSWER_TIMEOUT_S
    while True:
        deps = (await asyncio.to_thread(stack.status))["quota"]["deployments"]
        if all(deps[d]["rpm"]["used"] == 0 for d in limits):
            break
        assert time.monotonic() < give_up, {d: deps[d]["rpm"] for d in limits}
        await asyncio.sleep(1.0)
    deadline_ms = int((time.time() + SAT_DEADLINE_S) * 1000)
    answers = await asyncio.gather(
        *(
            client.ask(
                _body(f"saturate {i}", model=SAT_MODEL),
                deadline_ms=deadline_ms,
                timeout_s=SAT_DEADLINE_S + ANSWER_TIMEOUT_S,
            )
            for i in range(n)
        )
    )
    served: dict[str | None, int] = {}
    refused: list[str] = []
    for a in answers:
        if isinstance(a.terminal, DoneReply):
            served[a.terminal.deployment] = served.get(a.terminal.deployment, 0) + 1
        else:
            refused.append(a.terminal.error.code)
    stats = stack.sim_stats()["by_key_model"]
    lanes = {dep: stats[f"{env}/sim-small"] for dep, env, _ in SAT_LANES}
    why = (served, refused, lanes)
    assert set(served) == set(limits), why
    for dep, rpm in limits.items():
        # Each deployment served its whole limit while the rest waited: every slot of its
        # window, but one a provider 429 spent (the quota tests assert there are none).
        assert rpm - lanes[dep]["rejected_429"] <= served[dep] <= rpm, why
        assert lanes[dep]["admitted"] == served[dep], why
    assert refused == ["deadline_exceeded"] * (n - sum(served.values())), why
    assert len(refused) >= SAT_EXTRA, why


def _usage_csv(stack: Stack, tenant: str) -> list[dict[str, str]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "usage",
            "--config",
            str(stack.config_path),
            "--tenant",
            tenant,
            "--csv",
            "-",
        ],
        capture_output=True,
        check=False,
        timeout=REPORT_TIMEOUT_S,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return list(csv.DictReader(io.StringIO(out.stdout.decode())))


async def test_usage_report_sums_spend_and_cache_savings_per_model(
    stack: Stack, client: QuotaflowClient
) -> None:
    tenant = f"usage-{uuid.uuid4().hex[:8]}"
    small = _rule_model(tier="economy")
    big = _rule_model(tier="premium")
    spent: list[DoneReply] = []
    for tier, prompt in (("economy", FAQ), ("premium", FAQ), ("premium", REASONING)):
        spent.append(
            _done(
                await client.ask(
                    _body(prompt), tier=tier, tenant=tenant, timeout_s=ANSWER_TIMEOUT_S
                )
            )
        )
    # The same deterministic request again until the cache answers it (entries are
    # stored asynchronously); the misses on the way are spent like any other.
    cached = _body(f"cache me {tenant}", temperature=0)
    hit: DoneReply | None = None
    give_up = time.monotonic() + ANSWER_TIMEOUT_S
    while hit is None:
        assert time.monotonic() < give_up, "no cache hit"
        done = _done(
            await client.ask(cached, tier="economy", tenant=tenant, timeout_s=ANSWER_TIMEOUT_S)
        )
        if done.cache == "miss":
            spent.append(done)
        else:
            hit = done
    assert hit.cost_usd == 0.0
    expect: dict[str, dict[str, float]] = {}
    for d in [*spent, hit]:
        e = expect.setdefault(d.model, {"requests": 0, "cost": 0.0, "prompt": 0, "hits": 0})
        e["requests"] += 1
        e["cost"] += d.cost_usd
        if d.cache == "miss":
            e["prompt"] += d.usage.prompt_tokens
        else:
            e["hits"] += 1
    assert set(expect) == {small, big}

    # The usage records are written with the terminal replies; wait until all are read.
    give_up = time.monotonic() + REPORT_TIMEOUT_S
    while True:
        rows = {r["model"]: r for r in _usage_csv(stack, tenant)}
        total = sum(int(r["requests"]) for r in rows.values())
        if total >= len(spent) + 1 or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.5)
    assert set(rows) == set(expect)
    for model, e in expect.items():
        row = rows[model]
        assert row["tenant"] == tenant
        assert int(row["requests"]) == e["requests"]
        assert int(row["cache_hits"]) == e["hits"]
        assert int(row["prompt_tokens"]) == e["prompt"]
        assert float(row["cost_usd"]) == pytest.approx(e["cost"], rel=1e-6, abs=1e-12)
    inp, out = ROUTE_PRICES[small]
    saved = (hit.usage.prompt_tokens * inp + hit.usage.completion_tokens * out) / 1e6
    assert float(rows[small]["saved_usd"]) == pytest.approx(saved, rel=1e-6)
    assert float(rows[big]["saved_usd"]) == 0.0
