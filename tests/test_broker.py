"""The embedded broker: starts on a free port, is reachable, creates topics idempotently, stops cleanly."""

from __future__ import annotations

import socket

import pytest
from kafka import KafkaConsumer

from mfli.config import load_settings
from mfli.kafka.broker import EmbeddedBroker
from mfli.kafka.clients import ensure_topics


def test_broker_lifecycle_and_topics():
    settings = load_settings()
    broker = EmbeddedBroker()
    with broker:
        host, port = broker.bootstrap.split(":")
        assert host == "127.0.0.1" and broker.alive()
        socket.create_connection((host, int(port)), timeout=1).close()
        ensure_topics(broker.bootstrap, settings.kafka, ["a", "b"], partitions=3)
        ensure_topics(broker.bootstrap, settings.kafka, ["a", "c"], partitions=1)  # idempotent
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        try:
            assert consumer.partitions_for_topic("a") == {0, 1, 2}
            assert consumer.partitions_for_topic("c") == {0}
        finally:
            consumer.close()
        pid = broker.pid
    assert not broker.alive() and pid is not None
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()


def test_session_broker_fixture_is_alive(broker):
    assert broker.alive() and broker.bootstrap.startswith("127.0.0.1:")
