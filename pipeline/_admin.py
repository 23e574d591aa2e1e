"""Creating the gateway's topics idempotently from `topics.specs`."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from topics.config import Config
from topics.errors import QuotaflowError
from topics.specs import TopicSpec, topic_specs

__all__ = ["ensure_topics"]

_TOPIC_ALREADY_EXISTS = 36


async def ensure_topics(config: Config, extra: list[TopicSpec] | None = None) -> list[str]:
    """Create every missing topic; returns the names created (existing ones are left as is)."""
    specs = topic_specs(config) + (extra or [])
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.kafka.bootstrap_servers,
        client_id=f"{config.kafka.client_id}-admin",
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return []
        resp = await admin.create_topics(
            [
                NewTopic(
                    name=s.name,
                    num_partitions=s.partitions,
                    replication_factor=s.replication_factor,
                    topic_configs=s.configs(),
                )
                for s in missing
            ]
        )
        created = []
        for err in resp.topic_errors:
            name, code = err[0], err[1]
            if code == 0:
                created.append(name)
            elif code != _TOPIC_ALREADY_EXISTS:
                raise QuotaflowError(
                    f"creating topic {name!r} failed with Kafka error code {code}: {err[2:]}"
                )
        return created
    finally:
        await admin.close()
