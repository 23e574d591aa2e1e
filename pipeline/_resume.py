"""Turning a stream with `reset`s into one coherent stream, where the retry allows it.

A retry after a stream was cut starts over (`reset`, then the new attempt's chunks). When
the new attempt repeats what was already shown (a deterministic model, temperature 0,
the same provider), the repeat is swallowed and only what is new passes: the reader sees
one uninterrupted answer. When the new attempt says something else, the `reset` itself
passes, followed by the new stream, and the reader must discard what it showed.
"""

from __future__ import annotations

import copy
from typing import Any

from topics.wire import ChunkReply, DoneReply, Reply, ResetReply

__all__ = ["ResetFilter"]


def _content(chunk: dict[str, Any]) -> str:
    return "".join(
        str((c.get("delta") or {}).get("content") or "") for c in chunk.get("choices") or []
    )


def _with_content(chunk: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of a one-choice chunk whose delta content is `text`."""
    out = copy.deepcopy(chunk)
    choices = out.get("choices") or []
    if choices:
        delta = dict(choices[0].get("delta") or {})
        delta["content"] = text
        choices[0]["delta"] = delta
    return out


class ResetFilter:
    """Feed it one request's replies in order; `feed` returns what to pass on."""

    def __init__(self) -> None:
        self._shown = ""  # content passed on so far (since the last passed reset)
        self._replayed: str | None = None  # content of the new attempt, while it repeats
        self._pending_reset: ResetReply | None = None
        self._template: ChunkReply | None = None  # a swallowed chunk, to re-send its text
        self.swallowed = 0

    def feed(self, reply: Reply) -> list[Reply]:
        if isinstance(reply, ResetReply):
            if self._shown:
                self._replayed, self._pending_reset = "", reply
            return []  # with nothing shown there is nothing to undo
        if self._replayed is None:
            if isinstance(reply, ChunkReply):
                self._shown += _content(reply.chunk)
            return [reply]
        if isinstance(reply, ChunkReply):
            return self._replaying(reply)
        # The new attempt ended (or failed) while still repeating.
        if isinstance(reply, DoneReply) and self._replayed == self._shown:
            self._replayed = self._pending_reset = None
            return [reply]
        return [*self._start_over(self._replayed), reply]

    def _replaying(self, reply: ChunkReply) -> list[Reply]:
        text = _content(reply.chunk)
        assert self._replayed is not None
        so_far = self._replayed + text
        if not text and self._replayed == self._shown and _ends(reply.chunk):
            # Repeated everything, and this closes it (finish_reason or usage).
            self._replayed = self._pending_reset = None
            return [reply]
        if self._shown.startswith(so_far):
            # Still repeating what the reader has: swallow it.
            self._replayed = so_far
            self._template = reply
            self.swallowed += 1
            return []
        if so_far.startswith(self._shown):
            # The repeat is over and the new attempt goes on: pass only what is new.
            new = so_far[len(self._shown) :]
            self._shown, self._replayed, self._pending_reset = so_far, None, None
            return [ChunkReply(id=reply.id, seq=reply.seq, chunk=_with_content(reply.chunk, new))]
        # A different answer: the reader must start over after all.
        self._template = reply
        return self._start_over(so_far)

    def _start_over(self, text: str) -> list[Reply]:
        """The held reset, then the new attempt's text so far in one chunk."""
        out: list[Reply] = []
        if self._pending_reset is not None:
            out.append(self._pending_reset)
        if text and self._template is not None:
            t = self._template
            out.append(ChunkReply(id=t.id, seq=t.seq, chunk=_with_content(t.chunk, text)))
        self._shown, self._replayed, self._pending_reset = text, None, None
        return out


def _ends(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices") or []
    return bool(chunk.get("usage")) or any(c.get("finish_reason") for c in choices)
