"""Run the benchmark suite: `make bench` or `.venv/bin/python -m benchmarks [--only NAME ...]`.

Runs, in order, `ttft`, `quota_decisions`, `quota_util` (it needs the `bench` extra:
litellm), `routing_cost`, `cache_hit`, `batch_10k` and `semantic_eval` (the `semantic`
extra and ../shared/data). Other options go to every benchmark that is run, so pass them with
`--only` (e.g. `python -m benchmarks --only ttft --n 100`); each benchmark alone:
`python -m benchmarks.<name> --help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import (
    batch_10k,
    cache_hit,
    quota_decisions,
    quota_util,
    routing_cost,
    semantic_eval,
    ttft,
)

SUITE: dict[str, Callable[[Sequence[str] | None], Any]] = {
    "ttft": ttft.main,
    "quota_decisions": quota_decisions.main,
    "quota_util": quota_util.main,
    "routing_cost": routing_cost.main,
    "cache_hit": cache_hit.main,
    "batch_10k": batch_10k.main,
    "semantic_eval": semantic_eval.main,
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument(
        "--only", action="append", choices=sorted(SUITE), help="run only these (repeatable)"
    )
    a, rest = ap.parse_known_args(args)
    names = a.only or list(SUITE)
    for name in SUITE:
        if name in names:
            print(f"== {name}", flush=True)
            SUITE[name](rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
