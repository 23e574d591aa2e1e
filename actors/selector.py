"""Model-selector actors: a thin Ray shell around `Router`, refreshing deployment state in the
background.

Headroom, breaker state and latency come from the quota actor once per
`headroom_refresh_ms`, not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray

from actors._messages import Packed, Route, RouteAsk
from actors._process import tune_process
from actors._ray import actor_by_name, named_actor
from actors._routing import Router
from actors.quota import QUOTA_ACTOR_NAME
from topics.config import Config
from topics.logs import configure_logging

__all__ = ["Selector", "selector_actors"]


class Selector:
    def __init__(self, config: Config) -> None:
        configure_logging(config.logging)
        tune_process(config)
        self.router = Router(config)
        self._config = config
        self._quota: Any = None
        self._refresh_s = config.gateway.headroom_refresh_ms / 1000.0
        self._task: asyncio.Task[None] | None = None

    async def _refresh(self) -> None:
        while True:
            # While the quota actor restarts, keep the last headroom.
            with contextlib.suppress(ray.exceptions.RayActorError, ValueError):
                if self._quota is None:
                    self._quota = actor_by_name(self._config, QUOTA_ACTOR_NAME)
                self.router.update_state(await self._quota.routing_state.remote())
            await asyncio.sleep(self._refresh_s)

    async def warm(self) -> None:
        """Start the headroom refresher."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh())

    async def route(self, asks: list[RouteAsk]) -> list[Route]:
        await self.warm()
        return Packed("route", self.router.route(asks))


def selector_actors(config: Config) -> list[Any]:
    """Get or create the named model selectors."""
    return [
        named_actor(Selector, config, f"quotaflow.selector.{i}", config, max_concurrency=100)
        for i in range(config.gateway.selector_actors)
    ]
