"""Batch progress on stderr: a rich bar on a terminal, periodic one-line summaries elsewhere.

A CI log gets one plain line every few seconds instead of a redrawn bar; both show
done/total, the rate (requests/s) and the time left. The tally behind them also makes
the final summary: counts by status, tokens, cost, wall time and rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline._batch_results import DONE, BatchResult

__all__ = ["LogView", "RichView", "Tally", "View", "format_duration", "progress_line"]


@dataclass
class Tally:
    """What this run has written so far, and when it started (monotonic seconds)."""

    total: int
    started: float = field(default_factory=time.monotonic)
    statuses: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def finished(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return self.finished - self.statuses[DONE]

    def add(self, result: BatchResult) -> None:
        self.statuses[result.status] += 1
        if result.usage is not None:
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens
        self.cost_usd += result.cost_usd or 0.0

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started

    def rate(self, now: float | None = None) -> float:
        """Results per second since the start."""
        elapsed = self.elapsed(now)
        return self.finished / elapsed if elapsed > 0 else 0.0

    def by_status(self) -> str:
        """`done 9990, invalid_request 10`: done first, then the rest by count."""
        order = sorted(self.statuses.items(), key=lambda kv: (kv[0] != DONE, -kv[1], kv[0]))
        return ", ".join(f"{status} {n}" for status, n in order) or "nothing"


def format_duration(seconds: float) -> str:
    """`45s`, `3m12s`, `2h05m`: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(tally: Tally, now: float | None = None) -> str:
    """`batch: 1234/10000 (12.3%), 45.6 req/s, eta 3m12s, errors 3` (plain, for logs)."""
    done, total = tally.finished, tally.total
    rate = tally.rate(now)
    pct = 100.0 * done / total if total else 100.0
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    return f"batch: {done}/{total} ({pct:.1f}%), {rate:.1f} req/s, eta {eta}, errors {tally.errors}"


class View(Protocol):
    """Where progress goes while a batch runs."""

    def say(self, message: str) -> None:
        """A line of its own (start, stop and summary messages)."""

    def advance(self, result: BatchResult) -> None:
        """One more result written."""

    async def run(self) -> None:
        """Until cancelled: whatever the view does on its own (periodic lines)."""

    def close(self) -> None:
        """Leave the terminal as it was; the view is done."""


class _RateColumn(ProgressColumn):
    """Requests per second, over rich's speed-estimate period."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = f"{speed:.1f}" if speed else "-"
        return Text(f"{shown} req/s", style="progress.data.speed")


class RichView:
    """A live bar on stderr: done/total, rate, elapsed, time left, errors."""

    def __init__(self, tally: Tally, console: Console | None = None) -> None:
        self._tally = tally
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("errors {task.fields[errors]}"),
            console=console or Console(stderr=True),
        )
        self._task: TaskID = self._progress.add_task("batch", total=tally.total, errors=0)
        self._progress.start()

    def say(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)

    def advance(self, result: BatchResult) -> None:
        self._progress.update(self._task, advance=1, errors=self._tally.errors)

    async def run(self) -> None:
        await asyncio.Event().wait()  # rich redraws from its own thread

    def close(self) -> None:
        self._progress.stop()


class LogView:
    """One `progress_line` every `interval_s` seconds on stderr (no terminal: CI logs)."""

    def __init__(self, tally: Tally, interval_s: float) -> None:
        self._tally = tally
        self._interval_s = interval_s

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def advance(self, result: BatchResult) -> None:
        """Nothing: the periodic line reports it."""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self._tally.finished < self._tally.total:
                self.say(progress_line(self._tally))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
