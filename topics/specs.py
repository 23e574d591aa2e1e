"""Topic specs and the one encoder/decoder per topic, built once at import.

`topic_specs(config)` lists every topic the gateway needs with its partitions and
retention; internal topics (prefixed `quotaflow.`) are compacted.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from topics.config import Config
from topics.wire import Reply, Request, Usage

__all__ = [
    "REPLY_DECODER",
    "REPLY_ENCODER",
    "REQUEST_DECODER",
    "REQUEST_ENCODER",
    "USAGE_DECODER",
    "USAGE_ENCODER",
    "TopicSpec",
    "topic_specs",
]

# llm.requests
REQUEST_ENCODER: Final = msgspec.json.Encoder()
REQUEST_DECODER: Final = msgspec.json.Decoder(Request)
# llm.responses and every reply_to topic
REPLY_ENCODER: Final = msgspec.json.Encoder()
REPLY_DECODER: Final = msgspec.json.Decoder(Reply)
# llm.usage
USAGE_ENCODER: Final = msgspec.json.Encoder()
USAGE_DECODER: Final = msgspec.json.Decoder(Usage)


class TopicSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a topic must look like when the gateway creates it."""

    name: str
    partitions: int
    replication_factor: int
    cleanup_policy: Literal["delete", "compact"]
    retention_ms: int | None = None

    def configs(self) -> dict[str, str]:
        out: dict[str, str] = {"cleanup.policy": self.cleanup_policy}
        if self.retention_ms is not None:
            out["retention.ms"] = str(self.retention_ms)
        return out


# Internal compacted topics; later stages (quota checkpoints, cache, idempotency) use them.
INTERNAL_TOPICS: Final = ("quota", "cache", "idempotency")


def topic_specs(config: Config) -> list[TopicSpec]:
    """Every topic the gateway needs, in creation order."""
    t = config.topics
    public = [
        TopicSpec(
            name=name,
            partitions=t.partitions,
            replication_factor=t.replication_factor,
            cleanup_policy="delete",
            retention_ms=t.retention_ms,
        )
        for name in (t.requests, t.responses, t.dlq, t.usage, t.events)
    ]
    internal = [
        TopicSpec(
            name=f"{t.internal_prefix}{suffix}",
            partitions=t.partitions,
            replication_factor=t.replication_factor,
            cleanup_policy="compact",
        )
        for suffix in INTERNAL_TOPICS
    ]
    return public + internal
