"""Blocking entry point: serve the simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog

from pipeline.simulator.server import Simulator
from topics.config import SimulatorConfig

__all__ = ["run_simulator"]


async def _serve(config: SimulatorConfig, port: int | None) -> None:
    sim = Simulator(config)
    url = await sim.start(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"simulator listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sim.stop()


def run_simulator(config: SimulatorConfig, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM, after printing "simulator listening on <base URL>".

    That line is the only one on stdout (callers parse it): unless the application has
    configured structlog already, the simulator's own log lines go to stderr.
    """
    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(_serve(config, port))
