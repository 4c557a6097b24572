"""kafka-python client factories built from ``settings.kafka``, so every process dials Kafka alike.

Every option tests or operators may need to change comes from :class:`mfli.config.KafkaSettings`
(names mirror Kafka's own). Producers are idempotent with ``acks='all'``: a retried send can then
never duplicate or reorder a record, which is what makes "at-least-once, idempotent state" hold.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from mfli.config import KafkaSettings


def bootstrap_of(kafka: KafkaSettings, override: str | None = None) -> str:
    """The bootstrap address to dial; raises when none is configured (the embedded broker is opt-in)."""
    address = override or kafka.bootstrap_servers
    if not address:
        raise ValueError("no Kafka bootstrap server: set MFLI_KAFKA__BOOTSTRAP_SERVERS or pass --bootstrap")
    return address


def consumer_config(kafka: KafkaSettings, group_id: str | None, **overrides: Any) -> dict[str, Any]:
    """Consumer options: manual commits only, group timeouts and fetch sizes from settings."""
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap_of(kafka),
        client_id=kafka.client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset,
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        max_poll_interval_ms=kafka.max_poll_interval_ms,
        max_poll_records=kafka.max_poll_records,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        fetch_max_bytes=kafka.fetch_max_bytes,
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
        request_timeout_ms=kafka.request_timeout_ms,
        reconnect_backoff_max_ms=kafka.reconnect_backoff_max_ms,
    )
    config.update(overrides)
    return config


def make_consumer(kafka: KafkaSettings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    return KafkaConsumer(**consumer_config(kafka, group_id, **overrides))


def make_producer(kafka: KafkaSettings, bootstrap: str | None = None, **overrides: Any) -> KafkaProducer:
    """Idempotent, ``acks='all'`` producer; ``linger_ms``/``batch_size`` trade latency for throughput."""
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap_of(kafka, bootstrap),
        client_id=kafka.client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=kafka.producer_linger_ms,
        batch_size=kafka.producer_batch_size,
        request_timeout_ms=kafka.request_timeout_ms,
        reconnect_backoff_max_ms=kafka.reconnect_backoff_max_ms,
    )
    config.update(overrides)
    return KafkaProducer(**config)
