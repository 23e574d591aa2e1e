"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.client import QuotaflowClient
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.stack import GatewayProcess, sim_config_dict, write_config
from tests._cache_stack import add_cache_lanes
from tests._metrics_stack import add_metrics_lane
from tests._routing_stack import add_routing_lanes
from topics.config import Config


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `fresh_quota` run first. A gateway or quota actor restarted by a test
    restores its windows conservatively (held as used for one window span), which they
    would otherwise wait out."""
    items.sort(key=lambda item: item.get_closest_marker("fresh_quota") is None)


@pytest.fixture(scope="session")
def kafka_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """One real Kafka broker for the whole session, on a free port, stopped at the end.

    Its data lives in a fresh temporary home; the jars come from the shared classpath cache
    ($QUOTAFLOW_KAFKA_JARS, default ~/.cache/quotaflow/kafka), so mvn only runs once.
    """
    kafka = LocalKafka(home=tmp_path_factory.mktemp("qfhome"))
    kafka.up(port=0)
    yield kafka
    kafka.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_local: LocalKafka) -> str:
    """ "127.0.0.1:PORT" of the session's broker."""
    bootstrap = kafka_local.status().bootstrap
    assert bootstrap is not None, "the session's Kafka broker is not running"
    return bootstrap


# -- the whole stack: simulator and gateway as the real CLI processes -----------------

SIM_BAD_KEY_ENV = "QF_SIM_KEY_WRONG"


@dataclass(frozen=True)
class QuotaLane:
    """A deployment with small limits, one simulator key with the very same limits."""

    deployment: str
    model: str
    key_env: str
    rpm: int
    tpm: int


# Issue 3's tests: each lane has its own key, so the simulator's stats separate them.
RPM_LANE = QuotaLane("q-rpm", "q-rpm-model", "QF_SIM_KEY_C", rpm=12, tpm=1_000_000)
TPM_LANE = QuotaLane("q-tpm", "q-tpm-model", "QF_SIM_KEY_D", rpm=1_000, tpm=3_000)
FAIR_LANE = QuotaLane("q-fair", "q-fair-model", "QF_SIM_KEY_E", rpm=60, tpm=1_000_000)
KILL_LANE = QuotaLane("q-kill", "q-kill-model", "QF_SIM_KEY_F", rpm=30, tpm=1_000_000)
SLOW_LANE = QuotaLane("q-slow", "q-slow-model", "QF_SIM_KEY_G", rpm=1, tpm=1_000_000)
QUOTA_LANES = (RPM_LANE, TPM_LANE, FAIR_LANE, KILL_LANE, SLOW_LANE)
# Issue 4's tests: a flaky deployment (20% 5xx, 5% cut streams: 500 errors first, then 503s
# of the rest, then drops of the rest), one that a test takes down and brings back, with
# a fallback model, and one slow enough to be killed or stopped mid-stream.
FLAKY_LANE = QuotaLane("r-flaky", "r-flaky-model", "QF_SIM_KEY_FLAKY", rpm=100_000, tpm=10**8)
FLAKY_FAULTS = {
    "error_500_rate": 0.1,
    "error_503_rate": 0.1 / 0.9,
    "drop_mid_stream_rate": 0.05 / 0.8,
    "seed": 11,
}
DOWN_LANE = QuotaLane("r-down", "r-primary", "QF_SIM_KEY_DOWN", rpm=100_000, tpm=10**8)
BACKUP_LANE = QuotaLane("r-backup", "r-backup-model", "QF_SIM_KEY_BACKUP", rpm=100_000, tpm=10**8)
SLOW_STREAM_LANE = QuotaLane(
    "r-slow", "r-slow-model", "QF_SIM_KEY_SLOWSTREAM", rpm=100_000, tpm=10**8
)
SLOW_STREAM_INTER_TOKEN_MS = 200
RESILIENCE_LANES = (FLAKY_LANE, DOWN_LANE, BACKUP_LANE, SLOW_STREAM_LANE)
# Enough attempts that 20% 5xx + 5% drops leave no request failed (0.25^8 per request).
SESSION_MAX_ATTEMPTS = 8
SESSION_BREAKER_OPEN_S = 2.0
# Shorter than a slow stream (16 tokens x 200 ms): SIGTERM must end some with an error.
SESSION_DRAIN_TIMEOUT_S = 1.0
CAPPED_TENANT = "capped"
CAPPED_DAILY_TOKENS = 100
KILL_TENANT = "kill-tenant"
# The simulator shares 2 cores with the broker, Ray, the gateway and the load: under the
# batch and fuzz bursts its own admission lags the grant by more than the default 20 ms
# margin of the quantized 1 s windows (measured: 11 of ~1,500 calls 429'd at 100/s).
SESSION_SECOND_MARGIN_MS = 150
# Smaller than the burst test's burst: the full quota queue must pause the ingress.
SESSION_QUOTA_QUEUE_MAX = 30
# Small enough that the 50-concurrent test pauses and resumes the ingress for real.
SESSION_MAX_IN_FLIGHT = 20


@dataclass(frozen=True)
class Stack:
    """What the integration tests talk to."""

    bootstrap: str
    config: Config
    config_path: Path
    sim_url: str
    sim_log: Path
    gateway_log: Path
    gateway: GatewayProcess

    def ray_address(self) -> str:
        """The gateway's Ray cluster, from its start-up line."""
        text = self.gateway_log.read_text()
        marker = "ray "
        line = [ln for ln in text.splitlines() if "quotaflow gateway running" in ln][-1]
        return line.rsplit(marker, 1)[1].rstrip(")")

    def status(self) -> dict[str, Any]:
        """`quotaflow status --once --json` against this gateway."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "status",
                "--config",
                str(self.config_path),
                "--once",
                "--json",
            ],
            env={**os.environ, "RAY_ADDRESS": self.ray_address()},
            capture_output=True,
            check=False,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def sim_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            self.sim_url.removesuffix("/v1") + "/stats", timeout=30
        ) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
        return stats

    def sim_set_faults(self, key_env: str, faults: dict[str, Any] | None) -> None:
        """Replace one simulator key's faults (None: back to the global ones)."""
        req = urllib.request.Request(
            self.sim_url.removesuffix("/v1") + "/admin/faults",
            data=json.dumps({"api_key_env": key_env, "faults": faults}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200

    def sim_log_records(self) -> list[dict[str, Any]]:
        lines = self.sim_log.read_text().splitlines() if self.sim_log.exists() else []
        return [json.loads(line) for line in lines]

    def sim_calls(self, request_id: str) -> list[dict[str, Any]]:
        """Simulator log lines for one request id (sent as X-Client-Request-Id)."""
        lines = self.sim_log.read_text().splitlines() if self.sim_log.exists() else []
        return [rec for rec in map(json.loads, lines) if rec.get("client_request_id") == request_id]


def _wait_for_line(
    path: Path, marker: bytes, proc: subprocess.Popen[bytes], timeout_s: float
) -> None:
    give_up = time.monotonic() + timeout_s
    while marker not in path.read_bytes():
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; see {path}")
        if time.monotonic() > give_up:
            raise RuntimeError(f"no {marker!r} in {path} after {timeout_s}s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def stack_config(kafka_bootstrap: str, stack_dir: Path) -> tuple[Config, Path]:
    os.environ.setdefault(SIM_BAD_KEY_ENV, "sk-wrong-" + secrets.token_urlsafe(18))
    raw = sim_config_dict(
        bootstrap=kafka_bootstrap,
        sim_port=free_port(),
        sim_log=stack_dir / "sim.jsonl",
        limits={"rpm": 6000, "tpm": 2_000_000},
        sim={"ttft_ms": 5, "inter_token_ms": 1, "output_tokens": 16, "quantize_per_second": True},
        gateway={"max_in_flight": SESSION_MAX_IN_FLIGHT, "caller_actors": 2},
    )
    base = raw["deployments"][0]["base_url"]
    raw["deployments"].append(
        {"name": "sim-bad", "base_url": base, "api_key_env": SIM_BAD_KEY_ENV, "model": "sim-small"}
    )
    raw["models"].append({"name": "broken", "deployments": ["sim-bad"]})
    for lane in QUOTA_LANES:
        os.environ.setdefault(lane.key_env, "sk-sim-" + secrets.token_urlsafe(18))
        limits = {"rpm": lane.rpm, "tpm": lane.tpm}
        raw["deployments"].append(
            {
                "name": lane.deployment,
                "base_url": base,
                "api_key_env": lane.key_env,
                "model": "sim-small",
                "limits": limits,
            }
        )
        raw["models"].append({"name": lane.model, "deployments": [lane.deployment]})
        raw["simulator"]["keys"].append(
            {"api_key_env": lane.key_env, "models": {"sim-small": limits}}
        )
    for lane in RESILIENCE_LANES:
        os.environ.setdefault(lane.key_env, "sk-sim-" + secrets.token_urlsafe(18))
        raw["deployments"].append(
            {
                "name": lane.deployment,
                "base_url": base,
                "api_key_env": lane.key_env,
                "model": "sim-small",
                "limits": {"rpm": lane.rpm, "tpm": lane.tpm},
            }
        )
        model: dict[str, Any] = {"name": lane.model, "deployments": [lane.deployment]}
        if lane is DOWN_LANE:
            model["fallbacks"] = [BACKUP_LANE.model]
        raw["models"].append(model)
        key: dict[str, Any] = {"api_key_env": lane.key_env}
        if lane is FLAKY_LANE:
            key["faults"] = FLAKY_FAULTS
        if lane is SLOW_STREAM_LANE:
            key["inter_token_ms"] = SLOW_STREAM_INTER_TOKEN_MS
        raw["simulator"]["keys"].append(key)
    raw["resilience"] = {
        "retry": {"max_attempts": SESSION_MAX_ATTEMPTS},
        "breaker": {"open_s": SESSION_BREAKER_OPEN_S},
    }
    raw["gateway"]["drain_timeout_s"] = SESSION_DRAIN_TIMEOUT_S
    add_routing_lanes(raw, base)  # issue 6: auto-routing models, the saturation pair
    add_metrics_lane(raw, base)  # issue 7: metrics.port, a model only the metrics test uses
    add_cache_lanes(raw, base)  # issue 5: a cache lane and a model with a short TTL
    raw["quota"] = {
        "queue_max": SESSION_QUOTA_QUEUE_MAX,
        "second_margin_ms": SESSION_SECOND_MARGIN_MS,
    }
    raw["tenants"] = [
        {"name": CAPPED_TENANT, "daily_tokens": CAPPED_DAILY_TOKENS},
        {"name": KILL_TENANT, "daily_tokens": 10_000_000},
    ]
    path = stack_dir / "quotaflow.yaml"
    return write_config(raw, path), path


@pytest.fixture(scope="session")
def simulator(stack_config: tuple[Config, Path], stack_dir: Path) -> Iterator[str]:
    """`quotaflow sim` as a child process; yields its base URL."""
    config, path = stack_config
    log = stack_dir / "sim.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "sim", "--config", str(path)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        _wait_for_line(log, b"simulator listening on", proc, timeout_s=60)
        assert config.simulator is not None
        yield f"http://127.0.0.1:{config.simulator.port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
async def stack(
    kafka_bootstrap: str, stack_config: tuple[Config, Path], simulator: str, stack_dir: Path
) -> AsyncIterator[Stack]:
    """`quotaflow run` as a child process against the session broker and simulator."""
    config, path = stack_config
    gateway = GatewayProcess(path, stack_dir / "gateway.log")
    await gateway.start()
    assert config.simulator is not None
    assert config.simulator.log_path is not None
    yield Stack(
        bootstrap=kafka_bootstrap,
        config=config,
        config_path=path,
        sim_url=simulator,
        sim_log=Path(config.simulator.log_path),
        gateway_log=stack_dir / "gateway.log",
        gateway=gateway,
    )
    code = await gateway.stop()
    assert code == 0, f"gateway exited with {code} on SIGTERM; see {stack_dir / 'gateway.log'}"


@pytest.fixture(scope="session")
async def client(stack: Stack) -> AsyncIterator[QuotaflowClient]:
    async with QuotaflowClient(stack.bootstrap) as c:
        yield c
