"""Quota decisions per second: `QuotaBook` in-process, and the quota actor through Ray.

Four deployments with limits far above the load (so every ask is granted at once and the
figure is the cost of deciding, not of waiting), asks of 20 prompt + 16 max tokens that
may go to any of the four:

* **book**: `QuotaBook.submit(batch of 500)` then `settle` of the granted leases, in a
  loop for at least `--seconds`; decisions/s over the submit time alone and over
  submit + settle;
* **actor**: the singleton quota actor (`actors.quota.quota_actor`, in a local Ray started
  here) called as the gateway calls it, `submit.remote(batch)` then `settle.remote(...)`
  with the batches `Packed` (one msgpack blob each, as the gateway sends them),
  with batches of 100, 500 and 1000 from one caller back to back, and 500 from 4
  concurrent callers; decisions/s (asks granted and settled / wall time) and per-call
  latency of submit and settle.

    .venv/bin/python -m benchmarks.quota_decisions [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from actors._messages import Ask, Grant, Packed, Settlement
from benchmarks._common import (
    REPO,
    add_row,
    leftovers,
    machine,
    machine_summary,
    percentiles,
    publish,
)
from pipeline.kafka_local import LocalKafka
from topics.config import Config, parse_config

__all__ = ["Params", "format_table", "main", "run"]

NAME = "quota_decisions"
DEPLOYMENTS = ("d0", "d1", "d2", "d3")
PROMPT_TOKENS = 20
MAX_TOKENS = 16
LIMITS = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000}


@dataclass(frozen=True)
class Params:
    seconds: float = 3.0  # of work per series
    book_batch: int = 500
    actor_batches: tuple[int, ...] = (100, 500, 1000)
    concurrent_callers: int = 4
    concurrent_batch: int = 500
    actor: bool = True
    record: bool = True


def bench_config(bootstrap: str = "127.0.0.1:9092") -> Config:
    """Four deployments behind one model, limits far above any load here."""
    raw = {
        "kafka": {"bootstrap_servers": bootstrap},
        "deployments": [
            {
                "name": name,
                "base_url": "http://127.0.0.1:9/v1",  # never called
                "api_key_env": "QF_BENCH_UNUSED_KEY",
                "model": "m",
                "limits": LIMITS,
            }
            for name in DEPLOYMENTS
        ],
        "models": [{"name": "fast", "deployments": list(DEPLOYMENTS)}],
        "logging": {"level": "warning"},
    }
    return parse_config(raw, source="benchmarks.quota_decisions")


_tickets = itertools.count(1)


def asks(n: int, owner: str) -> list[Ask]:
    return [
        Ask(
            ticket=next(_tickets),
            owner=owner,
            tenant="default",
            priority=5,
            deadline_ms=None,
            candidates=DEPLOYMENTS,
            prompt_tokens=PROMPT_TOKENS,
            max_tokens=MAX_TOKENS,
        )
        for _ in range(n)
    ]


def settlements(decisions: Sequence[Any]) -> tuple[list[Settlement], int]:
    """Settlements for the grants among `decisions` (all tokens used), and the grant count."""
    out = [
        Settlement(
            lease=d.lease,
            used_tokens=d.reserved_tokens,
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=MAX_TOKENS,
        )
        for d in decisions
        if isinstance(d, Grant)
    ]
    return out, len(out)


# -- in-process --------------------------------------------------------------------------


def bench_book(p: Params) -> dict[str, Any]:
    from actors._process import tune_process
    from actors._quota_book import QuotaBook

    config = bench_config()
    tune_process(config)  # as the quota actor's process does
    book = QuotaBook(config)
    submit_s = settle_s = 0.0
    decided = granted = calls = 0
    submit_ms: list[float] = []
    t_all = time.perf_counter()
    while time.perf_counter() - t_all < p.seconds:
        batch = asks(p.book_batch, "bench")
        t = time.perf_counter()
        decisions = book.submit(batch)
        dt = time.perf_counter() - t
        submit_s += dt
        submit_ms.append(dt * 1000.0)
        sets, g = settlements(decisions)
        t = time.perf_counter()
        book.settle(sets)
        settle_s += time.perf_counter() - t
        decided += len(decisions)
        granted += g
        calls += 1
    wall = time.perf_counter() - t_all
    return {
        "batch": p.book_batch,
        "calls": calls,
        "decisions": decided,
        "granted": granted,
        "wall_s": round(wall, 3),
        "submit_s": round(submit_s, 3),
        "settle_s": round(settle_s, 3),
        "decisions_per_s_submit": round(decided / submit_s),
        "decisions_per_s_submit_settle": round(decided / (submit_s + settle_s)),
        "submit_call_ms": percentiles(submit_ms),
    }


# -- through Ray ---------------------------------------------------------------------------


async def _caller(
    actor: Any, owner: str, batch: int, until: float, out: dict[str, list[float]]
) -> tuple[int, int]:
    decided = granted = 0
    while time.perf_counter() < until:
        work = asks(batch, owner)
        t = time.perf_counter()
        # As the gateway sends them: one msgpack blob per batch (actors._messages.Packed).
        decisions = await actor.submit.remote(Packed("ask", work))
        out["submit_ms"].append((time.perf_counter() - t) * 1000.0)
        sets, g = settlements(decisions)
        t = time.perf_counter()
        await actor.settle.remote(Packed("settlement", sets))
        out["settle_ms"].append((time.perf_counter() - t) * 1000.0)
        decided += len(decisions)
        granted += g
    return decided, granted


async def _actor_series(actor: Any, batch: int, callers: int, seconds: float) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"submit_ms": [], "settle_ms": []}
    t0 = time.perf_counter()
    until = t0 + seconds
    results = await asyncio.gather(
        *(_caller(actor, f"bench-{i}", batch, until, lat) for i in range(callers))
    )
    wall = time.perf_counter() - t0
    decided = sum(d for d, _ in results)
    granted = sum(g for _, g in results)
    return {
        "batch": batch,
        "callers": callers,
        "calls": len(lat["submit_ms"]),
        "decisions": decided,
        "granted": granted,
        "wall_s": round(wall, 3),
        # A decision here is one ask submitted, answered and its lease settled.
        "decisions_per_s": round(decided / wall),
        "submit_call_ms": percentiles(lat["submit_ms"]),
        "settle_call_ms": percentiles(lat["settle_ms"]),
    }


def bench_actor(p: Params, notes: dict[str, Any]) -> list[dict[str, Any]]:
    """The actor restores from and checkpoints to its Kafka topic: a local broker runs too."""
    import ray

    from actors.quota import quota_actor

    work = Path(tempfile.mkdtemp(prefix="qf-bench-quota-decisions-"))
    notes["work_dir"] = str(work)
    kafka = LocalKafka(home=work / "home")
    try:
        t = time.perf_counter()
        bootstrap = kafka.up(0)
        notes["kafka_up_s"] = round(time.perf_counter() - t, 1)
        return _with_ray(p, notes, bench_config(bootstrap), ray, quota_actor)
    finally:
        kafka.down()
        left = leftovers(work, os.getpid())
        if left:
            notes["leftover_processes"] = left
            print(f"warning: processes left behind: {left}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


def _with_ray(
    p: Params, notes: dict[str, Any], config: Config, ray: Any, quota_actor: Any
) -> list[dict[str, Any]]:
    t = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    notes["ray_init_s"] = round(time.perf_counter() - t, 1)
    try:
        actor = quota_actor(config)
        t = time.perf_counter()
        ray.get(actor.warm.remote())
        notes["actor_start_s"] = round(time.perf_counter() - t, 1)

        async def series() -> list[dict[str, Any]]:
            # Warm-up: the first calls pay for imports and serialisation setup.
            await _actor_series(actor, 100, 1, 0.5)
            out = [await _actor_series(actor, b, 1, p.seconds) for b in p.actor_batches]
            out.append(
                await _actor_series(actor, p.concurrent_batch, p.concurrent_callers, p.seconds)
            )
            return out

        result = asyncio.run(series())
        with contextlib.suppress(Exception):
            snap = ray.get(actor.snapshot.remote())
            notes["actor_snapshot_keys"] = sorted(snap)[:20] if isinstance(snap, dict) else None
        return result
    finally:
        ray.shutdown()


def run(p: Params) -> dict[str, Any]:
    started = datetime.now()
    t0 = time.perf_counter()
    notes: dict[str, Any] = {"loadavg_at_start": os.getloadavg(), "ray_owner_pid": os.getpid()}
    book = bench_book(p)
    actor = bench_actor(p, notes) if p.actor else []
    notes["loadavg_at_end"] = os.getloadavg()
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "params": {
            "seconds_per_series": p.seconds,
            "deployments": len(DEPLOYMENTS),
            "limits": LIMITS,
            "prompt_tokens": PROMPT_TOKENS,
            "max_tokens": MAX_TOKENS,
        },
        "notes": notes,
        "book": book,
        "actor": actor,
    }


# -- reporting ---------------------------------------------------------------------------


def _lat(q: dict[str, float]) -> str:
    return f"{q['p50']:.2f} / {q['p99']:.2f}" if q.get("n") else "-"


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'series':<22}{'batch':>6}{'calls':>7}{'decisions/s':>13}"
        f"{'submit p50/p99':>18}{'settle p50/p99':>18}"
    )
    lines = [head, "-" * len(head)]
    b = result["book"]
    lines.append(
        f"{'book submit':<22}{b['batch']:>6}{b['calls']:>7}{b['decisions_per_s_submit']:>13}"
        f"{_lat(b['submit_call_ms']):>18}"
    )
    lines.append(
        f"{'book submit+settle':<22}{b['batch']:>6}{b['calls']:>7}"
        f"{b['decisions_per_s_submit_settle']:>13}"
    )
    for a in result["actor"]:
        label = f"actor x{a['callers']}"
        lines.append(
            f"{label:<22}{a['batch']:>6}{a['calls']:>7}{a['decisions_per_s']:>13}"
            f"{_lat(a['submit_call_ms']):>18}{_lat(a['settle_call_ms']):>18}"
        )
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "quota_decisions"
_MD_INTRO = """\
Quota decisions per second. Four deployments with limits far above the load, every ask
(20 prompt + 16 max tokens, any of the four) granted at once, each lease settled.
**book**: `QuotaBook.submit` in-process, batches of 500, decisions/s over the submit time
(and over submit + settle); **actor xN**: N concurrent callers of the Ray quota actor,
`submit.remote(batch)` then `settle.remote(leases)`, decisions/s = asks answered and
settled / wall time; latencies are per call, ms. Each series runs for the JSON's
`seconds_per_series` (3 s by default) on a 2-core machine shared with Ray itself and a
local broker (the actor restores from and checkpoints to its Kafka topic)."""
_MD_COLUMNS = (
    "date",
    "machine",
    "series",
    "batch",
    "calls",
    "decisions/s",
    "submit p50 / p99 ms",
    "settle p50 / p99 ms",
    "loadavg start -> end",
    "results",
)


def record(result: dict[str, Any], json_path: Path) -> Path:
    date = result["started_at"].replace("T", " ")[:16]
    summary = machine_summary(result["machine"])
    n = result["notes"]
    loadavg = f"{n['loadavg_at_start'][0]:.1f} -> {n['loadavg_at_end'][0]:.1f}"
    rel = f"`{json_path.relative_to(REPO)}`"
    b = result["book"]
    rows = [
        [
            "book submit (submit+settle)",
            str(b["batch"]),
            str(b["calls"]),
            f"{b['decisions_per_s_submit']} ({b['decisions_per_s_submit_settle']})",
            _lat(b["submit_call_ms"]),
            "-",
        ]
    ]
    for a in result["actor"]:
        rows.append(
            [
                f"actor x{a['callers']}",
                str(a["batch"]),
                str(a["calls"]),
                str(a["decisions_per_s"]),
                _lat(a["submit_call_ms"]),
                _lat(a["settle_call_ms"]),
            ]
        )
    path = json_path
    for row in rows:
        path = add_row(_MD_SECTION, _MD_INTRO, _MD_COLUMNS, [date, summary, *row, loadavg, rel])
    return path


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quota_decisions", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="work per series (>= 2)")
    ap.add_argument("--no-actor", action="store_true", help="only the in-process QuotaBook")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    if a.seconds <= 0:
        ap.error("--seconds must be > 0")
    return Params(seconds=a.seconds, actor=not a.no_actor, record=not a.no_record)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parse_args(argv)
    result = run(p)
    publish(NAME, result, format_table(result), record if p.record else None)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
