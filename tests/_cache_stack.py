"""What issue 5's integration tests add to the session's stack config (tests/conftest.py).

One deployment on a simulator key of its own (so the simulator's log separates its
calls), behind two models: `c-cache-model` with the default TTL and `c-ttl-model` whose
entries expire after `CACHE_TTL_S` (`cache.ttl_s_by_model`); and two cache shards.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

__all__ = ["CACHE_KEY_ENV", "CACHE_MODEL", "CACHE_TTL_S", "TTL_MODEL", "add_cache_lanes"]

CACHE_KEY_ENV = "QF_SIM_KEY_CACHE"
CACHE_DEPLOYMENT = "c-cache"
CACHE_MODEL = "c-cache-model"
TTL_MODEL = "c-ttl-model"
CACHE_TTL_S = 2.0


def add_cache_lanes(raw: dict[str, Any], base_url: str) -> None:
    """Append the deployment, models, simulator key and per-model TTL above."""
    os.environ.setdefault(CACHE_KEY_ENV, "sk-sim-" + secrets.token_urlsafe(18))
    raw["deployments"].append(
        {
            "name": CACHE_DEPLOYMENT,
            "base_url": base_url,
            "api_key_env": CACHE_KEY_ENV,
            "model": "sim-small",
            "limits": {"rpm": 100_000, "tpm": 10**8},
        }
    )
    raw["models"].append({"name": CACHE_MODEL, "deployments": [CACHE_DEPLOYMENT]})
    raw["models"].append({"name": TTL_MODEL, "deployments": [CACHE_DEPLOYMENT]})
    raw["simulator"]["keys"].append({"api_key_env": CACHE_KEY_ENV})
    raw.setdefault("cache", {}).setdefault("ttl_s_by_model", {})[TTL_MODEL] = CACHE_TTL_S
    # Two shards, not the default one: the suite covers keys spread over shards (a killed
    # shard, followers of another shard's flight).
    raw["cache"]["shards"] = 2
