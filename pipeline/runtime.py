"""Running the gateway: Ray up (local, or the cluster at RAY_ADDRESS), ingress until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import ray
import structlog

from actors._process import tune_process
from pipeline.gateway import Gateway
from pipeline.metrics import MetricsServer, start_metrics
from topics.config import Config, resolve_secret
from topics.errors import QuotaflowError
from topics.logs import configure_logging

__all__ = ["init_ray", "run_gateway"]

log = structlog.get_logger("quotaflow.gateway")

# Read by a Ray node at start (RayConfig `worker_niceness`); see deploy/k8s for clusters.
_WORKER_NICENESS_ENV = "RAY_worker_niceness"


def init_ray(config: Config, *, join_only: bool = False) -> None:
    """Join the cluster at RAY_ADDRESS if set, else start Ray locally (no dashboard).

    `join_only`: never start a cluster (find the local one instead) and print none of its
    workers' logs; for short-lived drivers such as `quotaflow status`.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or ("auto" if join_only else None)
    if address is None:
        # Ray runs its workers at nice 15 by default: our actors *are* the gateway, and
        # at 15 anything else on the machine (the broker, the load) starves them.
        os.environ.setdefault(_WORKER_NICENESS_ENV, str(config.gateway.actor_niceness))
    try:
        ray.init(
            address=address,
            namespace=config.gateway.ray_namespace,
            include_dashboard=False,
            log_to_driver=not join_only,
            configure_logging=False,
        )
    except ConnectionError as exc:
        raise QuotaflowError(
            f"no Ray cluster at {address!r}: is `quotaflow run` running? ({exc})"
        ) from None


async def run_gateway(config: Config) -> int:
    """`quotaflow run`: serve until SIGINT/SIGTERM, drain in-flight requests, commit, exit 0."""
    configure_logging(config.logging)
    tune_process(config)
    for i, dep in enumerate(config.deployments):  # fail before Ray starts, naming the variable
        resolve_secret(dep.api_key_env, what=f"deployments[{i}] ({dep.name}).api_key_env")
    init_ray(config)
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gateway.stop)
    metrics: MetricsServer | None = None
    try:
        await gateway.start()
        metrics = start_metrics(config.metrics, gateway)  # logs `metrics_listening`
        # The Ray address lets `RAY_ADDRESS=... quotaflow status` find this gateway's actors.
        address = ray.get_runtime_context().gcs_address
        print(
            f"quotaflow gateway running (kafka {config.kafka.bootstrap_servers}, ray {address})",
            flush=True,
        )
        await gateway.run()
    finally:
        if metrics is not None:
            metrics.close()  # before Ray goes: a scrape calls the actors
        await gateway.close()
        ray.shutdown()
    log.info("gateway_stopped", stats=vars(gateway.stats))
    return 0
