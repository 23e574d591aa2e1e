"""Token coalescing (actors/_coalesce.py): what merges, what goes alone, what waits how long."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from actors._coalesce import ChunkCoalescer, merge_into, mergeable

# Long enough that nothing in a test is flushed by the timer unless the test waits for it.
LONG_WINDOW_MS = 60_000.0


class Sink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def chunk(self, chunk: dict[str, Any]) -> None:
        self.sent.append(chunk)
        self.arrived.set()


def text(t: str, *, finish: str | None = None, role: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": t}
    if role is not None:
        delta["role"] = role
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def contents(sent: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"].get("content") or "" if c["choices"] else "" for c in sent]


async def test_first_text_goes_at_once_and_the_rest_merges() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, LONG_WINDOW_MS)
    words = ["Hel", "lo", " wor", "ld"]
    await co.add(text(words[0]))
    assert contents(sink.sent) == [words[0]]
    for w in words[1:]:
        await co.add(text(w))
    assert len(sink.sent) == 1  # held within the window
    await co.close()
    assert contents(sink.sent) == [words[0], "".join(words[1:])]


async def test_a_role_only_chunk_does_not_delay_the_first_text() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, LONG_WINDOW_MS)
    await co.add(text("", role="assistant"))
    await co.add(text("A"))
    assert contents(sink.sent) == ["", "A"]
    await co.close()


async def test_the_timer_sends_what_is_held_when_the_upstream_pauses() -> None:
    sink = Sink()
    window_ms = 5.0
    co = ChunkCoalescer(sink, window_ms)
    await co.add(text("a"))
    sink.arrived.clear()
    await co.add(text("b"))
    await co.add(text("c"))
    # No further chunk and no close: only the timer can send "bc".
    await asyncio.wait_for(sink.arrived.wait(), timeout=10.0)
    assert contents(sink.sent) == ["a", "bc"]
    await co.close()
    assert contents(sink.sent) == ["a", "bc"]


async def test_other_chunks_go_alone_and_in_order() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, LONG_WINDOW_MS)
    usage_chunk = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3}}
    tool = text("")
    tool["choices"][0]["delta"]["tool_calls"] = [{"index": 0, "function": {"name": "f"}}]
    await co.add(text("a"))
    await co.add(text("b"))
    await co.add(tool)
    await co.add(text("c", finish="stop"))
    await co.add(usage_chunk)
    await co.close()
    assert [c.get("usage") is not None for c in sink.sent] == [False, False, False, False, True]
    assert contents(sink.sent)[:2] == ["a", "b"]
    assert "tool_calls" in sink.sent[2]["choices"][0]["delta"]
    assert sink.sent[3]["choices"][0]["finish_reason"] == "stop"


async def test_finish_reason_ends_a_merge() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, LONG_WINDOW_MS)
    for chunk in (text("a"), text("b"), text("c", finish="stop"), text("late")):
        await co.add(chunk)
    await co.close()
    assert contents(sink.sent) == ["a", "bc", "late"]
    assert sink.sent[1]["choices"][0]["finish_reason"] == "stop"


async def test_discard_drops_what_was_never_sent() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, LONG_WINDOW_MS)
    await co.add(text("a"))
    await co.add(text("b"))
    await co.discard()
    await co.close()
    assert contents(sink.sent) == ["a"]


async def test_window_zero_sends_every_chunk() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, 0)
    for w in "abc":
        await co.add(text(w))
    assert contents(sink.sent) == list("abc")


async def test_merging_keeps_the_input_chunks_untouched() -> None:
    sink = Sink()
    co = ChunkCoalescer(sink, LONG_WINDOW_MS)
    chunks = [text(w) for w in "abcd"]
    for c in chunks:
        await co.add(c)
    await co.close()
    assert contents(chunks) == list("abcd")


@pytest.mark.parametrize(
    "chunk",
    [
        {"id": "x", "choices": []},
        {"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": {}},
        {"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"c": []}}]},
        {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": []}}]},
        {"id": "x", "choices": [{"index": 0, "delta": {}}, {"index": 1, "delta": {}}]},
    ],
)
def test_not_mergeable(chunk: dict[str, Any]) -> None:
    assert not mergeable(chunk)


def test_a_null_usage_field_does_not_stop_a_merge() -> None:
    chunk = text("a")
    chunk["usage"] = None
    chunk["system_fingerprint"] = None
    assert mergeable(chunk)


def test_merge_refuses_another_choice_or_role() -> None:
    held = text("a")
    other = text("b")
    other["choices"][0]["index"] = 1
    assert not merge_into(held, other)
    assert not merge_into(held, text("b", role="tool"))
    assert merge_into(held, text("b"))
    assert held["choices"][0]["delta"]["content"] == "ab"
