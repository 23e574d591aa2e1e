"""Model selection logic: public name, alias or `auto` -> model (+ fallbacks) -> deployments.

`auto` goes through `routing.rules` in order: the first rule whose conditions (tier hint,
task hint, complexity score) all hold names the model; none holding, `routing.default_model`
(default: the first model). A request's `max_cost_usd` excludes every deployment whose
worst case (prompt estimate + max_tokens at its prices) exceeds it, and with it every
model left without one: `auto` then takes the next matching rule, the default model, or
the cheapest model that fits; a named model that cannot fit is answered `invalid_request`.

Within a model, deployments are ordered by `routing.deployment` (headroom, TTFT EWMA,
price, half-open penalty; ties keep the config's order); the quota actor grants the first
with room, so a full deployment spills to the next and none idles while requests wait.
A deployment whose breaker is open, that is exhausted, or that just failed this request
(`RouteAsk.avoid`) is not a candidate while the model has a healthy one; when it has none,
the request falls through to the model's `fallbacks`, in order. When no model of the
chain has a healthy deployment, every deployment is a candidate (unhealthy ones last), so
the request waits for quota or a half-open probe instead of failing at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from actors._complexity import Complexity, ComplexityScorer
from actors._messages import DeploymentState, Route, RouteAsk
from topics.config import Config, Deployment, Model, RoutingRule
from topics.tokens import PromptCounter, estimate_prompt_tokens

__all__ = ["AUTO", "Router", "worst_case_cost"]

AUTO = "auto"
# Float slack when comparing a worst case with max_cost_usd (sums of per-token prices).
_COST_EPSILON_USD = 1e-12
# A TTFT below this counts as this (a 0 ms EWMA would make every other deployment "slow").
_MIN_TTFT_MS = 1.0


def worst_case_cost(deployment: Deployment, prompt_tokens: int, max_tokens: int) -> float:
    """USD if the prompt is charged in full at the input price and max_tokens are produced."""
    p = deployment.price
    return (prompt_tokens * p.input_per_mtok + max_tokens * p.output_per_mtok) / 1e6


class _Rule:
    """A config rule with its tier/task sets precomputed."""

    __slots__ = ("max_score", "min_score", "model", "tasks", "tiers")

    def __init__(self, rule: RoutingRule, model: Model) -> None:
        self.model = model
        self.tiers = rule.tiers
        self.tasks = rule.tasks
        self.min_score = rule.min_score
        self.max_score = rule.max_score

    @property
    def scored(self) -> bool:
        return self.min_score is not None or self.max_score is not None

    def matches(self, ask: RouteAsk, score: Callable[[], float]) -> bool:
        if self.tiers is not None and ask.tier not in self.tiers:
            return False
        if self.tasks is not None and (ask.task is None or ask.task.lower() not in self.tasks):
            return False
        if self.scored:
            s = score()
            if self.min_score is not None and s < self.min_score:
                return False
            if self.max_score is not None and s >= self.max_score:
                return False
        return True


class _Costs:
    """Worst-case cost of one request per deployment (prompt counted once per upstream model)."""

    def __init__(self, router: Router, ask: RouteAsk) -> None:
        self._router = router
        self._ask = ask
        self.max_cost = ask.max_cost_usd
        self.max_tokens = ask.max_tokens if ask.max_tokens > 0 else router.default_max_tokens
        self._prompt: dict[str, int] = {}
        # For ranking by price: the character estimate (no tokenizer needed).
        self.estimate = estimate_prompt_tokens(ask.messages) if ask.messages else None

    def prompt_tokens(self, deployment: Deployment) -> int:
        found = self._prompt.get(deployment.model)
        if found is None:
            found = self._router.count_prompt(self._ask.messages, deployment.model)
            self._prompt[deployment.model] = found
        return found

    def of(self, name: str) -> float:
        dep = self._router.deployment(name)
        return worst_case_cost(dep, self.prompt_tokens(dep), self.max_tokens)

    def fits(self, name: str) -> bool:
        return self.max_cost is None or self.of(name) <= self.max_cost + _COST_EPSILON_USD

    def model_fits(self, model: Model) -> bool:
        return any(self.fits(d) for d in model.deployments)

    def cheapest(self, models: Iterable[Model]) -> tuple[float, Model, str]:
        return min(
            ((self.of(d), m, d) for m in models for d in m.deployments),
            key=lambda c: c[0],
        )

    def describe(self, model: Model, deployment: str) -> str:
        dep = self._router.deployment(deployment)
        return (
            f"model {model.name!r} on deployment {deployment!r}: prompt estimate "
            f"{self.prompt_tokens(dep)} + max_tokens {self.max_tokens} tokens at "
            f"${dep.price.input_per_mtok}/${dep.price.output_per_mtok} per Mtok in/out"
        )


class Router:
    """Resolves names, applies the `auto` rules and cost bounds, follows fallback chains,
    orders deployments by live state (what the model selectors run, without Ray)."""

    def __init__(self, config: Config) -> None:
        self._by_name: dict[str, Model] = {}
        for m in config.models:
            for name in (m.name, *m.aliases):
                self._by_name[name] = m
        self._models = {m.name: m for m in config.models}
        routing = config.routing
        self._policy = routing.deployment
        self._default = (
            self._by_name[routing.default_model]
            if routing.default_model is not None
            else config.models[0]
        )
        self._rules = [_Rule(r, self._by_name[r.model]) for r in routing.rules]
        self._scorer = ComplexityScorer(routing.complexity)
        self._deployments = {d.name: d for d in config.deployments}
        self.default_max_tokens = config.quota.default_max_tokens
        self._counter: PromptCounter | None = None
        self._state: dict[str, DeploymentState] = {}

    # -- state ---------------------------------------------------------------------------

    def update_state(self, state: dict[str, DeploymentState]) -> None:
        self._state = state

    def update_headroom(self, headroom: dict[str, float]) -> None:
        """Headroom only (breakers closed): for callers without the full state."""
        self._state = {d: DeploymentState(headroom=h) for d, h in headroom.items()}

    def known(self) -> list[str]:
        return sorted(self._by_name)

    def deployment(self, name: str) -> Deployment:
        return self._deployments[name]

    def healthy(self, deployment: str) -> bool:
        st = self._state.get(deployment)
        return st is None or (st.breaker != "open" and not st.exhausted)

    def count_prompt(self, messages: list[dict[str, Any]] | None, upstream_model: str) -> int:
        """Prompt tokens as the quota actor reserves them (tokenizer where installed).

        Without messages (the ingress sends them only when needed) the count is 0.
        """
        if not messages:
            return 0
        if self._counter is None:  # loads tokenizers: only once a cost bound needs it
            self._counter = PromptCounter(d.model for d in self._deployments.values())
        prompt: list[Mapping[str, Any]] = list(messages)
        return self._counter.count(prompt, [upstream_model])

    # -- choosing the model ------------------------------------------------------------

    def complexity(self, ask: RouteAsk) -> Complexity:
        return self._scorer.score(ask.messages or [])

    def _matching(self, ask: RouteAsk) -> list[Model]:
        """Models of the rules that match `ask`, in rule order, then the default model."""
        memo: list[float] = []

        def score() -> float:
            if not memo:
                memo.append(self.complexity(ask).score)
            return memo[0]

        return [r.model for r in self._rules if r.matches(ask, score)] + [self._default]

    def resolve(self, ask: RouteAsk) -> Model | None:
        """The model a request names (or `auto` picks, before any cost bound)."""
        if ask.model == AUTO:
            return self._matching(ask)[0]
        return self._by_name.get(ask.model)

    def _auto(self, ask: RouteAsk, costs: _Costs) -> Model | None:
        matching = self._matching(ask)
        if costs.max_cost is None:
            return matching[0]
        for model in matching:
            if costs.model_fits(model):
                return model
        cost, model, _ = costs.cheapest(self._models.values())
        return model if cost <= costs.max_cost + _COST_EPSILON_USD else None

    # -- routing -------------------------------------------------------------------------

    def route(self, asks: Iterable[RouteAsk]) -> list[Route]:
        out: list[Route] = []
        for ask in asks:
            costs = _Costs(self, ask)
            model = self._auto(ask, costs) if ask.model == AUTO else self._by_name.get(ask.model)
            if model is None and ask.model != AUTO:
                out.append(
                    Route(
                        ask.ticket,
                        None,
                        error="unknown_model",
                        message=f"request.model {ask.model!r} is not a configured model "
                        f"or alias (known: {', '.join(self.known())}, or 'auto')",
                    )
                )
                continue
            if model is None or not costs.model_fits(model):
                out.append(self._too_expensive(ask, costs, model))
                continue
            allowed = None if costs.max_cost is None else costs.fits
            out.append(self.chain_route(ask.ticket, model, ask.avoid, allowed=allowed, costs=costs))
        return out

    def _too_expensive(self, ask: RouteAsk, costs: _Costs, model: Model | None) -> Route:
        """`invalid_request`: the request's own bound excludes every model it may use."""
        pool = [model] if model is not None else list(self._models.values())
        cost, cheapest_model, dep = costs.cheapest(pool)
        where = f"model {model.name!r}" if model is not None else "any configured model"
        return Route(
            ask.ticket,
            None,
            error="invalid_request",
            message=f"max_cost_usd {costs.max_cost} is below the cheapest possible cost of "
            f"this request on {where}: ${cost:.8f} ({costs.describe(cheapest_model, dep)}); "
            "raise max_cost_usd or lower max_tokens",
        )

    def _ranked(self, model: Model, costs: _Costs | None = None) -> list[str]:
        """The model's deployments, best first, by `routing.deployment`."""
        pol = self._policy
        deps = model.deployments
        states = {d: self._state.get(d) for d in deps}
        ttfts = {
            d: max(_MIN_TTFT_MS, st.ttft_ewma_ms)
            for d, st in states.items()
            if st is not None and st.ttft_ewma_ms is not None
        }
        fastest = min(ttfts.values(), default=None)
        if costs is not None and costs.estimate is not None:
            est, out = costs.estimate, costs.max_tokens
            prices = {d: worst_case_cost(self._deployments[d], est, out) for d in deps}
        else:
            prices = {
                d: self._deployments[d].price.input_per_mtok
                + self._deployments[d].price.output_per_mtok
                for d in deps
            }
        cheapest = min(prices.values())

        def score(d: str) -> float:
            st = states[d]
            headroom = 1.0 if st is None else st.headroom
            latency = 1.0 if fastest is None or d not in ttfts else fastest / ttfts[d]
            price = 1.0 if prices[d] <= 0 else cheapest / prices[d]
            s = pol.headroom * headroom + pol.latency * latency + pol.price * price
            if st is not None and st.breaker == "half_open":
                s -= pol.half_open_penalty
            return s

        scores = {d: score(d) for d in deps}
        order = {d: i for i, d in enumerate(deps)}
        return sorted(deps, key=lambda d: (-scores[d], order[d]))

    def chain_route(
        self,
        ticket: int,
        model: Model,
        avoid: Iterable[str] = (),
        *,
        allowed: Callable[[str], bool] | None = None,
        costs: _Costs | None = None,
    ) -> Route:
        """Candidates of `model`, or of its first fallback with a healthy deployment.

        `allowed` (the cost bound) removes deployments everywhere in the chain.
        """
        avoided = set(avoid)
        chain = [model, *(self._models[f] for f in model.fallbacks)]
        everything: list[tuple[str, str]] = []
        for i, m in enumerate(chain):
            ranked = [d for d in self._ranked(m, costs) if allowed is None or allowed(d)]
            good = [d for d in ranked if self.healthy(d) and d not in avoided]
            if good:
                # The rest of the chain goes along: the quota actor, whose breaker state is
                # never stale, uses it when every one of `good` turns out unhealthy.
                rest: list[tuple[str, str]] = []
                for later in chain[i + 1 :]:
                    rest.extend(
                        (d, later.name)
                        for d in self._ranked(later, costs)
                        if (allowed is None or allowed(d))
                        and d not in good
                        and d not in {r for r, _ in rest}
                    )
                return Route(
                    ticket,
                    m.name,
                    tuple(good),
                    served=(m.name,) * len(good) + tuple(name for _, name in rest),
                    fallback=tuple(d for d, _ in rest),
                )
            everything.extend((d, m.name) for d in ranked)
        # Nothing healthy anywhere: keep all (deduplicated), healthy-but-avoided first.
        seen: set[str] = set()
        ordered: list[tuple[str, str]] = []
        for d, m_name in sorted(everything, key=lambda dm: not self.healthy(dm[0])):
            if d not in seen:
                seen.add(d)
                ordered.append((d, m_name))
        return Route(
            ticket,
            model.name,
            tuple(d for d, _ in ordered),
            served=tuple(m for _, m in ordered),
        )
