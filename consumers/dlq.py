"""The dead-letter topic ``mfli.events.dlq``: original bytes plus why and where from, in headers.

A dead letter keeps the record's original key, value and headers byte for byte (so it can be fixed and
replayed), with these headers appended (values UTF-8):

====================  =======================================================
``mfli.reason``       short code from :data:`mfli.consumers.validation.REASONS`
``mfli.error``        human-readable message
``mfli.source.topic`` topic the record was consumed from
``mfli.source.partition`` / ``mfli.source.offset``  its position there
====================  =======================================================

Ordering guarantee the consumer relies on: :meth:`DeadLetterWriter.flush` returns only after every
dead letter was acknowledged by all in-sync replicas (``acks='all'``), and raises otherwise. The stream
flushes before it hands a batch out, so the offsets in a batch never cover an unsent dead letter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from mfli import metrics
from mfli.config import KafkaSettings
from mfli.kafka.clients import make_consumer, make_producer

from .validation import Rejection

REASON_HEADER = "mfli.reason"
ERROR_HEADER = "mfli.error"
TOPIC_HEADER = "mfli.source.topic"
PARTITION_HEADER = "mfli.source.partition"
OFFSET_HEADER = "mfli.source.offset"


class DeadLetterError(RuntimeError):
    """Dead letters could not be written; the records they stand for must not be committed."""


class DeadLetterWriter:
    """Sends rejected records to the DLQ and waits for their acknowledgement on :meth:`flush`."""

    def __init__(self, kafka: KafkaSettings, producer: KafkaProducer | None = None) -> None:
        self.topic = kafka.dlq_topic
        self._producer = producer or make_producer(kafka)
        self._pending: list[Any] = []

    def send(self, record: ConsumerRecord, rejection: Rejection) -> None:
        headers = list(record.headers or []) + [
            (REASON_HEADER, rejection.reason.encode()),
            (ERROR_HEADER, rejection.message.encode("utf-8", "replace")),
            (TOPIC_HEADER, record.topic.encode()),
            (PARTITION_HEADER, str(record.partition).encode()),
            (OFFSET_HEADER, str(record.offset).encode()),
        ]
        self._pending.append(self._producer.send(self.topic, value=record.value, key=record.key, headers=headers))
        metrics.EVENTS_INVALID.labels(reason=rejection.reason).inc()

    def flush(self, timeout_s: float = 30.0) -> int:
        """Block until every dead letter sent so far is acknowledged; returns how many were."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        self._producer.flush(timeout=timeout_s)
        try:
            for future in pending:
                future.get(timeout=timeout_s)
        except Exception as exc:  # any send failure means we must not commit past these records
            raise DeadLetterError(f"{len(pending)} dead letters not acknowledged: {exc}") from exc
        return len(pending)

    def close(self) -> None:
        self._producer.close()


@dataclass(frozen=True)
class DeadLetter:
    """A record read back from the DLQ (tests, replay tools)."""

    value: bytes | None
    key: bytes | None
    reason: str
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    headers: dict[str, bytes]


def _parse(record: ConsumerRecord) -> DeadLetter:
    headers = {k: v for k, v in (record.headers or [])}
    return DeadLetter(
        value=record.value, key=record.key,
        reason=headers.get(REASON_HEADER, b"").decode(), error=headers.get(ERROR_HEADER, b"").decode(),
        source_topic=headers.get(TOPIC_HEADER, b"").decode(),
        source_partition=int(headers.get(PARTITION_HEADER, b"-1")),
        source_offset=int(headers.get(OFFSET_HEADER, b"-1")),
        headers=headers,
    )


def read_dead_letters(
    kafka: KafkaSettings, expected: int | None = None, timeout_s: float = 20.0
) -> Iterator[DeadLetter]:
    """Read the DLQ from the beginning without a group (no offsets committed, nothing disturbed).

    Stops once ``expected`` letters were read, or when the topic stays quiet for a second after the
    first letters (``expected=None``), or at ``timeout_s``.
    """
    consumer = make_consumer(kafka, group_id=None, auto_offset_reset="earliest")
    try:
        parts = consumer.partitions_for_topic(kafka.dlq_topic) or set()
        deadline = time.monotonic() + timeout_s
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(kafka.dlq_topic) or set()
        consumer.assign([TopicPartition(kafka.dlq_topic, p) for p in sorted(parts)])
        count, quiet_since = 0, time.monotonic()
        while time.monotonic() < deadline and (expected is None or count < expected):
            polled = consumer.poll(timeout_ms=200)
            if not polled:
                if expected is None and count and time.monotonic() - quiet_since > 1.0:
                    break
                continue
            quiet_since = time.monotonic()
            for records in polled.values():
                for record in records:
                    count += 1
                    yield _parse(record)
    finally:
        consumer.close()
