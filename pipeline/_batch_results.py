"""Batch output: one JSON line per request, and reading an existing file back to resume.

Every line has the same keys, so the file loads as a table:

    {"id", "line", "status", "text", "model", "deployment", "cache", "usage",
     "cost_usd", "attempts", "timing", "metadata", "error"}

`status` is `done` or the error code (the gateway's, or `invalid_request` for a line
that could not be sent, its message naming the line and field); `line` is the input line
(from 1); fields a status does not have are null. Lines are appended in the order
requests finish, each written whole and flushed, so an interruption loses no result that
was written.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import IO, Any, Final

import msgspec

from pipeline._batch_lines import BatchItem
from pipeline.client import Answer
from topics.errors import QuotaflowError
from topics.wire import DoneReply, ErrorBody, Timing, TokenUsage

__all__ = [
    "DONE",
    "INVALID_INPUT",
    "BatchOutputError",
    "BatchResult",
    "Recorded",
    "input_error",
    "open_results",
    "result_of",
    "scan_results",
]

DONE: Final = "done"
# A line that could not be sent: the wire's code for a request that is not valid.
INVALID_INPUT: Final = "invalid_request"


class BatchOutputError(QuotaflowError):
    """The results file cannot be resumed from or written (message names file and line)."""


class BatchResult(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the results file."""

    id: str
    line: int
    status: str
    text: str | None = None
    model: str | None = None
    deployment: str | None = None
    cache: str | None = None
    usage: TokenUsage | None = None
    cost_usd: float | None = None
    attempts: int | None = None
    timing: Timing | None = None
    metadata: dict[str, Any] | None = None
    error: ErrorBody | None = None

    @property
    def ok(self) -> bool:
        return self.status == DONE


def result_of(item: BatchItem, answer: Answer) -> BatchResult:
    """The result line for a request the gateway answered (done or error)."""
    t = answer.terminal
    if isinstance(t, DoneReply):
        return BatchResult(
            id=item.id,
            line=item.line,
            status=DONE,
            text=answer.text,
            model=t.model,
            deployment=t.deployment,
            cache=t.cache,
            usage=t.usage,
            cost_usd=t.cost_usd,
            attempts=t.attempts,
            timing=t.timing,
            metadata=t.metadata,
        )
    return BatchResult(
        id=item.id, line=item.line, status=t.error.code, metadata=t.metadata, error=t.error
    )


def input_error(item: BatchItem) -> BatchResult:
    """The result line for a line that could not be sent (its error names line and field)."""
    message = item.error or f"line {item.line}: cannot be sent"
    return BatchResult(
        id=item.id,
        line=item.line,
        status=INVALID_INPUT,
        error=ErrorBody(code=INVALID_INPUT, message=message, retryable=False),
    )


class _Seen(msgspec.Struct):
    id: str
    line: int
    status: str


_SEEN: Final = msgspec.json.Decoder(_Seen)


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    """What an existing results file holds, as far as resuming needs to know."""

    # id -> status of its (last) line.
    status: dict[str, str]
    # (id, input line) of every result: a duplicate-id line is known by both.
    pairs: frozenset[tuple[str, int]]
    # Bytes that are whole result lines; anything after is a torn write to drop.
    keep_bytes: int
    # The file ends in a whole result without its newline (add one before appending).
    needs_newline: bool = False

    @property
    def count(self) -> int:
        return len(self.status)

    def errors(self) -> Counter[str]:
        return Counter(s for s in self.status.values() if s != DONE)

    def has(self, item: BatchItem) -> bool:
        """Is there a result for `item` already (so a resume skips it)?"""
        if item.duplicate:
            return (item.id, item.line) in self.pairs
        return item.id in self.status


def scan_results(data: bytes, *, source: str) -> Recorded:
    """Read a results file's bytes. A torn last line (a kill mid-write) is marked to drop;
    any other line that is not a result is an error naming the file and line."""
    status: dict[str, str] = {}
    pairs: set[tuple[str, int]] = set()
    offset = 0
    keep = 0
    needs_newline = False
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        end = offset + len(raw) + (0 if last else 1)
        if raw.strip():
            try:
                seen = _SEEN.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                if last:  # no newline after it: a write cut short; drop it
                    break
                raise BatchOutputError(
                    f"{source} line {number}: not a result line ({exc}); fix or move the file "
                    "before resuming into it"
                ) from None
            status[seen.id] = seen.status
            pairs.add((seen.id, seen.line))
            needs_newline = last
        keep = end
        offset = end
    return Recorded(
        status=status, pairs=frozenset(pairs), keep_bytes=keep, needs_newline=needs_newline
    )


def open_results(path: Path) -> tuple[Recorded, IO[bytes]]:
    """What `path` already holds, and the file opened to append (a torn tail cut off)."""
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise BatchOutputError(f"--out: cannot read {str(path)!r}: {exc.strerror}") from None
    recorded = scan_results(data, source=str(path))
    try:
        if recorded.keep_bytes < len(data):
            os.truncate(path, recorded.keep_bytes)
        out = path.open("ab")
    except OSError as exc:
        raise BatchOutputError(f"--out: cannot write {str(path)!r}: {exc.strerror}") from None
    if recorded.needs_newline:
        out.write(b"\n")
        out.flush()
    return recorded, out
