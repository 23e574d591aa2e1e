"""Creating named actors one way: zero CPUs reserved, restarted on failure, get-or-create."""

from __future__ import annotations

from typing import Any

import ray

from topics.config import Config

__all__ = ["actor_by_name", "named_actor"]


def actor_by_name(config: Config, name: str) -> Any:
    """A handle to a named actor of this gateway (resolved when needed, so that an actor
    restarted by Ray never depends on handles it was constructed with)."""
    return ray.get_actor(name, namespace=config.gateway.ray_namespace)


def named_actor(
    cls: type[Any],
    config: Config,
    name: str,
    *args: Any,
    max_concurrency: int,
    detached: bool = False,
    retry_calls: bool = False,
) -> Any:
    """Get the actor `name` in the gateway's namespace, or start it with `cls(*args)`.

    Ray restarts it when it dies (`max_restarts=-1`) with the same arguments, which is why
    actors take only the config and find their peers by name.

    num_cpus=0: these actors mostly wait on I/O; Ray's CPU accounting would otherwise
    refuse to place more actors than cores on a 2-core machine.
    """
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=config.gateway.ray_namespace,
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=max_concurrency,
            max_restarts=-1,
            # Ray's per-call task events are for its dashboard, which we do not run; they
            # grow the GCS by ~1 KB a call up to its cap (100k tasks) under steady load.
            enable_task_events=False,
            # Calls in flight when the actor died are re-run on its next incarnation;
            # only for actors whose methods are safe to repeat.
            max_task_retries=-1 if retry_calls else 0,
            lifetime="detached" if detached else None,
        )
        .remote(*args)
    )
