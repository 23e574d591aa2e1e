"""Model selection without Ray: `auto` rules, complexity score, cost bounds, deployment policy."""

from __future__ import annotations

import copy
import typing
from typing import Any

import pytest

from actors._complexity import FEATURES, ComplexityScorer
from actors._messages import DeploymentState, RouteAsk
from actors._routing import Router, worst_case_cost
from topics.config import ComplexityConfig, RoutingTier, parse_config
from topics.errors import ConfigError
from topics.tokens import estimate_prompt_tokens
from topics.wire import Tier


def _dep(name: str, inp: float, out: float) -> dict[str, Any]:
    return {
        "name": name,
        "base_url": "http://127.0.0.1:1/v1",
        "api_key_env": "K",
        "model": f"up-{name}",
        "price": {"input_per_mtok": inp, "output_per_mtok": out},
    }


RULES: list[dict[str, Any]] = [
    {"tier": "premium", "model": "big"},
    {"tier": ["economy"], "model": "small"},
    {"task": "code", "model": "coder"},
    {"task": ["reasoning", "Math"], "model": "big"},
    {"min_score": 0.4, "model": "big"},
    {"min_score": 0.2, "max_score": 0.4, "model": "mid"},
]

RAW: dict[str, Any] = {
    "deployments": [
        _dep("s1", 0.1, 0.4),
        _dep("m1", 0.4, 1.6),
        _dep("b1", 2.0, 8.0),
        _dep("b2", 3.0, 12.0),
        _dep("c1", 1.0, 4.0),
    ],
    "models": [
        {"name": "small", "deployments": ["s1"], "aliases": ["nano"]},
        {"name": "mid", "deployments": ["m1"]},
        {"name": "big", "deployments": ["b1", "b2"], "fallbacks": ["mid"]},
        {"name": "coder", "deployments": ["c1"]},
    ],
    "routing": {"default_model": "nano", "rules": RULES},
    "quota": {"default_max_tokens": 500},
}

FAQ = "What are your opening hours on Sunday?"
CODE = (
    "Why does this raise a TypeError?\n```python\ndef f(x):\n    return x + '1'\n"
    "print(f(2))\n```\nFix it; also add a unit test."
)
REASONING = (
    "A train leaves at 3 pm at 60 km/h and a second one at 4 pm at 80 km/h on the same "
    "track. Prove when the second catches up: solve the equation 60 * t = 80 * (t - 1) "
    "step by step, then explain why the answer does not depend on the distance."
)


def _router(raw: dict[str, Any] | None = None) -> Router:
    return Router(parse_config(copy.deepcopy(raw or RAW)))


def _ask(
    content: str = FAQ,
    *,
    model: str = "auto",
    ticket: int = 1,
    tier: str | None = None,
    task: str | None = None,
    max_tokens: int = 0,
    max_cost_usd: float | None = None,
    avoid: tuple[str, ...] = (),
) -> RouteAsk:
    return RouteAsk(
        ticket,
        model,
        "t",
        tier,
        task,
        avoid=avoid,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        max_cost_usd=max_cost_usd,
    )


def _model(router: Router, ask: RouteAsk) -> str | None:
    return router.route([ask])[0].model


# -- rules ------------------------------------------------------------------------------


def test_each_hint_rule_routes_to_its_model() -> None:
    router = _router()
    assert _model(router, _ask(tier="premium")) == RULES[0]["model"]
    assert _model(router, _ask(tier="economy")) == RULES[1]["model"]
    assert _model(router, _ask(task="code")) == RULES[2]["model"]
    assert _model(router, _ask(task="reasoning")) == RULES[3]["model"]
    # Task hints compare case-insensitively, both ways.
    assert _model(router, _ask(task="MATH")) == RULES[3]["model"]


def test_score_rules_route_by_the_prompts_score() -> None:
    router = _router()
    for prompt in (FAQ, CODE, REASONING):
        ask = _ask(prompt)
        score = router.complexity(ask).score
        expected = next(
            (
                r["model"]
                for r in RULES
                if "min_score" in r
                and score >= r["min_score"]
                and score < r.get("max_score", float("inf"))
            ),
            "small",  # the default model (configured by its alias)
        )
        assert _model(router, ask) == expected, (prompt, score)
    # The three prompts land in the three score bands, so each score rule is exercised.
    scores = [router.complexity(_ask(p)).score for p in (FAQ, CODE, REASONING)]
    assert scores[0] < 0.2 <= scores[1] < 0.4 <= scores[2]


def test_first_matching_rule_wins() -> None:
    router = _router()
    # premium (rule 0) before code (rule 2); code (rule 2) before the score rules.
    assert _model(router, _ask(CODE, tier="premium", task="code")) == "big"
    assert _model(router, _ask(REASONING, task="code")) == "coder"


@pytest.mark.parametrize(
    ("tier", "task"),
    [(None, None), ("standard", None), (None, "unheard-of-task"), ("standard", "poetry")],
)
def test_unmatched_hints_fall_back_to_the_default_model(tier: str | None, task: str | None) -> None:
    route = _router().route([_ask(FAQ, tier=tier, task=task)])[0]
    assert route.model == "small"  # routing.default_model "nano" is small's alias
    assert route.candidates == ("s1",)
    assert route.served == ("small",)


def test_without_rules_auto_is_the_default_model_or_the_first_model() -> None:
    raw = copy.deepcopy(RAW)
    raw["routing"] = {}
    assert _model(_router(raw), _ask(REASONING, tier="premium")) == raw["models"][0]["name"]
    raw["routing"] = {"default_model": "coder"}
    assert _model(_router(raw), _ask(REASONING, tier="premium")) == "coder"


def test_named_models_ignore_rules_and_unknown_names_are_errors() -> None:
    router = _router()
    assert _model(router, _ask(REASONING, model="nano", tier="premium")) == "small"
    r = router.route([_ask(model="gpt-9")])[0]
    assert r.error == "unknown_model"
    assert r.message is not None
    assert "'gpt-9'" in r.message


# -- complexity score ---------------------------------------------------------------------


def test_score_is_the_capped_weighted_sum_of_its_features() -> None:
    cfg = ComplexityConfig()
    scorer = ComplexityScorer(cfg)
    w = cfg.weights
    for prompt in (FAQ, CODE, REASONING, CODE + REASONING * 3):
        c = scorer.score([{"role": "user", "content": prompt}])
        assert set(c.features) == set(FEATURES)
        total = sum(getattr(w, f) * c.features[f] for f in FEATURES)
        assert c.score == pytest.approx(min(1.0, total), abs=1e-5)


def test_features_follow_their_definitions() -> None:
    cfg = ComplexityConfig(length_full_tokens=100, turns_full=4, cue_full=2)
    scorer = ComplexityScorer(cfg)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "```def x(): ...``` prove solve"},  # not user text
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "```a``` and ```b```"}]},
    ]
    f = scorer.score(messages).features
    assert f["length"] == pytest.approx(estimate_prompt_tokens(messages) / 100, abs=1e-5)
    assert f["turns"] == pytest.approx((2 - 1) / (4 - 1), abs=1e-5)
    assert f["code"] == 1.0  # 4 fences >= cue_full 2
    assert f["math"] == 0.0  # the system prompt's cues do not count
    many_turns = [{"role": "user", "content": "x"}] * 10
    assert scorer.score(many_turns).features["turns"] == 1.0
    long_prompt = [{"role": "user", "content": "word " * 1000}]
    assert scorer.score(long_prompt).features["length"] == 1.0


def test_weights_and_cues_are_configurable() -> None:
    raw = copy.deepcopy(RAW)
    raw["routing"]["complexity"] = {
        "weights": {"length": 0, "code": 0, "math": 0, "multi_step": 0, "turns": 0},
    }
    assert _router(raw).complexity(_ask(REASONING)).score == 0.0
    raw["routing"]["complexity"] = {
        "weights": {"length": 0, "code": 1, "math": 0, "multi_step": 0, "turns": 0},
        "code_cues": [r"(?i)\bparcel\b"],
        "cue_full": 1,
    }
    router = _router(raw)
    assert router.complexity(_ask("Where is my parcel?")).score == 1.0
    assert _model(router, _ask("Where is my parcel?")) == "big"  # min_score 0.4 rule
    assert router.complexity(_ask(CODE)).score == 0.0


# -- max_cost_usd -----------------------------------------------------------------------


def _worst(router: Router, dep: str, ask: RouteAsk) -> float:
    d = router.deployment(dep)
    prompt = router.count_prompt(ask.messages, d.model)
    return worst_case_cost(d, prompt, ask.max_tokens or router.default_max_tokens)


def test_max_cost_excludes_deployments_and_models_that_could_exceed_it() -> None:
    router = _router()
    probe = _ask(REASONING, tier="premium", max_tokens=400)
    b1, b2, m1, s1 = (_worst(router, d, probe) for d in ("b1", "b2", "m1", "s1"))
    assert s1 < m1 < b1 < b2
    # Between b1 and b2: big stays, without its dearer deployment.
    r = router.route([_ask(REASONING, tier="premium", max_tokens=400, max_cost_usd=b1)])[0]
    assert (r.model, r.candidates) == ("big", ("b1",))
    # Below b1: big is out; the premium rule is skipped, and so is every later rule
    # naming big (the score rule): the default model serves.
    r = router.route([_ask(REASONING, tier="premium", max_tokens=400, max_cost_usd=m1)])[0]
    assert (r.model, r.candidates) == ("small", ("s1",))


def test_max_cost_uses_default_max_tokens_when_the_request_sets_none() -> None:
    router = _router()
    probe = _ask(FAQ, model="big")  # max_tokens 0 -> quota.default_max_tokens
    cost = _worst(router, "b1", probe)
    assert cost == pytest.approx(
        worst_case_cost(
            router.deployment("b1"),
            router.count_prompt(probe.messages, "up-b1"),
            RAW["quota"]["default_max_tokens"],
        )
    )
    assert router.route([_ask(FAQ, model="big", max_cost_usd=cost)])[0].candidates == ("b1",)


def test_auto_takes_the_cheapest_fitting_model_when_no_rule_or_default_fits() -> None:
    raw = copy.deepcopy(RAW)
    raw["routing"]["default_model"] = "big"
    router = _router(raw)
    probe = _ask(FAQ, max_tokens=100)
    m1 = _worst(router, "m1", probe)
    r = router.route([_ask(FAQ, max_tokens=100, max_cost_usd=m1)])[0]
    assert r.model == "small"  # cheapest of all, and it fits


def test_a_named_model_that_cannot_fit_the_bound_is_an_invalid_request() -> None:
    router = _router()
    probe = _ask(CODE, model="big", max_tokens=300)
    cheapest = _worst(router, "b1", probe)
    r = router.route([_ask(CODE, model="big", max_tokens=300, max_cost_usd=cheapest / 2)])[0]
    assert r.error == "invalid_request"
    assert r.model is None
    assert r.message is not None
    assert "max_cost_usd" in r.message
    assert f"${cheapest:.8f}" in r.message
    assert "'b1'" in r.message


def test_auto_with_a_bound_below_every_model_names_the_cheapest() -> None:
    router = _router()
    probe = _ask(FAQ, max_tokens=50)
    cheapest = min(_worst(router, d, probe) for d in ("s1", "m1", "b1", "b2", "c1"))
    r = router.route([_ask(FAQ, max_tokens=50, max_cost_usd=cheapest * 0.99)])[0]
    assert r.error == "invalid_request"
    assert r.message is not None
    assert f"${cheapest:.8f}" in r.message
    assert "'small'" in r.message
    assert "'s1'" in r.message


def test_fallbacks_keep_the_cost_bound() -> None:
    raw = copy.deepcopy(RAW)
    raw["deployments"][1] = _dep("m1", 10.0, 40.0)  # big's fallback `mid`, now the dearest
    router = _router(raw)
    open_big = {
        "b1": DeploymentState(headroom=1.0, breaker="open"),
        "b2": DeploymentState(headroom=1.0, breaker="open"),
    }
    router.update_state(open_big)
    r = router.route([_ask(FAQ, model="big", max_tokens=100)])[0]
    assert (r.model, r.candidates) == ("mid", ("m1",))  # no bound: the fallback serves
    b1 = _worst(router, "b1", _ask(FAQ, model="big", max_tokens=100))
    r = router.route([_ask(FAQ, model="big", max_tokens=100, max_cost_usd=b1)])[0]
    # The fallback could exceed the bound: only big's fitting deployment is left, to wait.
    assert (r.model, r.candidates) == ("big", ("b1",))


# -- deployment policy --------------------------------------------------------------------

POOL: dict[str, Any] = {
    "deployments": [_dep("d1", 1.0, 1.0), _dep("d2", 1.0, 1.0), _dep("d3", 1.0, 1.0)],
    "models": [{"name": "pool", "deployments": ["d1", "d2", "d3"]}],
}


def _pool(policy: dict[str, float] | None = None, prices: dict[str, float] | None = None) -> Router:
    raw = copy.deepcopy(POOL)
    for d in raw["deployments"]:
        if prices and d["name"] in prices:
            d["price"] = {"input_per_mtok": prices[d["name"]], "output_per_mtok": prices[d["name"]]}
    if policy is not None:
        raw["routing"] = {"deployment": policy}
    return Router(parse_config(raw))


def _order(router: Router) -> tuple[str, ...]:
    return router.route([RouteAsk(1, "pool", "t")])[0].candidates


def test_ties_keep_the_config_order_and_headroom_ranks() -> None:
    router = _pool()
    assert _order(router) == ("d1", "d2", "d3")
    router.update_headroom({"d1": 0.1, "d2": 0.5, "d3": 0.9})
    assert _order(router) == ("d3", "d2", "d1")


def test_lower_ttft_ranks_first_at_equal_headroom_and_unmeasured_counts_as_fastest() -> None:
    router = _pool()
    router.update_state(
        {
            "d1": DeploymentState(headroom=0.8, ttft_ewma_ms=400.0),
            "d2": DeploymentState(headroom=0.8, ttft_ewma_ms=100.0),
            "d3": DeploymentState(headroom=0.8, ttft_ewma_ms=None),
        }
    )
    assert _order(router) == ("d2", "d3", "d1")


def test_headroom_outweighs_latency_by_the_configured_weights() -> None:
    state = {
        "d1": DeploymentState(headroom=0.9, ttft_ewma_ms=200.0),
        "d2": DeploymentState(headroom=0.5, ttft_ewma_ms=100.0),
        "d3": DeploymentState(headroom=0.0, ttft_ewma_ms=100.0),
    }
    # latency term: d1 100/200 = 0.5, d2 and d3 1.0. With weights 1/0.5: d1 0.9 + 0.25,
    # d2 0.5 + 0.5; with latency weight 1: d1 0.9 + 0.5, d2 0.5 + 1.0.
    default = _pool()
    default.update_state(state)
    assert _order(default)[:2] == ("d1", "d2")
    latency_first = _pool({"headroom": 1.0, "latency": 1.0, "price": 0.0})
    latency_first.update_state(state)
    assert _order(latency_first)[:2] == ("d2", "d1")


def test_cheaper_deployments_rank_first_at_equal_state() -> None:
    router = _pool(prices={"d1": 3.0, "d2": 1.0, "d3": 2.0})
    assert _order(router) == ("d2", "d3", "d1")
    assert _order(_pool({"price": 0.0}, prices={"d1": 3.0, "d2": 1.0, "d3": 2.0})) == (
        "d1",
        "d2",
        "d3",
    )


def test_half_open_breakers_rank_after_closed_ones_and_open_ones_are_left_out() -> None:
    router = _pool()
    router.update_state(
        {
            "d1": DeploymentState(headroom=1.0, breaker="half_open"),
            "d2": DeploymentState(headroom=0.9),
            "d3": DeploymentState(headroom=1.0, breaker="open"),
        }
    )
    assert _order(router) == ("d2", "d1")


def test_avoided_and_exhausted_deployments_are_left_out_while_others_are_healthy() -> None:
    router = _pool()
    router.update_state({"d2": DeploymentState(headroom=1.0, exhausted=True)})
    r = router.route([RouteAsk(1, "pool", "t", avoid=("d1",))])[0]
    assert r.candidates == ("d3",)
    # Nothing healthy: every deployment, healthy-but-avoided first.
    router.update_state(
        {
            "d2": DeploymentState(headroom=1.0, exhausted=True),
            "d3": DeploymentState(headroom=1.0, breaker="open"),
        }
    )
    r = router.route([RouteAsk(1, "pool", "t", avoid=("d1",))])[0]
    assert r.candidates[0] == "d1"
    assert set(r.candidates) == {"d1", "d2", "d3"}


# -- config -----------------------------------------------------------------------------


def test_routing_tier_values_are_the_wire_tiers() -> None:
    assert typing.get_args(RoutingTier) == typing.get_args(Tier)


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ({"rules": [{"tier": "premium", "model": "gpt-9"}]}, "routing.rules[0].model: 'gpt-9'"),
        ({"default_model": "nope"}, "routing.default_model: 'nope'"),
        ({"rules": [{"model": "big"}]}, "sets no condition"),
        ({"rules": [{"task": [], "model": "big"}]}, "never matches"),
        ({"rules": [{"min_score": 0.5, "max_score": 0.5, "model": "big"}]}, "must be below"),
        ({"rules": [{"tier": "gold", "model": "big"}]}, "key path routing.rules[0].tier"),
        ({"rules": [{"min_score": 1.5, "model": "big"}]}, "routing.rules[0].min_score"),
        ({"complexity": {"code_cues": ["("]}}, "code_cues[0]: '(' is not a valid regex"),
        ({"complexity": {"turns_full": 1}}, "routing.complexity.turns_full"),
        ({"deployment": {"latency": -1}}, "routing.deployment.latency"),
        ({"strategy": "x"}, "key path routing.strategy"),
    ],
)
def test_routing_config_errors_name_the_key(routing: dict[str, Any], expected: str) -> None:
    raw = copy.deepcopy(RAW)
    raw["routing"] = routing
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert expected in str(err.value)
