"""Run the benchmark suite: `make bench` or `.venv/bin/python -m benchmarks [--only NAME ...]`.

Runs, in order, `ttft`, `throughput`, `quota_decisions`, `quota_util` (it needs the `bench` extra:
litellm), `routing_cost`, `cache_hit`, `batch_10k`, `semantic_eval` (the `semantic`
extra and ../shared/data) and `memory` (long: a 10-minute soak), then prints one table of
issue 8's targets (`benchmarks/_summary.py`): measured value from this run, else from the
newest `benchmarks/results/<name>-*.json` (dated), met or not. `--summary` prints only that
table. Nothing here needs make: `.venv/bin/python -m benchmarks` is the whole suite. Other
options go to every benchmark that is run, so pass them with `--only` (e.g. `python -m
benchmarks --only ttft --n 100`); each benchmark alone: `python -m benchmarks.<name> --help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import (
    batch_10k,
    cache_hit,
    memory,
    quota_decisions,
    quota_util,
    routing_cost,
    semantic_eval,
    throughput,
    ttft,
)
from benchmarks._summary import format_summary, summary_lines

SUITE: dict[str, Callable[[Sequence[str] | None], Any]] = {
    "ttft": ttft.main,
    "throughput": throughput.main,
    "quota_decisions": quota_decisions.main,
    "quota_util": quota_util.main,
    "routing_cost": routing_cost.main,
    "cache_hit": cache_hit.main,
    "batch_10k": batch_10k.main,
    "semantic_eval": semantic_eval.main,
    # Long (a 10-minute soak): last.
    "memory": memory.main,
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument(
        "--only", action="append", choices=sorted(SUITE), help="run only these (repeatable)"
    )
    ap.add_argument(
        "--summary",
        action="store_true",
        help="print only issue 8's targets table, from the newest results JSONs",
    )
    a, rest = ap.parse_known_args(args)
    if a.summary:
        print(format_summary(summary_lines()))
        return 0
    names = a.only or list(SUITE)
    results: dict[str, Any] = {}
    for name in SUITE:
        if name in names:
            print(f"== {name}", flush=True)
            results[name] = SUITE[name](rest)
    # Figures of benchmarks not run now come from their newest results JSON (dated).
    print(format_summary(summary_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
