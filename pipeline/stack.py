"""A whole quotaflow on one machine: broker, simulator, gateway (for demo, tests, benchmarks).

Keys for the simulator are made up per run and exported to this process's environment
(and so to the gateway subprocess); they exist only for the run and are never written
to the config file, which names only the variables.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from topics.config import Config, parse_config

__all__ = ["GatewayProcess", "sim_config_dict", "write_config"]

SIM_KEY_ENVS = ("QF_SIM_KEY_A", "QF_SIM_KEY_B")


def ensure_sim_keys() -> dict[str, str]:
    """Random keys for the simulator, set in os.environ once per process."""
    for env in SIM_KEY_ENVS:
        os.environ.setdefault(env, "sk-sim-" + secrets.token_urlsafe(18))
    return {env: os.environ[env] for env in SIM_KEY_ENVS}


def sim_config_dict(
    *,
    bootstrap: str,
    sim_port: int,
    sim_log: Path | None = None,
    limits: Mapping[str, int] | None = None,
    sim: Mapping[str, Any] | None = None,
    gateway: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Config with two simulator deployments (two keys) behind the public model `fast`.

    `limits` apply to both the gateway's deployments and the simulator's keys, as they
    would to a real contract: the gateway must keep under what the provider enforces.
    """
    ensure_sim_keys()
    lim = dict(limits or {"rpm": 600, "tpm": 200_000})
    sim_limits = {k: v for k, v in lim.items() if k in ("rpm", "tpm")}
    base = f"http://127.0.0.1:{sim_port}/v1"
    price = {"input_per_mtok": 0.40, "output_per_mtok": 1.60}
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap},
        "deployments": [
            {
                "name": "sim-a",
                "base_url": base,
                "api_key_env": SIM_KEY_ENVS[0],
                "model": "sim-small",
                "limits": lim,
                "price": price,
            },
            {
                "name": "sim-b",
                "base_url": base,
                "api_key_env": SIM_KEY_ENVS[1],
                "model": "sim-small",
                "limits": lim,
                "price": price,
            },
        ],
        "models": [{"name": "fast", "deployments": ["sim-a", "sim-b"], "aliases": ["small"]}],
        "simulator": {
            "port": sim_port,
            "keys": [
                {
                    "api_key_env": env,
                    "models": {"sim-small": sim_limits},
                }
                for env in SIM_KEY_ENVS
            ],
            **({"log_path": str(sim_log)} if sim_log else {}),
            **dict(sim or {}),
        },
        "gateway": dict(gateway or {}),
        # Any free port: local stacks side by side must not fight over the default one.
        "metrics": {"port": 0},
    }
    cfg.update(extra or {})
    return cfg


def write_config(raw: Mapping[str, Any], path: Path) -> Config:
    """Validate `raw` and write it as YAML to `path`; returns the parsed config."""
    config = parse_config(dict(raw), source=str(path))
    path.write_text(yaml.safe_dump(dict(raw), sort_keys=False))
    return config


class GatewayProcess:
    """`quotaflow run --config FILE` as a child process (its own process group)."""

    def __init__(self, config_path: Path, log_path: Path, env: Mapping[str, str] | None = None):
        self.config_path = config_path
        self.log_path = log_path
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, *, ready_timeout_s: float = 120.0) -> None:
        """Start it and wait for its ready line (a restart waits for a new one)."""
        seen = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "pipeline.cli", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=self._env,
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + ready_timeout_s
        while b"quotaflow gateway running" not in self.log_path.read_bytes()[seen:]:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode}; see {self.log_path}"
                )
            if loop.time() > give_up:
                await self.stop()
                raise RuntimeError(f"gateway not ready in {ready_timeout_s}s; see {self.log_path}")
            await asyncio.sleep(0.1)

    async def stop(self, *, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL the group if it hangs. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the gateway's whole process group (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
