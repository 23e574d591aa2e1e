"""Idempotency by request `id`: which ids ran, which finished (with their replies), how long.

Each id has one durable record on the compacted `<prefix>idempotency` topic (key = the id,
UTF-8; value = msgpack of `IdemEntry`; a tombstone when the id is forgotten), in one of
three states:

- `running`: a run started (`runs` counts the runs started so far). Seen at claim time it
  means that run died with a gateway (a live duplicate is attached by the ingress, which
  owns the id's partition, and never reaches the store), so the id runs again.
- `finished`: the replies of a finished run, replayed byte for byte to a resend.
- `ended`: ended with a retryable error: not replayed, a resend runs again.

A run after `runs = n > 0` earlier ones starts its replies at `n * RERUN_SEQ_STRIDE` with
a `reset` first: an earlier run may have sent chunks nobody can know of after a crash,
and higher seqs keep "deduplicate by (id, seq)" correct.

A finished entry holds its reply values as one zlib stream (`packed`: a msgpack array of
them, deflated at `compress_level`, default 1; 0 keeps them plain in `replies`, the only
form of records written before). Streamed replies repeat their id, model and `created` in
every chunk, so this keeps them ~3x smaller in memory and on the topic, at a few tens of
microseconds per finish; a replay inflates them once.

Entries are forgotten `window_s` after their last change (expired) or earlier when a
shard is over `max_entries` or `max_bytes` (evicted: the least recently changed finished
or ended entries first, `running` ones only when no other is left; a running entry
counts as its id plus `ENTRY_OVERHEAD_BYTES`). A forgotten id is a new id again.

Compaction of a large result: a finished run whose reply bytes exceed `max_record_bytes`
is stored as (see `compact_replies`)
- streamed (chunks): `reset` (seq = last + 1, reason "replayed result"), one chunk holding
  the whole text (the first chunk's object with `delta.content` = the concatenated content
  of every chunk after the last `reset`, per choice, `finish_reason` the last one seen,
  `usage` the last one seen), then the terminal re-numbered after it;
- not streamed (a `completion`): the last completion and the terminal, unchanged;
- neither: the terminal alone, unchanged.
Only content, role and finish reason survive (tool-call or logprob deltas do not); a
result still over `max_bytes` after that is kept as `ended` (a resend runs again).
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Final, Literal

import msgspec

from topics.config import IdempotencyConfig
from topics.specs import REPLY_DECODER, REPLY_ENCODER
from topics.wire import ChunkReply, CompletionReply, DoneReply, ErrorReply, ResetReply

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "REPLAYED_RESET_REASON",
    "RERUN_SEQ_STRIDE",
    "IdemClaim",
    "IdemClaimed",
    "IdemClaimedKind",
    "IdemEntry",
    "IdemRecord",
    "IdemState",
    "IdempotencyIndex",
    "NewRun",
    "Replay",
    "Write",
    "compact_replies",
    "decode_entry",
    "encode_entry",
    "entry_replies",
    "pack_replies",
]

# Run n (0-based) of one id numbers its replies from n * RERUN_SEQ_STRIDE: far above what
# one run can send, so a rerun's seqs never meet an earlier run's.
RERUN_SEQ_STRIDE: Final = 1_000_000
# What one entry costs besides its id and reply bytes (dict slots, the Struct): an
# estimate, so that `running` and `ended` entries count towards `max_bytes` too.
ENTRY_OVERHEAD_BYTES: Final = 128
# The `reason` of the reset that opens a compacted replay.
REPLAYED_RESET_REASON: Final = "replayed result"

IdemClaimedKind = Literal["new", "replayed"]
IdemState = Literal["running", "finished", "ended"]


class IdemClaim(msgspec.Struct, frozen=True):
    """One request of an ingress batch, asking whether its id may run."""

    ticket: int
    request_id: str
    reply_to: str
    tenant: str


class IdemClaimed(msgspec.Struct, frozen=True):
    """The answer: run it (`new`, at `start_seq`, after a reset if `reset_first`), or it
    was answered from the stored result (`replayed`: nothing left to do)."""

    ticket: int
    kind: IdemClaimedKind
    start_seq: int = 0
    reset_first: bool = False


class IdemRecord(msgspec.Struct, frozen=True):
    """A finished run, sent by callers: its reply values exactly as produced, in seq order
    (encoded with `topics.specs.REPLY_ENCODER`)."""

    request_id: str
    replies: list[bytes]
    finished_ms: float


class IdemEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The durable record of one id (value on the idempotency topic, msgpack)."""

    state: IdemState
    runs: Annotated[int, msgspec.Meta(ge=0)]
    # Epoch ms of the last change: the entry expires `window_s` after it.
    changed_ms: float
    # Plain reply values (`compress_level` 0, and every record written before `packed`).
    replies: list[bytes] = msgspec.field(default_factory=list)
    # The reply values as one deflated msgpack array (see `pack_replies`).
    packed: bytes = b""


class Write(msgspec.Struct, frozen=True):
    """One record to produce to the idempotency topic (`value` None: a tombstone)."""

    key: str
    value: bytes | None


class NewRun(msgspec.Struct, frozen=True):
    """`claim`: run the request; `write` (its `running` record) must be durable first."""

    start_seq: int
    reset_first: bool
    write: Write


class Replay(msgspec.Struct, frozen=True):
    """`claim`: the id finished; send these reply values again instead of running it."""

    replies: list[bytes]


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(IdemEntry)
_REPLIES_DECODER: Final = msgspec.msgpack.Decoder(list[bytes])


def encode_entry(entry: IdemEntry) -> bytes:
    return _ENCODER.encode(entry)


def decode_entry(value: bytes) -> IdemEntry:
    """Raises `msgspec.DecodeError` (or `ValidationError`, a subclass) on a bad value."""
    return _DECODER.decode(value)


def pack_replies(replies: list[bytes], level: int) -> bytes:
    """`replies` as one deflated msgpack array (what `IdemEntry.packed` holds)."""
    return zlib.compress(_ENCODER.encode(replies), level)


def entry_replies(entry: IdemEntry) -> list[bytes]:
    """The reply values of a finished entry, whichever form it holds them in.

    Raises `msgspec.DecodeError` on a `packed` value that does not inflate or decode."""
    if not entry.packed:
        return entry.replies
    try:
        raw = zlib.decompress(entry.packed)
    except zlib.error as exc:
        msg = f"idempotency entry: packed replies do not inflate: {exc}"
        raise msgspec.DecodeError(msg) from exc
    return _REPLIES_DECODER.decode(raw)


def _merge_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One chunk object with the whole text of `chunks`, per choice index."""
    first = next((c for c in chunks if c.get("choices")), chunks[0])
    templates: dict[int, dict[str, Any]] = {}
    parts: dict[int, list[str]] = {}
    finish: dict[int, Any] = {}
    usage: Any = None
    for chunk in chunks:
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            templates.setdefault(index, choice)
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                parts.setdefault(index, []).append(content)
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
    choices = []
    for index in sorted(templates):
        template = templates[index]
        delta = {k: v for k, v in (template.get("delta") or {}).items() if k == "role"}
        delta["content"] = "".join(parts.get(index, ()))
        choices.append({**template, "delta": delta, "finish_reason": finish.get(index)})
    merged = {**first, "choices": choices}
    if usage is not None:
        merged["usage"] = usage
    return merged


def compact_replies(replies: list[bytes]) -> list[bytes]:
    """The small form of a finished run's replies (rule in the module docstring).

    Replies without a terminal last are returned unchanged: there is nothing safe to drop.
    """
    if not replies:
        return list(replies)
    decoded = [REPLY_DECODER.decode(r) for r in replies]
    terminal = decoded[-1]
    if not isinstance(terminal, DoneReply | ErrorReply):
        return list(replies)
    completions = [i for i, r in enumerate(decoded) if isinstance(r, CompletionReply)]
    if completions:
        return [replies[completions[-1]], replies[-1]]
    last_reset = max((i for i, r in enumerate(decoded) if isinstance(r, ResetReply)), default=-1)
    chunks = [r.chunk for r in decoded[last_reset + 1 : -1] if isinstance(r, ChunkReply)]
    if not chunks:
        return [replies[-1]]
    seq = max(r.seq for r in decoded) + 1
    rid = terminal.id
    return [
        REPLY_ENCODER.encode(ResetReply(id=rid, seq=seq, reason=REPLAYED_RESET_REASON)),
        REPLY_ENCODER.encode(ChunkReply(id=rid, seq=seq + 1, chunk=_merge_chunks(chunks))),
        REPLY_ENCODER.encode(msgspec.structs.replace(terminal, seq=seq + 2)),
    ]


def _size(request_id: str, entry: IdemEntry) -> int:
    plain = sum(len(r) for r in entry.replies)
    return len(request_id) + ENTRY_OVERHEAD_BYTES + plain + len(entry.packed)


class IdempotencyIndex:
    """One shard's entries in memory, bounded; every change returns the record to write.

    The caller (the actor) produces each returned `Write` in order, and the tombstones of
    `expire()` after them, so the topic always ends with the latest state of every id.
    """

    def __init__(
        self, config: IdempotencyConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._window_ms = config.window_s * 1000.0
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        self._max_record_bytes = config.max_record_bytes
        self._compress_level = config.compress_level
        self._clock = clock
        # Least recently changed first; `running` entries apart, as they are evicted last.
        self._settled: OrderedDict[str, tuple[IdemEntry, int]] = OrderedDict()
        self._running: OrderedDict[str, tuple[IdemEntry, int]] = OrderedDict()
        # Forgotten since the last `expire()`: their tombstones are still to be written.
        self._dropped: list[str] = []
        self.bytes = 0
        self.claims = 0
        self.hits = 0
        self.evictions = 0
        self.expired = 0
        self.compacted = 0
        self.too_large = 0
        self.unreadable = 0

    def __len__(self) -> int:
        return len(self._settled) + len(self._running)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._settled or request_id in self._running

    def __iter__(self) -> Iterator[str]:
        yield from self._settled
        yield from self._running

    def _now_ms(self) -> float:
        return self._clock() * 1000.0

    def _is_expired(self, entry: IdemEntry, now_ms: float) -> bool:
        return now_ms - entry.changed_ms > self._window_ms

    def _finished(self, request_id: str) -> IdemEntry | None:
        """The id's finished entry, unless it expired."""
        slot = self._settled.get(request_id)
        if slot is None or slot[0].state != "finished" or self._is_expired(slot[0], self._now_ms()):
            return None
        return slot[0]

    def _pop(self, request_id: str) -> IdemEntry | None:
        """Remove an id from memory; returns its entry unless it had expired."""
        slot = self._settled.pop(request_id, None) or self._running.pop(request_id, None)
        if slot is None:
            return None
        entry, size = slot
        self.bytes -= size
        if self._is_expired(entry, self._now_ms()):
            self.expired += 1
            return None
        return entry

    def _put(self, request_id: str, entry: IdemEntry) -> Write:
        size = _size(request_id, entry)
        home = self._running if entry.state == "running" else self._settled
        home[request_id] = (entry, size)
        self.bytes += size
        self._enforce_bounds()
        return Write(request_id, encode_entry(entry))

    def _enforce_bounds(self) -> None:
        while len(self) > self._max_entries or self.bytes > self._max_bytes:
            home = self._settled or self._running
            request_id, (_, size) = home.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
            self._dropped.append(request_id)

    def claim(self, request_id: str) -> NewRun | Replay:
        """A request with this id arrived: replay its finished result, or start a run."""
        self.claims += 1
        finished = self._finished(request_id)
        if finished is not None:
            try:
                replies = entry_replies(finished)
            except msgspec.DecodeError:
                # Not a record this gateway wrote: run the id again rather than fail it.
                self.unreadable += 1
            else:
                self.hits += 1
                return Replay(replies)
        old = self._pop(request_id)
        runs = old.runs if old is not None else 0
        entry = IdemEntry(state="running", runs=runs + 1, changed_ms=self._now_ms())
        write = self._put(request_id, entry)
        return NewRun(start_seq=runs * RERUN_SEQ_STRIDE, reset_first=runs > 0, write=write)

    def finish(self, record: IdemRecord) -> Write:
        """Store a finished run (compacted if large) to replay to resends of its id."""
        old = self._pop(record.request_id)
        runs = max(old.runs, 1) if old is not None else 1
        replies = record.replies
        if sum(len(r) for r in replies) > self._max_record_bytes:
            replies = compact_replies(replies)
            self.compacted += 1
        packed = pack_replies(replies, self._compress_level) if self._compress_level else b""
        entry = IdemEntry(
            state="finished",
            runs=runs,
            changed_ms=record.finished_ms,
            # Exactly one of the two carries the replies (level 0 keeps them plain).
            replies=[] if packed else replies,
            packed=packed,
        )
        if _size(record.request_id, entry) > self._max_bytes:
            self.too_large += 1
            entry = IdemEntry(state="ended", runs=runs, changed_ms=record.finished_ms)
        return self._put(record.request_id, entry)

    def end(self, request_id: str) -> Write | None:
        """The id's run ended with a retryable error: a resend runs again (None: no change,
        as a finished result stays replayable)."""
        if self._finished(request_id) is not None:
            return None
        old = self._pop(request_id)
        runs = max(old.runs, 1) if old is not None else 1
        return self._put(request_id, IdemEntry(state="ended", runs=runs, changed_ms=self._now_ms()))

    def expire(self) -> list[str]:
        """Drop expired entries; returns every id forgotten since the last call (expired,
        evicted, or dropped by `restore`) and still unknown: write a tombstone for each."""
        now = self._now_ms()
        for home in (self._settled, self._running):
            while home:
                request_id, (entry, size) = next(iter(home.items()))
                if not self._is_expired(entry, now):
                    break
                del home[request_id]
                self.bytes -= size
                self.expired += 1
                self._dropped.append(request_id)
        dropped, self._dropped = self._dropped, []
        return [i for i in dict.fromkeys(dropped) if i not in self]

    def restore(self, records: dict[str, bytes]) -> None:
        """Replace the state with the durable records of this shard (latest per id).

        Expired ones, and the oldest beyond the bounds, are dropped (see `expire`);
        unreadable ones are skipped and counted.
        """
        self._settled.clear()
        self._running.clear()
        self.bytes = 0
        now = self._now_ms()
        entries: list[tuple[str, IdemEntry]] = []
        for request_id, value in records.items():
            try:
                entries.append((request_id, decode_entry(value)))
            except msgspec.DecodeError:
                self.unreadable += 1
        entries.sort(key=lambda item: item[1].changed_ms)
        for request_id, entry in entries:
            if self._is_expired(entry, now):
                self.expired += 1
                self._dropped.append(request_id)
                continue
            size = _size(request_id, entry)
            home = self._running if entry.state == "running" else self._settled
            home[request_id] = (entry, size)
            self.bytes += size
        self._enforce_bounds()

    def stats(self) -> dict[str, Any]:
        states = {"running": 0, "finished": 0, "ended": 0}
        for entry, _ in (*self._settled.values(), *self._running.values()):
            states[entry.state] += 1
        return {
            "entries": len(self),
            "bytes": self.bytes,
            **states,
            "claims": self.claims,
            "hits": self.hits,
            "evictions": self.evictions,
            "expired": self.expired,
            "compacted": self.compacted,
            "too_large": self.too_large,
            "unreadable": self.unreadable,
        }
