"""Shared by the benchmarks: machine description, percentiles, results JSON, BENCHMARKS.md rows."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS_MD",
    "REPO",
    "RESULTS_DIR",
    "add_row",
    "bench_work",
    "http_json",
    "leftovers",
    "machine",
    "machine_summary",
    "other_stacks",
    "percentiles",
    "publish",
    "stamp",
    "start_simulator",
    "stop_proc",
    "wait_line",
    "write_json",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"

_MD_HEADER = """\
# Benchmarks

Figures measured by `make bench` (or `.venv/bin/python -m benchmarks`; one benchmark
alone: `.venv/bin/python -m benchmarks.ttft`). Every run appends its rows to the tables
below and writes every percentile, the raw samples and the machine description to
`benchmarks/results/<name>-<YYYYMMDD-HHMMSS>.json`. Nothing here is hard-coded: a row is
one run on the machine it names, with everything (broker, Ray, simulator, load
generator) on that machine. Times are milliseconds.
"""

_PERCENTILES = (50.0, 90.0, 99.0)


def stamp(now: datetime | None = None) -> str:
    """`YYYYMMDD-HHMMSS` in local time, for result file names."""
    return (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Where the figures come from: OS, CPU, cores, memory and the versions that matter."""
    from pipeline.kafka_local import KAFKA_VERSION

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "mem_total_gb": _mem_total_gb(),
        "python": sys.version.split()[0],
        "kafka": KAFKA_VERSION,
        "ray": _version("ray"),
        "aiokafka": _version("aiokafka"),
        "openai": _version("openai"),
        "quotaflow": _version("quotaflow"),
    }


def machine_summary(m: dict[str, Any]) -> str:
    """One short line for a table cell."""
    return (
        f"{m['cpu_model']}, {m['cpus_usable']} cores, {m['mem_total_gb']} GB, "
        f"py {m['python']}, Kafka {m['kafka']}, Ray {m['ray']}"
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, 'linear')."""
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """`{"n", "p50", "p90", "p99", "max", "mean"}` of `samples` (rounded to 0.001)."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    out: dict[str, float] = {"n": len(ordered)}
    for p in _PERCENTILES:
        out[f"p{p:g}"] = round(_quantile(ordered, p / 100.0), 3)
    out["max"] = round(ordered[-1], 3)
    out["mean"] = round(sum(ordered) / len(ordered), 3)
    return out


def publish(
    name: str,
    result: dict[str, Any],
    table: str,
    record: Callable[[dict[str, Any], Path], Path] | None,
) -> None:
    """Print a run's table; with `record`, write its JSON and append its BENCHMARKS.md rows."""
    print(table)
    if record is None:
        return
    json_path = write_json(name, result, stamp(datetime.fromisoformat(result["started_at"])))
    md = record(result, json_path)
    print(f"results: {json_path.relative_to(REPO)}; rows appended to {md.relative_to(REPO)}")


def write_json(name: str, data: dict[str, Any], when: str) -> Path:
    """`benchmarks/results/<name>-<when>.json`."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{when}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def add_row(section: str, intro: str, columns: Sequence[str], row: Sequence[str]) -> Path:
    """Append `row` to the table of `section` in BENCHMARKS.md (created with its header).

    Each benchmark owns one `## section` with one table; rows go after its last row, so
    sections of other benchmarks stay where they are.
    """
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _MD_HEADER
    heading = f"## {section}"
    line = "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |"
    lines = text.rstrip("\n").split("\n")
    if heading not in lines:
        lines += [
            "",
            heading,
            "",
            *intro.strip("\n").split("\n"),
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
        ]
    start = lines.index(heading)
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    last_table = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_table + 1, line)
    BENCHMARKS_MD.write_text("\n".join(lines) + "\n")
    return BENCHMARKS_MD


# -- processes the benchmarks start ------------------------------------------------------


def wait_line(path: Path, marker: bytes, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """Wait for `marker` in the log `path` of `proc`; returns the rest of that line."""
    give_up = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes() if path.exists() else b""
        at = data.find(marker)
        if at >= 0:
            return data[at:].split(b"\n", 1)[0].decode()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; see {path}")
        if time.monotonic() > give_up:
            raise RuntimeError(f"no {marker!r} in {path} after {timeout_s}s")
        time.sleep(0.05)


def start_simulator(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """`python -m pipeline.cli sim --config FILE` in its own process (and session)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "sim", "--config", str(config_path)],
            stdout=out,
            stderr=out,
            cwd=REPO,
            start_new_session=True,
        )


def stop_proc(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL the process group if it does not exit in `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cmdlines() -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue
    return out


def other_stacks() -> int:
    """Brokers, Ray nodes, simulators and gateways running on the machine (anyone's)."""
    kinds = (b"kafka.Kafka", b"raylet", b"pipeline.cli")
    return sum(any(k in cmd for k in kinds) for cmd in _cmdlines().values())


def leftovers(work: Path, ray_owner_pid: int | None) -> dict[int, str]:
    """Processes a run started that are still alive: anything naming its work dir, and the
    Ray session started by `ray_owner_pid` (Ray names the session after that pid)."""
    needle = str(work).encode()
    session = re.compile(rb"session_[0-9_-]+_%d\b" % ray_owner_pid) if ray_owner_pid else None
    me = os.getpid()
    return {
        pid: cmd.replace(b"\0", b" ").decode(errors="replace")[:160]
        for pid, cmd in _cmdlines().items()
        if pid != me and (needle in cmd or (session is not None and session.search(cmd)))
    }


@contextlib.contextmanager
def bench_work(
    name: str, *, keep: bool, owner_keys: Sequence[str] = ("gateway_pid",)
) -> Iterator[tuple[Path, dict[str, Any], dict[int, str]]]:
    """A run's work directory, its notes and (filled on exit) the processes it left behind.

    The notes say what else shared the cores (load average, other stacks) at the start and
    the end. `owner_keys` name the notes holding the pids (or lists of pids) whose Ray
    sessions belong to the run. The directory is removed after a clean run unless `keep`;
    kept, it is named on stderr."""
    work = Path(tempfile.mkdtemp(prefix=f"qf-bench-{name}-"))
    notes: dict[str, Any] = {
        "work_dir": str(work),
        "loadavg_at_start": os.getloadavg(),
        "other_stacks_at_start": other_stacks(),
    }
    left: dict[int, str] = {}
    ok = False
    try:
        yield work, notes, left
        ok = True
    finally:
        notes["loadavg_at_end"] = os.getloadavg()
        left.update(leftovers(work, None))  # what names the work dir
        notes["other_stacks_at_end"] = other_stacks() - len(left)
        for key in owner_keys:
            value = notes.get(key)
            for pid in value if isinstance(value, list) else [value]:
                left.update(leftovers(work, pid))
        if left:
            print(f"warning: processes left behind: {left}", file=sys.stderr)
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)


def http_json(url: str, *, method: str = "GET", timeout_s: float = 10.0) -> Any:
    """GET or POST (empty body) `url`; the decoded JSON answer (blocking: use a thread)."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read() or b"null")
