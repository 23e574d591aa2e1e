"""Model selection logic: public name or alias -> model -> deployments ordered by headroom."""

from __future__ import annotations

from collections.abc import Iterable

from actors._messages import Route, RouteAsk
from topics.config import Config

__all__ = ["AUTO", "Router"]

AUTO = "auto"


class Router:
    """Resolves names and orders each model's deployments by the quota actor's headroom.

    `auto` resolves to the first model in the config until routing rules exist (issue 6);
    ties in headroom keep the config's order, so the first deployment is preferred.
    """

    def __init__(self, config: Config) -> None:
        self._models: dict[str, tuple[str, tuple[str, ...]]] = {}
        for m in config.models:
            for name in (m.name, *m.aliases):
                self._models[name] = (m.name, tuple(m.deployments))
        self._default = config.models[0].name
        self._headroom: dict[str, float] = {}

    def update_headroom(self, headroom: dict[str, float]) -> None:
        self._headroom = headroom

    def known(self) -> list[str]:
        return sorted(self._models)

    def route(self, asks: Iterable[RouteAsk]) -> list[Route]:
        out: list[Route] = []
        for ask in asks:
            name = self._default if ask.model == AUTO else ask.model
            found = self._models.get(name)
            if found is None:
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
            model, deployments = found
            order = {d: i for i, d in enumerate(deployments)}
            ranked = sorted(deployments, key=lambda d: (-self._headroom.get(d, 1.0), order[d]))
            out.append(Route(ask.ticket, model, tuple(ranked)))
        return out
