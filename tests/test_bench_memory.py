"""The memory benchmark's growth figures (pure logic over samples)."""

from __future__ import annotations

from typing import Any

from benchmarks.memory import ROLES, _growth


def _sample(t_s: float, store_mib: float, rest_mib: float) -> dict[str, Any]:
    roles = {r: {"rss_mib": 0.0, "pss_mib": 0.0} for r in ROLES}
    roles["idempotency"]["rss_mib"] = store_mib
    roles["ingress"]["rss_mib"] = rest_mib
    return {"t_s": t_s, "roles": roles, "total": {"rss_mib": store_mib + rest_mib, "pss_mib": 0.0}}


def test_growth_separates_the_idempotency_store_and_the_second_half() -> None:
    # The store grows 1 MiB a sample throughout; the rest grows early, then stays flat.
    rest = [100.0, 104.0, 106.0, 106.0, 106.0, 106.0, 106.0]
    samples = [_sample(10.0 * i, 50.0 + i, r) for i, r in enumerate(rest)]
    g = _growth(samples)
    assert g["total_rss"]["growth_mib"] == 12.0
    assert g["rss_without_idempotency"]["growth_mib"] == 6.0
    half = g["second_half"]
    assert half["start_t_s"] == 30.0
    assert half["total_rss"]["growth_mib"] == 3.0
    assert half["rss_without_idempotency"]["growth_mib"] == 0.0
