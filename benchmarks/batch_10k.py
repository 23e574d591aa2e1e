"""Batch mode on 10,000 prompts: `quotaflow send --file` through the whole local stack.

One run starts a local broker, the simulator (`quotaflow sim`) and the gateway
(`quotaflow run`, Ray started by it), writes 10,000 short-form prompts and runs the real
CLI on them, as a child process with stderr not a terminal (so it prints its periodic
lines, as in a nightly job's log):

* **straight**: one run over the whole file; wall time (process start to exit), the
  batch's own elapsed time and rate (from its summary line), results by status, tokens,
  and the gateway's `timing` (queued, total) of the done results;
* **interrupted** (unless `--interrupt-at 0`): a second file of 10,000 new prompts, SIGINT
  once a share of it has results, then the same command again; wall time of both runs,
  how many the resume skipped, and the simulator's admitted calls per id (each id must
  reach the upstream once: a resent id would show as a duplicate call).

Limits are far above the load, so the figures are the pipeline's throughput, not quota.

    .venv/bin/python -m benchmarks.batch_10k [--n 10000] [--window 256] [--interrupt-at 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO,
    add_row,
    bench_work,
    machine,
    machine_summary,
    percentiles,
    publish,
    start_simulator,
    stop_proc,
    wait_line,
)
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.stack import GatewayProcess, sim_config_dict, write_config

__all__ = ["Params", "format_table", "main", "run"]

NAME = "batch_10k"
# Limits far above what the benchmark sends: nothing may wait for quota.
LIMITS = {"rpm": 1_000_000, "tpm": 1_000_000_000}
# One CLI run over 10,000 prompts: generous for a loaded 2-core machine.
RUN_TIMEOUT_S = 1_800.0
# The interrupted run: until its share of results is written.
PROGRESS_TIMEOUT_S = 900.0
# After SIGINT: the window in flight answers well within this.
GRACE_S = 60.0
_SUMMARY = re.compile(r"results in (?P<s>[\d.]+) s[^(]*\((?P<rate>[\d.]+) req/s\)")
_SKIPPED = re.compile(r"skipped (?P<n>\d+) already done in")


@dataclass(frozen=True)
class Params:
    n: int = 10_000
    window: int = 256
    max_tokens: int = 16
    sim_ttft_ms: int = 20
    sim_inter_token_ms: int = 1
    interrupt_at: float = 0.3
    keep: bool = False
    record: bool = True


@dataclass
class CliRun:
    """One `quotaflow send --file` process."""

    code: int
    wall_s: float
    stderr: str

    @property
    def batch_s(self) -> float | None:
        m = _SUMMARY.search(self.stderr)
        return float(m.group("s")) if m else None

    @property
    def batch_rate(self) -> float | None:
        m = _SUMMARY.search(self.stderr)
        return float(m.group("rate")) if m else None

    @property
    def skipped(self) -> int | None:
        m = _SKIPPED.search(self.stderr)
        return int(m.group("n")) if m else None

    def summary(self) -> dict[str, Any]:
        return {
            "exit_code": self.code,
            "wall_s": round(self.wall_s, 2),
            "batch_s": self.batch_s,
            "batch_rate_per_s": self.batch_rate,
            "skipped": self.skipped,
            "stderr": self.stderr.splitlines(),
        }


def _write_prompts(path: Path, n: int, tag: str, max_tokens: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            prompt = f"Nightly batch {tag}, item {i}: summarise ticket #{i} in one line."
            f.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")


def _cmd(config_path: Path, inp: Path, out: Path, p: Params) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "send",
        "--config",
        str(config_path),
        "--model",
        "fast",
        "--file",
        str(inp),
        "--out",
        str(out),
        "--window",
        str(p.window),
        "--grace",
        str(GRACE_S),
    ]


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _cli(cmd: list[str], log: Path, *, interrupt_after: int | None, out: Path) -> CliRun:
    """Run the CLI to its end, or SIGINT it once `out` has `interrupt_after` lines."""
    t0 = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, start_new_session=True
        )
    try:
        if interrupt_after is not None:
            give_up = time.monotonic() + PROGRESS_TIMEOUT_S
            while _count_lines(out) < interrupt_after:
                if proc.poll() is not None:
                    break
                if time.monotonic() > give_up:
                    raise RuntimeError(f"only {_count_lines(out)} results in {PROGRESS_TIMEOUT_S}s")
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop_proc(proc)
    return CliRun(code=code, wall_s=time.perf_counter() - t0, stderr=log.read_text())


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]


def _outcome(results: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """What the results file says: statuses, completeness, tokens, cost, gateway timing."""
    done = [r for r in results if r["status"] == "done"]
    ids = [r["id"] for r in results]
    return {
        "lines": len(results),
        "distinct_ids": len(set(ids)),
        "input_lines_covered": len({r["line"] for r in results}),
        "complete": len(set(ids)) == len(results) == n,
        "statuses": dict(Counter(r["status"] for r in results)),
        "prompt_tokens": sum(r["usage"]["prompt_tokens"] for r in done),
        "completion_tokens": sum(r["usage"]["completion_tokens"] for r in done),
        "cost_usd": round(sum(r["cost_usd"] for r in done), 6),
        "cache": dict(Counter(r["cache"] for r in done)),
        "gateway_queued_ms": percentiles([r["timing"]["queued_ms"] for r in done]),
        "gateway_total_ms": percentiles([r["timing"]["total_ms"] for r in done]),
    }


def _upstream_calls(sim_log: Path, ids: set[str]) -> dict[str, Any]:
    """Calls the simulator admitted (HTTP 200) per id of `ids`: each should be exactly 1."""
    calls: Counter[str] = Counter()
    for ln in sim_log.read_text().splitlines() if sim_log.exists() else []:
        rec = json.loads(ln)
        rid = rec.get("client_request_id")
        if rid in ids and rec.get("status") == 200:
            calls[rid] += 1
    return {
        "ids": len(ids),
        "admitted_calls": sum(calls.values()),
        "ids_called_more_than_once": sum(1 for c in calls.values() if c > 1),
        "ids_never_called": len(ids - set(calls)),
    }


async def _measure(p: Params, work: Path, notes: dict[str, Any]) -> dict[str, Any]:
    kafka = LocalKafka(home=work / "home")
    sim_proc: subprocess.Popen[bytes] | None = None
    gateway: GatewayProcess | None = None
    try:
        t = time.perf_counter()
        bootstrap = await asyncio.to_thread(kafka.up, 0)
        notes["kafka_up_s"] = round(time.perf_counter() - t, 1)
        raw = sim_config_dict(
            bootstrap=bootstrap,
            sim_port=free_port(),
            sim_log=work / "sim.jsonl",
            limits=LIMITS,
            sim={
                "ttft_ms": p.sim_ttft_ms,
                "inter_token_ms": p.sim_inter_token_ms,
                "output_tokens": p.max_tokens,
            },
        )
        config_path = work / "quotaflow.yaml"
        write_config(raw, config_path)
        sim_log = work / "sim.out"
        sim_proc = start_simulator(config_path, sim_log)
        notes["simulator"] = await asyncio.to_thread(
            wait_line, sim_log, b"simulator listening on", sim_proc, 60.0
        )
        t = time.perf_counter()
        gateway = GatewayProcess(config_path, work / "gateway.log")
        await gateway.start()
        assert gateway.proc is not None
        notes["gateway_pid"] = gateway.proc.pid
        notes["gateway_start_s"] = round(time.perf_counter() - t, 1)
        return await asyncio.to_thread(_phases, p, work, config_path)
    finally:
        if gateway is not None:
            notes["gateway_exit"] = await gateway.stop()
        if sim_proc is not None:
            await asyncio.to_thread(stop_proc, sim_proc)
        await asyncio.to_thread(kafka.down)


def _phases(p: Params, work: Path, config_path: Path) -> dict[str, Any]:
    series: dict[str, Any] = {}
    sim_log = work / "sim.jsonl"

    inp, out = work / "straight.jsonl", work / "straight.out.jsonl"
    _write_prompts(inp, p.n, uuid.uuid4().hex[:8], p.max_tokens)
    straight = _cli(
        _cmd(config_path, inp, out, p), work / "straight.log", interrupt_after=None, out=out
    )
    results = _results(out)
    series["straight"] = {
        "run": straight.summary(),
        **_outcome(results, p.n),
        "upstream": _upstream_calls(sim_log, {r["id"] for r in results if r["status"] == "done"}),
    }

    if p.interrupt_at > 0:
        inp, out = work / "resume.jsonl", work / "resume.out.jsonl"
        _write_prompts(inp, p.n, uuid.uuid4().hex[:8], p.max_tokens)
        cmd = _cmd(config_path, inp, out, p)
        at = max(1, int(p.n * p.interrupt_at))
        first = _cli(cmd, work / "resume-1.log", interrupt_after=at, out=out)
        written = _count_lines(out)
        second = _cli(cmd, work / "resume-2.log", interrupt_after=None, out=out)
        results = _results(out)
        series["interrupted"] = {
            "interrupt_after_results": at,
            "results_at_interrupt": written,
            "first_run": first.summary(),
            "resumed_run": second.summary(),
            "wall_s_total": round(first.wall_s + second.wall_s, 2),
            **_outcome(results, p.n),
            "upstream": _upstream_calls(
                sim_log, {r["id"] for r in results if r["status"] == "done"}
            ),
        }
    return series


async def run(p: Params) -> dict[str, Any]:
    """The whole benchmark; returns what goes to the results JSON."""
    started = datetime.now()
    t0 = time.perf_counter()
    with bench_work("batch", keep=p.keep) as (work, notes, left):
        series = await _measure(p, work, notes)
    return {
        "benchmark": NAME,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "params": {
            "n": p.n,
            "window": p.window,
            "max_tokens": p.max_tokens,
            "sim_ttft_ms": p.sim_ttft_ms,
            "sim_inter_token_ms": p.sim_inter_token_ms,
            "interrupt_at": p.interrupt_at,
            "grace_s": GRACE_S,
            "limits": LIMITS,
        },
        "notes": notes,
        "leftover_processes": left,
        "series": series,
    }


# -- reporting ----------------------------------------------------------------------------


def _statuses(s: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items())) or "-"


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for name, s in result["series"].items():
        run_ = s.get("run") or s["resumed_run"]
        lines.append(f"{name}:")
        if name == "straight":
            lines.append(
                f"  wall {s['run']['wall_s']} s; batch {run_['batch_s']} s at "
                f"{run_['batch_rate_per_s']} req/s; exit {run_['exit_code']}"
            )
        else:
            f, r = s["first_run"], s["resumed_run"]
            lines.append(
                f"  SIGINT at {s['interrupt_after_results']} results -> exit {f['exit_code']} "
                f"with {s['results_at_interrupt']} written ({f['wall_s']} s); resumed: skipped "
                f"{r['skipped']}, exit {r['exit_code']} ({r['wall_s']} s)"
            )
        q, tot = s["gateway_queued_ms"], s["gateway_total_ms"]
        up = s["upstream"]
        lines.append(
            f"  {s['lines']} lines, {s['distinct_ids']} ids, complete={s['complete']}: "
            f"{_statuses(s)}; tokens {s['prompt_tokens'] + s['completion_tokens']}; "
            f"cost ${s['cost_usd']:.6f}"
        )
        lines.append(
            f"  gateway queued p50/p99 {q.get('p50')}/{q.get('p99')} ms, total p50/p99 "
            f"{tot.get('p50')}/{tot.get('p99')} ms; upstream calls {up['admitted_calls']} for "
            f"{up['ids']} ids ({up['ids_called_more_than_once']} twice or more, "
            f"{up['ids_never_called']} never)"
        )
    lines.append(f"took {result['duration_s']} s; {machine_summary(result['machine'])}")
    return "\n".join(lines)


_MD_SECTION = "batch_10k: `quotaflow send --file` on 10,000 prompts"
_MD_INTRO = """\
The real CLI (`quotaflow send --file IN --out OUT --window 256`, stderr not a terminal)
through broker, gateway and simulator on one machine; simulator `ttft_ms` 20,
`inter_token_ms` 1, 16 tokens per answer, limits far above the load. **wall**: process
start to exit (Python start, Kafka connect, the 10,000 requests); **batch s / req/s**: the
CLI's own summary (first publish to last result). **gateway p50/p99**: `timing.total_ms`
of the done results. **interrupted**: a second file of 10,000, SIGINT at 30% of results
(grace 60 s), then the same command again: results written at the signal, what the resume
skipped, both runs' wall time. **upstream**: simulator-admitted calls / ids with a result
(a resent id would show as an extra call)."""
_MD_COLUMNS = (
    "date",
    "machine",
    "prompts",
    "window",
    "wall s",
    "batch s",
    "req/s",
    "statuses",
    "gateway p50/p99 ms",
    "interrupted: written -> skipped, wall s",
    "upstream calls / ids",
    "loadavg start -> end",
    "results",
)


def record(result: dict[str, Any], json_path: Path) -> Path:
    """One BENCHMARKS.md row for this run."""
    date = result["started_at"].replace("T", " ")[:16]
    notes = result["notes"]
    s = result["series"]["straight"]
    tot = s["gateway_total_ms"]
    calls = f"{s['upstream']['admitted_calls']} / {s['upstream']['ids']}"
    interrupted = "-"
    if "interrupted" in result["series"]:
        i = result["series"]["interrupted"]
        interrupted = (
            f"{i['results_at_interrupt']} -> {i['resumed_run']['skipped']}, "
            f"{i['first_run']['wall_s']} + {i['resumed_run']['wall_s']}; {_statuses(i)}"
        )
        calls += f"; {i['upstream']['admitted_calls']} / {i['upstream']['ids']}"
    return add_row(
        _MD_SECTION,
        _MD_INTRO,
        _MD_COLUMNS,
        [
            date,
            machine_summary(result["machine"]),
            str(result["params"]["n"]),
            str(result["params"]["window"]),
            f"{s['run']['wall_s']:.1f}",
            f"{s['run']['batch_s']}",
            f"{s['run']['batch_rate_per_s']}",
            _statuses(s),
            f"{tot.get('p50')} / {tot.get('p99')}",
            interrupted,
            calls,
            f"{notes['loadavg_at_start'][0]:.1f} -> {notes['loadavg_at_end'][0]:.1f}",
            f"`{json_path.relative_to(REPO)}`",
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch_10k", description=__doc__)
    ap.add_argument("--n", type=int, default=10_000, help="prompts per file")
    ap.add_argument("--window", type=int, default=256, help="the batch's --window")
    ap.add_argument(
        "--interrupt-at",
        type=float,
        default=0.3,
        help="share of results after which the second file's run is interrupted (0: skip)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, broker data)")
    ap.add_argument("--no-record", action="store_true", help="write neither JSON nor BENCHMARKS.md")
    a = ap.parse_args(argv)
    if a.n < 1 or a.window < 1 or not 0 <= a.interrupt_at < 1:
        ap.error("--n and --window must be >= 1, --interrupt-at in [0, 1)")
    return Params(
        n=a.n,
        window=a.window,
        interrupt_at=a.interrupt_at,
        keep=a.keep,
        record=not a.no_record,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parse_args(argv)
    result = asyncio.run(run(p))
    publish(NAME, result, format_table(result), record if p.record else None)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
