"""``mfli bench ingest``: events/s through broker -> EventStream -> validated batches, vs raw kafka-python.

Method: one topic is filled once with ``--events`` synthetic events (valid JSON, about 150 bytes each, as
``mfli produce`` writes them). Then ``--runs`` rounds each read the whole topic twice from the start
with fresh consumer groups: once with a plain ``KafkaConsumer`` poll loop (no parsing: the client's own
ceiling) and once through :class:`~mfli.consumers.EventStream` (validation, dedupe, DLQ check, batch
assembly; one commit at the end, since the learner stores offsets with its checkpointed state and commits
per checkpoint, not per batch). Both use the same client settings.

The clock starts when the first records arrive, and those first records are not counted, so the group
join (about 1.5 s on Tansu with the small timeouts used here) does not dilute the rate of either side.
Reported: medians (and p95) over rounds, and the validated/raw ratio; the target is >= 40k events/s
validated and an overhead (1 - ratio) below 40 %.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from contextlib import ExitStack
from typing import Any

from kafka import KafkaConsumer

from mfli.config import Settings
from mfli.consumers import EventStream
from mfli.consumers.validation import Validator
from mfli.kafka.broker import EmbeddedBroker
from mfli.kafka.clients import consumer_config, ensure_topics, make_producer
from mfli.sources.synthetic import SyntheticStream

from .report import Row, result

log = logging.getLogger(__name__)

TARGET_EVENTS_PER_S = 40_000
MAX_OVERHEAD = 0.40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=50_000, help="events per run")
    parser.add_argument("--runs", type=int, default=5, help="rounds (each: one raw and one validated pass)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="EventStream max_records per batch "
                        "(default settings.ingest.batch_size)")
    parser.add_argument("--bootstrap", default=None, help="existing broker; default: embedded Tansu")


def _payloads(n: int) -> list[tuple[bytes, bytes]]:
    stream = SyntheticStream(n_users=5_000, n_items=20_000, n_topics=50, seed=42)
    return [(e.user_id.encode(), e.model_dump_json().encode()) for e in stream.events(n)]


def _raw_rate(settings: Settings, topic: str, n: int) -> float:
    consumer = KafkaConsumer(**consumer_config(settings.kafka, f"bench-raw-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    try:
        seen, counted, t0 = 0, 0, None
        deadline = time.monotonic() + 120
        while seen < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500)
            got = sum(len(r) for r in polled.values())
            if got and t0 is None:
                t0 = time.perf_counter()
            elif got:
                counted += got
            seen += got
        if seen < n or t0 is None:
            raise RuntimeError(f"raw consumer read {seen} of {n} records")
        return counted / (time.perf_counter() - t0)
    finally:
        consumer.close(autocommit=False)


def _validated_rate(settings: Settings, topic: str, n: int, batch_size: int) -> float:
    group = f"bench-val-{uuid.uuid4().hex[:8]}"
    with EventStream(settings, group_id=group, topics=[topic]) as stream:
        seen, counted, valid, t0 = 0, 0, 0, None
        offsets: dict = {}
        deadline = time.monotonic() + 120
        while seen < n and time.monotonic() < deadline:
            batch = stream.poll_batch(max_records=batch_size, timeout_ms=500)
            if batch.records and t0 is None:
                t0 = time.perf_counter()
            elif batch.records:
                counted += batch.records
            seen += batch.records
            valid += len(batch.events)
            offsets.update(batch.offsets)
        stream.commit(offsets)  # the learner commits per checkpoint, not per batch (offsets live in its state)
        if seen < n or t0 is None:
            raise RuntimeError(f"EventStream read {seen} of {n} records")
        if valid != n:
            raise RuntimeError(f"{n - valid} valid events were not delivered (dedupe or validation bug)")
        return counted / (time.perf_counter() - t0)


def _validator_rate(payloads: list[tuple[bytes, bytes]], settings: Settings) -> float:
    validate = Validator.for_events(settings.ingest.max_event_bytes, settings.ingest.event_types)
    values = [v for _, v in payloads]
    t0 = time.perf_counter()
    for v in values:
        validate(v)
    return len(values) / (time.perf_counter() - t0)


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if args.runs < 1 or args.events < 10:
        raise ValueError("need --runs >= 1 and --events >= 10")
    batch_size = args.batch_size or settings.ingest.batch_size
    with ExitStack() as stack:
        bootstrap = args.bootstrap or settings.kafka.bootstrap_servers
        if not bootstrap:
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
        topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        kafka = settings.kafka.model_copy(update={
            "bootstrap_servers": bootstrap, "events_topic": topic, "dlq_topic": f"{topic}.dlq",
            "session_timeout_ms": 3000, "heartbeat_interval_ms": 500})
        settings = settings.model_copy(update={"kafka": kafka})
        ensure_topics(bootstrap, kafka, [topic, kafka.dlq_topic], partitions=args.partitions)

        payloads = _payloads(args.events)
        producer = make_producer(kafka)
        t0 = time.perf_counter()
        for key, value in payloads:
            producer.send(topic, key=key, value=value)
        producer.flush()
        produce_rate = len(payloads) / (time.perf_counter() - t0)
        producer.close()

        raw, validated = [], []
        for i in range(args.runs):
            raw.append(_raw_rate(settings, topic, args.events))
            validated.append(_validated_rate(settings, topic, args.events, batch_size))
            log.info("round %d: raw %.0f/s, validated %.0f/s", i + 1, raw[-1], validated[-1])
        validator = [_validator_rate(payloads, settings) for _ in range(3)]

    raw_row = Row.from_samples("raw kafka-python poll (no parsing)", raw, "events/s")
    val_row = Row.from_samples("EventStream validated batches", validated, "events/s").against(raw_row)
    rows = [raw_row, val_row,
            Row.from_samples("Validator alone (in-process)", validator, "events/s"),
            Row("produce (idempotent, acks=all)", produce_rate, "events/s", note="single run")]
    overhead = 1 - (val_row.ratio or 0)
    return result(
        "ingest", rows,
        params={"events": args.events, "runs": args.runs, "partitions": args.partitions,
                "batch_size": batch_size, "max_poll_records": kafka.max_poll_records,
                "payload_bytes": sum(len(v) for _, v in payloads) // len(payloads)},
        targets={f"validated >= {TARGET_EVENTS_PER_S:,}/s": val_row.median >= TARGET_EVENTS_PER_S,
                 f"overhead < {MAX_OVERHEAD:.0%} (got {overhead:.1%})": overhead < MAX_OVERHEAD},
    )
