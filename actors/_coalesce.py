"""Token coalescing: a stream's text chunks within a short window go out as one `chunk` reply.

One upstream chunk per reply costs a Kafka record, an encode and a decode per token; a
reader gains nothing from tokens a few ms apart arriving separately. So after the first
chunk with text, which always goes at once (time to first token is what readers wait
on), plain text deltas are merged for up to `window_ms` and sent together; anything else (a role
change, tool calls, logprobs, a usage chunk, another choice) first sends what is held and
then goes alone. A timer sends what is held when the upstream pauses, so no token waits
longer than the window. The merged chunk is an ordinary `chat.completion.chunk`: the
contract lets one reply carry several tokens.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, Protocol

__all__ = ["ChunkCoalescer", "merge_into", "mergeable"]

# Top-level keys of a chunk that a merge may keep from its first chunk (identity and
# metadata; `obfuscation` is OpenAI's stream padding).
_SAME_KEYS: Final = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "service_tier", "obfuscation"}
)
_CHOICE_KEYS: Final = frozenset({"index", "delta", "finish_reason", "logprobs"})
_DELTA_KEYS: Final = frozenset({"content", "role", "refusal"})


class ChunkSink(Protocol):
    """Where merged chunks go: `ReplyStream.chunk`."""

    async def chunk(self, chunk: dict[str, Any]) -> None: ...


def mergeable(chunk: dict[str, Any]) -> bool:
    """A chunk of plain text for one choice: nothing a merge could lose or reorder."""
    # `usage: null` rides on every chunk when usage was asked for (OpenAI's and ours).
    if not _SAME_KEYS.issuperset(
        k for k, v in chunk.items() if k != "choices" and not (k == "usage" and v is None)
    ):
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return False
    c0 = choices[0]
    if not isinstance(c0, dict) or not _CHOICE_KEYS.issuperset(c0):
        return False
    if c0.get("logprobs") is not None:
        return False
    delta = c0.get("delta")
    if not isinstance(delta, dict) or not _DELTA_KEYS.issuperset(delta):
        return False
    if delta.get("refusal") is not None:
        return False
    content = delta.get("content")
    return content is None or isinstance(content, str)


def merge_into(held: dict[str, Any], chunk: dict[str, Any]) -> bool:
    """Append `chunk`'s text to `held` (both `mergeable`); False if they cannot share one
    reply (another choice, a role change, or `held` already finished)."""
    h0, c0 = held["choices"][0], chunk["choices"][0]
    if h0.get("index") != c0.get("index") or h0.get("finish_reason") is not None:
        return False
    role = c0["delta"].get("role")
    if role is not None and role != h0["delta"].get("role"):
        return False
    text = c0["delta"].get("content")
    if text:
        h0["delta"]["content"] = (h0["delta"].get("content") or "") + text
    if c0.get("finish_reason") is not None:
        h0["finish_reason"] = c0["finish_reason"]
    return True


def _has_text(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    return any(isinstance(c, dict) and (c.get("delta") or {}).get("content") for c in choices)


def _copy(chunk: dict[str, Any]) -> dict[str, Any]:
    """A copy deep enough to merge into (the choice and its delta are rewritten)."""
    c0 = chunk["choices"][0]
    return {**chunk, "choices": [{**c0, "delta": dict(c0["delta"])}]}


class ChunkCoalescer:
    """Sends one stream's chunks to `sink`, merging text deltas for up to `window_ms`.

    `close()` must follow the last `add` (it sends what is held); `discard()` instead
    drops it, for a stream that failed: a retry starts again after a `reset`.
    """

    def __init__(self, sink: ChunkSink, window_ms: float) -> None:
        self._sink = sink
        self._window_s = window_ms / 1000.0
        self._held: dict[str, Any] | None = None
        self._first_sent = False
        self._timer: asyncio.TimerHandle | None = None
        self._flushers: set[asyncio.Task[None]] = set()
        # One send at a time: the timer's and the reader's must not interleave their seqs.
        self._lock = asyncio.Lock()

    async def add(self, chunk: dict[str, Any]) -> None:
        if self._window_s <= 0:
            await self._sink.chunk(chunk)
            return
        if not self._first_sent:
            # Up to and including the first text (a role-only chunk may come before it).
            self._first_sent = _has_text(chunk)
            await self._send(chunk)
            return
        if not mergeable(chunk):
            await self._send(chunk)
            return
        async with self._lock:
            if self._held is not None and merge_into(self._held, chunk):
                return
            await self._send_held()
            self._held = _copy(chunk)
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._window_s, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._held is not None:
            task = asyncio.get_running_loop().create_task(self._flush_held())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)

    async def _flush_held(self) -> None:
        async with self._lock:
            await self._send_held()

    async def _send_held(self) -> None:
        """Send what is held (call with the lock)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, None
        if held is not None:
            await self._sink.chunk(held)

    async def _send(self, chunk: dict[str, Any]) -> None:
        """What is held, then `chunk`, in order."""
        async with self._lock:
            await self._send_held()
            await self._sink.chunk(chunk)

    async def close(self) -> None:
        """Send what is held; after the last chunk of the stream."""
        async with self._lock:
            await self._send_held()
        await self._stop_flusher()

    async def discard(self) -> None:
        """Drop what is held (never sent) and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held = None
        await self._stop_flusher()

    async def _stop_flusher(self) -> None:
        flushers, self._flushers = self._flushers, set()
        for task in flushers:
            task.cancel()
        await asyncio.gather(*flushers, return_exceptions=True)
