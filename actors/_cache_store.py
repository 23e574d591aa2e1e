"""The cache's changelog: one record per key on the compacted `<prefix>cache` topic.

Key: the exact key (UTF-8). Value: msgpack of `StoredEntry` (the entry, with its semantic
scope and text, and the embedding as little-endian float32 bytes, so a restart need not
embed again); a tombstone (null value) when the entry is evicted or expires. A shard
restores the latest record of each of its keys at start (`actors._compacted`).
"""

from __future__ import annotations

from typing import Final

import msgspec

from actors._messages import CacheEntry

__all__ = ["StoredEntry", "cache_topic", "decode_record", "encode_record"]


class StoredEntry(msgspec.Struct, frozen=True):
    """What the topic holds for one key."""

    entry: CacheEntry
    vector: bytes | None = None


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(StoredEntry)


def cache_topic(prefix: str) -> str:
    """The changelog topic for `topics.internal_prefix` = `prefix`."""
    return f"{prefix}cache"


def encode_record(entry: CacheEntry, vector: bytes | None = None) -> bytes:
    return _ENCODER.encode(StoredEntry(entry, vector))


def decode_record(value: bytes) -> StoredEntry | None:
    """The record, or None if it is not one (another version's, or damaged)."""
    try:
        return _DECODER.decode(value)
    except msgspec.DecodeError:
        return None
