"""The idempotency index without Kafka or Ray: states, reruns, restore, expiry, bounds."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from actors._idempotency import (
    ENTRY_OVERHEAD_BYTES,
    REPLAYED_RESET_REASON,
    RERUN_SEQ_STRIDE,
    IdemEntry,
    IdempotencyIndex,
    IdemRecord,
    NewRun,
    Replay,
    Write,
    compact_replies,
    decode_entry,
    encode_entry,
)
from actors.idempotency import idempotency_shard_of
from topics.config import IdempotencyConfig
from topics.specs import REPLY_DECODER, REPLY_ENCODER
from topics.wire import (
    ChunkReply,
    CompletionReply,
    DoneReply,
    ErrorBody,
    ErrorReply,
    Reply,
    ResetReply,
    Timing,
    TokenUsage,
)

WINDOW_S = 100.0


class Clock:
    """An injected clock (seconds) that tests move by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Topic:
    """What the compacted topic would hold after the writes: the latest value per key."""

    def __init__(self) -> None:
        self.latest: dict[str, bytes] = {}

    def apply(self, *writes: Write | None) -> None:
        for w in writes:
            if w is None:
                continue
            if w.value is None:
                self.latest.pop(w.key, None)
            else:
                self.latest[w.key] = w.value

    def tombstones(self, ids: list[str]) -> None:
        self.apply(*(Write(i, None) for i in ids))


def _index(clock: Clock, **overrides: Any) -> IdempotencyIndex:
    cfg = IdempotencyConfig(window_s=WINDOW_S, **overrides)
    return IdempotencyIndex(cfg, clock=clock)


def _chunk(rid: str, seq: int, content: str | None, finish: str | None = None) -> ChunkReply:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    if seq == 0:
        delta["role"] = "assistant"
    return ChunkReply(
        id=rid,
        seq=seq,
        chunk={
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "sim-small",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        },
    )


def _done(rid: str, seq: int) -> DoneReply:
    return DoneReply(
        id=rid,
        seq=seq,
        finish_reason="stop",
        usage=TokenUsage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
        model="fast",
        deployment="a",
        timing=Timing(),
    )


def _replies(rid: str, parts: list[str]) -> list[Reply]:
    """A streamed answer: one chunk per part, a finishing chunk, then done."""
    out: list[Reply] = [_chunk(rid, i, p) for i, p in enumerate(parts)]
    out.append(_chunk(rid, len(parts), None, "stop"))
    out.append(_done(rid, len(parts) + 1))
    return out


def _record(rid: str, replies: list[Reply], at_s: float) -> IdemRecord:
    return IdemRecord(rid, [REPLY_ENCODER.encode(r) for r in replies], finished_ms=at_s * 1000)


def _new(got: NewRun | Replay) -> NewRun:
    assert isinstance(got, NewRun), got
    return got


def test_claim_new_records_a_running_run() -> None:
    clock = Clock()
    index = _index(clock)
    got = _new(index.claim("r1"))
    assert (got.start_seq, got.reset_first) == (0, False)
    assert got.write.key == "r1"
    assert got.write.value is not None
    entry = decode_entry(got.write.value)
    assert (entry.state, entry.runs, entry.changed_ms) == ("running", 1, clock.now * 1000)
    assert index.stats()["running"] == 1


def test_claim_after_finish_replays_the_stored_replies() -> None:
    clock = Clock()
    index = _index(clock)
    index.claim("r1")
    record = _record("r1", _replies("r1", ["Hel", "lo"]), clock.now)
    write = index.finish(record)
    assert write.value is not None
    assert decode_entry(write.value).state == "finished"
    got = index.claim("r1")
    assert got == Replay(record.replies)
    stats = index.stats()
    assert (stats["hits"], stats["claims"], stats["finished"]) == (1, 2, 1)


@pytest.mark.parametrize("earlier_runs", [1, 2, 3])
def test_claim_after_end_reruns_at_higher_seqs_after_a_reset(earlier_runs: int) -> None:
    index = _index(Clock())
    for _ in range(earlier_runs):
        index.claim("r1")
        ended = index.end("r1")
        assert ended is not None
        assert ended.value is not None
        assert decode_entry(ended.value).state == "ended"
    got = _new(index.claim("r1"))
    assert got.start_seq == earlier_runs * RERUN_SEQ_STRIDE
    assert got.reset_first
    assert got.write.value is not None
    assert decode_entry(got.write.value).runs == earlier_runs + 1


def test_a_running_id_claimed_again_is_a_crashed_run_and_reruns() -> None:
    index = _index(Clock())
    index.claim("r1")
    got = _new(index.claim("r1"))
    assert (got.start_seq, got.reset_first) == (RERUN_SEQ_STRIDE, True)


def test_end_keeps_a_finished_result_replayable() -> None:
    clock = Clock()
    index = _index(clock)
    index.claim("r1")
    record = _record("r1", _replies("r1", ["x"]), clock.now)
    index.finish(record)
    assert index.end("r1") is None
    assert index.claim("r1") == Replay(record.replies)


def test_restore_from_the_written_records_gives_the_same_answers() -> None:
    clock = Clock()
    index = _index(clock)
    topic = Topic()
    done = _record("done", _replies("done", ["a", "b"]), clock.now)
    topic.apply(_new(index.claim("done")).write, index.finish(done))
    topic.apply(_new(index.claim("running")).write)
    topic.apply(_new(index.claim("ended")).write, index.end("ended"))
    topic.apply(_new(index.claim("ended")).write, index.end("ended"))

    restored = _index(clock)
    restored.restore(dict(topic.latest))
    assert restored.expire() == []
    assert restored.stats()["entries"] == len(topic.latest)
    for rid in ("done", "running", "ended"):
        assert restored.claim(rid) == index.claim(rid), rid
    assert restored.bytes == index.bytes


def test_restore_skips_unreadable_records() -> None:
    clock = Clock()
    index = _index(clock)
    good = _new(index.claim("good")).write
    assert good.value is not None
    restored = _index(clock)
    restored.restore({"good": good.value, "bad": b"\xc1 not msgpack"})
    assert restored.stats()["unreadable"] == 1
    assert "good" in restored
    assert "bad" not in restored


def test_entries_expire_after_the_window_since_their_last_change() -> None:
    clock = Clock()
    index = _index(clock)
    topic = Topic()
    record = _record("old", _replies("old", ["x"]), clock.now)
    topic.apply(_new(index.claim("old")).write, index.finish(record))
    clock.now += WINDOW_S / 2
    topic.apply(_new(index.claim("young")).write)
    clock.now += WINDOW_S / 2  # "old" is exactly window_s old: still kept
    assert index.expire() == []
    assert index.claim("old") == Replay(record.replies)
    clock.now += 1.0
    assert index.expire() == ["old"]
    topic.tombstones(["old"])
    assert set(topic.latest) == {"young"}
    # A forgotten id is a new id again: seq 0, no reset.
    got = _new(index.claim("old"))
    assert (got.start_seq, got.reset_first) == (0, False)
    clock.now += WINDOW_S
    assert index.expire() == ["young"]
    assert index.stats()["expired"] == 2


def test_claim_does_not_replay_an_expired_result_before_the_sweep() -> None:
    clock = Clock()
    index = _index(clock)
    index.claim("r1")
    index.finish(_record("r1", _replies("r1", ["x"]), clock.now))
    clock.now += WINDOW_S + 1
    got = _new(index.claim("r1"))
    assert (got.start_seq, got.reset_first) == (0, False)
    assert index.expire() == []  # its new record replaces it: no tombstone


def test_restore_drops_expired_records_for_tombstones() -> None:
    clock = Clock()
    index = _index(clock)
    topic = Topic()
    topic.apply(_new(index.claim("old")).write)
    clock.now += WINDOW_S / 2
    topic.apply(_new(index.claim("new")).write)
    clock.now += WINDOW_S / 2 + 1
    restored = _index(clock)
    restored.restore(dict(topic.latest))
    assert restored.expire() == ["old"]
    assert "new" in restored


def test_max_entries_evicts_the_oldest_settled_entries_before_running_ones() -> None:
    clock = Clock()
    index = _index(clock, max_entries=3)
    index.claim("run-old")
    for rid in ("a", "b"):
        clock.now += 1
        index.claim(rid)
        index.finish(_record(rid, _replies(rid, [rid]), clock.now))
    assert index.expire() == []
    clock.now += 1
    index.claim("c")  # 4 entries: the oldest finished one goes, not the older running one
    assert index.expire() == ["a"]
    assert set(index) == {"run-old", "b", "c"}
    clock.now += 1
    index.claim("d")
    assert index.expire() == ["b"]
    clock.now += 1
    index.claim("e")  # only running ones left: the least recently changed goes
    assert index.expire() == ["run-old"]
    assert index.stats()["evictions"] == 3
    assert len(index) == 3


def test_an_evicted_id_claimed_again_gets_no_tombstone() -> None:
    clock = Clock()
    index = _index(clock, max_entries=1)
    index.claim("a")
    index.claim("b")  # evicts a
    clock.now += 1
    index.claim("a")  # evicts b, a is back
    assert index.expire() == ["b"]


def test_max_bytes_bounds_reply_bytes_and_counts_running_entries() -> None:
    clock = Clock()
    one = _record("r0", _replies("r0", ["x" * 200]), clock.now)
    per_entry = sum(len(r) for r in one.replies) + len("r0") + ENTRY_OVERHEAD_BYTES
    index = _index(
        clock, max_bytes=3 * per_entry, max_record_bytes=10 * per_entry, compress_level=0
    )
    for i in range(5):
        rid = f"r{i}"
        clock.now += 1
        index.claim(rid)
        index.finish(_record(rid, _replies(rid, ["x" * 200]), clock.now))
        assert index.bytes <= 3 * per_entry
    assert index.expire() == ["r0", "r1"]
    assert index.bytes == 3 * per_entry
    index.claim("tiny")
    assert index.bytes == 2 * per_entry + len("tiny") + ENTRY_OVERHEAD_BYTES
    assert index.expire() == ["r2"]


def test_a_result_too_large_even_compacted_is_kept_as_ended() -> None:
    clock = Clock()
    index = _index(clock, max_bytes=1_000, max_record_bytes=500, compress_level=0)
    index.claim("big")
    write = index.finish(_record("big", _replies("big", ["y" * 2_000]), clock.now))
    assert write.value is not None
    assert decode_entry(write.value).state == "ended"
    assert index.stats()["too_large"] == 1
    got = _new(index.claim("big"))
    assert (got.start_seq, got.reset_first) == (RERUN_SEQ_STRIDE, True)


def _decoded(values: list[bytes]) -> list[Reply]:
    return [REPLY_DECODER.decode(v) for v in values]


def test_oversized_streamed_result_is_kept_as_its_text_and_terminal() -> None:
    clock = Clock()
    parts = [f"part {i} " * 20 for i in range(30)]
    # A failed first attempt, a reset, then the stream that finished.
    first_try: list[Reply] = [_chunk("r1", 0, "discarded")]
    reset = ResetReply(id="r1", seq=1, reason="retry")
    final = [msgspec.structs.replace(r, seq=r.seq + 2) for r in _replies("r1", parts)]  # seqs 2 ..
    original = [*first_try, reset, *final]
    record = _record("r1", original, clock.now)
    size = sum(len(r) for r in record.replies)
    index = _index(clock, max_record_bytes=size // 4)
    index.claim("r1")
    index.finish(record)
    got = index.claim("r1")
    assert isinstance(got, Replay)
    assert index.stats()["compacted"] == 1
    assert sum(len(r) for r in got.replies) < size

    kept = _decoded(got.replies)
    seqs = [r.seq for r in kept]
    assert seqs == sorted(set(seqs))
    assert seqs[0] > max(r.seq for r in original)
    opening, merged, terminal = kept
    assert isinstance(opening, ResetReply)
    assert opening.reason == REPLAYED_RESET_REASON
    assert isinstance(merged, ChunkReply)
    first_chunk = final[0]
    assert isinstance(first_chunk, ChunkReply)
    assert set(merged.chunk) == set(first_chunk.chunk)
    (choice,) = merged.chunk["choices"]
    assert choice["delta"] == {"role": "assistant", "content": "".join(parts)}
    assert choice["finish_reason"] == "stop"
    assert isinstance(terminal, DoneReply)
    assert msgspec.structs.replace(terminal, seq=original[-1].seq) == original[-1]


def test_oversized_completion_keeps_completion_and_terminal_unchanged() -> None:
    completion = CompletionReply(
        id="r1",
        seq=1,
        completion={"object": "chat.completion", "choices": [{"message": {"content": "z"}}]},
    )
    replies = [
        REPLY_ENCODER.encode(r)
        for r in (ResetReply(id="r1", seq=0, reason="retry"), completion, _done("r1", 2))
    ]
    assert compact_replies(replies) == replies[1:]


def test_oversized_error_keeps_only_the_terminal() -> None:
    error = ErrorReply(id="r1", seq=3, error=ErrorBody(code="invalid_request", message="m"))
    replies = [REPLY_ENCODER.encode(r) for r in (_chunk("r1", 0, "a"), error)]
    replies.insert(1, REPLY_ENCODER.encode(ResetReply(id="r1", seq=1, reason="retry")))
    assert compact_replies(replies) == [replies[-1]]


def test_shard_of_is_stable_and_spreads() -> None:
    ids = [f"req-{i}" for i in range(200)]
    shards = [idempotency_shard_of(i, 4) for i in ids]
    assert shards == [idempotency_shard_of(i, 4) for i in ids]
    assert set(shards) == {0, 1, 2, 3}


def _stream_record(rid: str, at_s: float) -> IdemRecord:
    return _record(rid, _replies(rid, [f"token {i} " for i in range(16)]), at_s)


def test_a_finished_result_is_stored_deflated_and_replayed_byte_for_byte() -> None:
    clock = Clock()
    plain, packed = _index(clock, compress_level=0), _index(clock)
    record = _stream_record("r1", clock.now)
    writes = []
    for index in (plain, packed):
        index.claim("r1")
        writes.append(index.finish(record))
        assert index.claim("r1") == Replay(record.replies)
    plain_value, packed_value = (w.value for w in writes)
    assert plain_value is not None
    assert packed_value is not None
    stored = decode_entry(packed_value)
    assert (stored.replies, stored.state) == ([], "finished")
    assert stored.packed
    # Chunks repeat their id, model and created: the deflated form is far smaller, in
    # memory (what max_bytes counts) and on the topic.
    assert packed.bytes * 2 < plain.bytes
    assert len(packed_value) * 2 < len(plain_value)
    restored = _index(clock)
    restored.restore({"r1": packed_value})
    assert restored.claim("r1") == Replay(record.replies)


def test_plain_records_written_before_deflation_still_replay() -> None:
    clock = Clock()
    record = _stream_record("old", clock.now)
    written = _index(clock, compress_level=0)
    written.claim("old")
    value = written.finish(record).value
    assert value is not None
    index = _index(clock)
    index.restore({"old": value})
    assert index.claim("old") == Replay(record.replies)


def test_packed_replies_that_do_not_inflate_run_the_id_again() -> None:
    clock = Clock()
    index = _index(clock)
    bad = IdemEntry(state="finished", runs=1, changed_ms=clock.now * 1000, packed=b"not zlib")
    index.restore({"bad": encode_entry(bad)})
    got = _new(index.claim("bad"))
    assert (got.start_seq, got.reset_first) == (RERUN_SEQ_STRIDE, True)
    assert index.stats()["unreadable"] == 1
