"""What issue 6's integration tests add to the session's stack config (tests/conftest.py).

* Three priced models for `model: "auto"` behind one simulator key without limits, and
  `routing` rules naming them; `default_model` stays `fast` (the first model), so `auto`
  without a matching rule routes as before.
* A saturation pair: model `sat` over two deployments with different RPM limits, each on
  its own simulator key with the very same limits.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

__all__ = [
    "ROUTE_KEY_ENV",
    "ROUTE_PRICES",
    "ROUTING",
    "SAT_LANES",
    "SAT_MODEL",
    "add_routing_lanes",
]

ROUTE_KEY_ENV = "QF_SIM_KEY_H"
# model (= its one deployment) -> (input, output) USD per Mtok
ROUTE_PRICES: dict[str, tuple[float, float]] = {
    "auto-small": (0.1, 0.4),
    "auto-code": (1.0, 4.0),
    "auto-big": (5.0, 20.0),
}
ROUTING: dict[str, Any] = {
    "default_model": "fast",
    "rules": [
        {"tier": "premium", "model": "auto-big"},
        {"tier": "economy", "model": "auto-small"},
        {"task": "code", "model": "auto-code"},
        {"min_score": 0.4, "model": "auto-big"},
    ],
}
SAT_MODEL = "sat"
# (deployment, key env, rpm): different limits, both far below what the test offers.
SAT_LANES: tuple[tuple[str, str, int], ...] = (
    ("sat-a", "QF_SIM_KEY_I", 6),
    ("sat-b", "QF_SIM_KEY_J", 12),
)
SAT_TPM = 1_000_000


def add_routing_lanes(raw: dict[str, Any], base_url: str) -> None:
    """Append the deployments, models, simulator keys and `routing` section above."""
    for env in (ROUTE_KEY_ENV, *(env for _, env, _ in SAT_LANES)):
        os.environ.setdefault(env, "sk-sim-" + secrets.token_urlsafe(18))
    for name, (inp, out) in ROUTE_PRICES.items():
        raw["deployments"].append(
            {
                "name": name,
                "base_url": base_url,
                "api_key_env": ROUTE_KEY_ENV,
                "model": f"sim-{name}",
                "price": {"input_per_mtok": inp, "output_per_mtok": out},
            }
        )
        raw["models"].append({"name": name, "deployments": [name]})
    raw["simulator"]["keys"].append({"api_key_env": ROUTE_KEY_ENV})
    for dep, env, rpm in SAT_LANES:
        limits = {"rpm": rpm, "tpm": SAT_TPM}
        raw["deployments"].append(
            {
                "name": dep,
                "base_url": base_url,
                "api_key_env": env,
                "model": "sim-small",
                "limits": limits,
            }
        )
        raw["simulator"]["keys"].append({"api_key_env": env, "models": {"sim-small": limits}})
    raw["models"].append({"name": SAT_MODEL, "deployments": [dep for dep, _, _ in SAT_LANES]})
    raw["routing"] = ROUTING
