"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.kafka_local import LocalKafka


@pytest.fixture(scope="session")
def kafka_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """One real Kafka broker for the whole session, on a free port, stopped at the end.

    Its data lives in a fresh temporary home; the jars come from the shared classpath cache
    ($QUOTAFLOW_KAFKA_JARS, default ~/.cache/quotaflow/kafka), so mvn only runs once.
    """
    kafka = LocalKafka(home=tmp_path_factory.mktemp("qfhome"))
    kafka.up(port=0)
    yield kafka
    kafka.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_local: LocalKafka) -> str:
    """ "127.0.0.1:PORT" of the session's broker."""
    bootstrap = kafka_local.status().bootstrap
    assert bootstrap is not None, "the session's Kafka broker is not running"
    return bootstrap
