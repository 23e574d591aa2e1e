"""`quotaflow demo` end to end: it answers its sample traffic and leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.demo import STREAM_MARKER
from pipeline.kafka_local import LocalKafka

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Broker, Ray and 8 requests take ~20 s on 2 cores; generous for a loaded CI machine.
RUN_TIMEOUT_S = 300.0
# Until the first token streams: broker and Ray start first (Ray is the slow part).
STREAMING_TIMEOUT_S = 240.0
# After SIGINT: drain, Ray shutdown and broker stop.
STOP_TIMEOUT_S = 60.0
# Ray's raylet and GCS may take a moment to go after the driver's ray.shutdown().
GONE_TIMEOUT_S = 15.0
REPO = Path(__file__).resolve().parent.parent


def _demo_cmd(home: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "demo", "--requests", "8", "--home", str(home)]


def _env() -> dict[str, str]:
    return {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}


def _cmdlines() -> dict[int, str]:
    """Command line of every process we can read, by pid."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            found[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def _leftovers(needles: list[str]) -> dict[int, str]:
    """Processes (not this one) whose command line contains any of `needles`."""
    return {
        pid: cmd
        for pid, cmd in _cmdlines().items()
        if pid != os.getpid() and any(n in cmd for n in needles)
    }


def _assert_nothing_left(home: Path, output: str) -> None:
    """No process of this demo's home (broker, watchdog) nor of its Ray session survives."""
    needles = [str(home), *re.findall(r"ray session: (\S+)", output)]
    give_up = time.monotonic() + GONE_TIMEOUT_S
    left = _leftovers(needles)
    while left and time.monotonic() < give_up:
        time.sleep(0.2)
        left = _leftovers(needles)
    assert not left, f"left running: {left}"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to look for leftovers")
def test_demo_answers_everything_and_cleans_up(tmp_path: Path) -> None:
    done = subprocess.run(
        _demo_cmd(tmp_path),
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr[-3000:]}"
    assert STREAM_MARKER in out
    assert "unknown_model" in out
    assert "deadline_exceeded" in out
    assert re.search(r"OK: 8/8 requests answered as expected \(.*done 6", out), out
    assert "dead-lettered broken message" in out
    assert (tmp_path / "demo.yaml").is_file()
    _assert_nothing_left(tmp_path, out)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to look for leftovers")
def test_demo_stops_everything_on_sigint(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    home = tmp_path / "home"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _demo_cmd(home),
            cwd=REPO,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        give_up = time.monotonic() + STREAMING_TIMEOUT_S
        while STREAM_MARKER.encode() not in log.read_bytes():
            assert proc.poll() is None, f"demo exited early ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < give_up, f"no streaming yet:\n{log.read_text()}"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code in (0, 130), f"exit {code}\n{text}"
    _assert_nothing_left(tmp_path, text)
    assert not LocalKafka(home).status().running
