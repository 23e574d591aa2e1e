"""The local Kafka broker manager: unit tests without a broker, and one against a real one."""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.kafka_local import KAFKA_VERSION, LocalKafka, _ephemeral_ports, free_port
from topics.errors import KafkaLocalError

POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def _which_without(*missing: str) -> Callable[..., str | None]:
    real = shutil.which

    def which(cmd: str, mode: int = 0, path: str | None = None) -> str | None:
        return None if cmd in missing else real(cmd, path=path)

    return which


@pytest.fixture
def listening_socket() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_pom_kafka_version_is_kafka_version() -> None:
    version = ET.parse(POM).getroot().find("m:properties/m:kafka.version", _NS)
    assert version is not None
    assert version.text == KAFKA_VERSION


def test_missing_java_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", _which_without("java"))
    with pytest.raises(KafkaLocalError, match=r"^java not found on PATH: install a JDK 17\+"):
        LocalKafka(home=tmp_path, jars_dir=tmp_path / "jars").up(port=0)
    assert not (tmp_path / "kafka" / "state.json").exists()


def test_missing_mvn_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", _which_without("mvn"))
    with pytest.raises(KafkaLocalError, match=r"^mvn not found on PATH: install Apache Maven"):
        LocalKafka(home=tmp_path, jars_dir=tmp_path / "jars").fetch()


def test_port_in_use_is_one_clear_error(tmp_path: Path, listening_socket: int) -> None:
    port = listening_socket
    expected = f"port {port} on 127.0.0.1 is already in use; pass --port 0 for a free port"
    with pytest.raises(KafkaLocalError) as info:
        LocalKafka(home=tmp_path, jars_dir=tmp_path / "jars").up(port=port)
    assert str(info.value) == expected


def test_fresh_home_is_not_running(tmp_path: Path) -> None:
    kafka = LocalKafka(home=tmp_path, jars_dir=tmp_path / "jars")
    status = kafka.status()
    assert not status.running
    assert status.pid is None
    assert status.bootstrap is None
    assert status.data_dir == tmp_path.resolve() / "kafka" / "data"
    assert status.log_path.parent == tmp_path.resolve() / "kafka" / "logs"
    assert kafka.down() is False


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_is_outside_the_ephemeral_range() -> None:
    # An outgoing connection could take an ephemeral port while its server restarts.
    low, high = _ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(not low <= p <= high for p in ports), sorted(ports)
    assert len(ports) == 20  # never the same one twice: its server may not listen yet


def test_free_port_reads_the_kernels_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    monkeypatch.setattr("pipeline.kafka_local._EPHEMERAL_RANGE_FILE", str(path))
    assert _ephemeral_ports() == (40000, 50000)
    assert not 40000 <= free_port() <= 50000
    path.write_text("garbage")
    assert _ephemeral_ports() == (32768, 60999)


@pytest.mark.integration
async def test_broker_round_trip(kafka_local: LocalKafka, kafka_bootstrap: str) -> None:
    status = kafka_local.status()
    assert status.running
    assert status.pid is not None
    assert status.bootstrap == kafka_bootstrap

    topic = f"qf-test-{uuid.uuid4().hex[:12]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), timeout=30)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert (message.key, message.value) == (b"k", b"hello")
    assert (message.partition, message.offset) == (sent.partition, sent.offset)

    # Idempotent: the running broker is reused whatever port is asked for.
    assert kafka_local.up() == kafka_bootstrap
    assert kafka_local.up(port=0) == kafka_bootstrap
    assert kafka_local.status().pid == status.pid
