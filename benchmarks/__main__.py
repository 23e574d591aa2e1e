"""Run the benchmark suite: `make bench` or `.venv/bin/python -m benchmarks [--n 200 ...]`.

For now the suite is one benchmark, `ttft`; its options are the suite's.
"""

from __future__ import annotations

import sys

from benchmarks import ttft


def main(argv: list[str] | None = None) -> int:
    ttft.main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
