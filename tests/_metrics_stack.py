"""What issue 7's metrics test adds to the session's stack config (tests/conftest.py).

* The endpoint on a port chosen now, so the test knows where to scrape.
* A model of its own over one priced deployment with its own simulator key: the
  figures labelled with that model (or deployment) move only with the metrics test's load.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from pipeline.kafka_local import free_port

__all__ = [
    "METRICS_DEPLOYMENT",
    "METRICS_KEY_ENV",
    "METRICS_LIMITS",
    "METRICS_MODEL",
    "METRICS_PRICE",
    "add_metrics_lane",
]

METRICS_MODEL = "metrics-model"
METRICS_DEPLOYMENT = "m-metrics"
METRICS_KEY_ENV = "QF_SIM_KEY_METRICS"
# Far above the test's load: nothing waits for quota, and utilization stays below 1.
METRICS_LIMITS: dict[str, int] = {"rpm": 100_000, "tpm": 100_000_000}
METRICS_PRICE: dict[str, float] = {"input_per_mtok": 0.5, "output_per_mtok": 2.0}


def add_metrics_lane(raw: dict[str, Any], base_url: str) -> None:
    """Set `metrics.port`; append the deployment, model and simulator key above."""
    os.environ.setdefault(METRICS_KEY_ENV, "sk-sim-" + secrets.token_urlsafe(18))
    raw["metrics"] = {"port": free_port()}
    raw["deployments"].append(
        {
            "name": METRICS_DEPLOYMENT,
            "base_url": base_url,
            "api_key_env": METRICS_KEY_ENV,
            "model": "sim-small",
            "limits": METRICS_LIMITS,
            "price": METRICS_PRICE,
        }
    )
    raw["models"].append({"name": METRICS_MODEL, "deployments": [METRICS_DEPLOYMENT]})
    raw["simulator"]["keys"].append(
        {"api_key_env": METRICS_KEY_ENV, "models": {"sim-small": METRICS_LIMITS}}
    )
