"""Validated, de-duplicated micro-batches from ``mfli.events`` and ``mfli.items`` (docs/design.md §Delivery,
§Wire formats).

The learner's one door to Kafka::

    stream = EventStream(settings, group_id="mfli-learner")
    stream.seek_to(state.offsets)              # offsets stored with the learner's state, if any
    while running:
        batch = stream.poll_batch()            # Batch(events, items, offsets)
        state.apply(batch.events, batch.items, offsets=batch.offsets)   # one durable write
        stream.commit(batch.offsets)           # only after the state is durable
    stream.close()

Delivery reasoning (why nothing valid is lost and nothing invalid gets through):

* Offsets are never committed automatically. ``Batch.offsets`` is, per partition, the offset *after*
  the last record the batch reflects — valid, invalid or duplicate — i.e. exactly what to commit or
  store. Invalid records are in the dead-letter topic, acknowledged by all replicas, *before*
  :meth:`EventStream.poll_batch` returns the batch, so no commit can ever cover an unsent dead letter.
  If the DLQ write fails, the stream seeks back to the batch start and raises ``DeadLetterError``.
* On (re)assignment a rebalance listener seeks each partition to the offset the owner gave through
  :meth:`EventStream.seek_to` (its stored state), else Kafka resumes from the committed offset. A
  state that stores offsets with itself therefore resumes exactly where it ends, whatever was committed.
* After a crash only the uncommitted tail is re-delivered. Records the state already reflects are
  skipped by seeking to the stored offsets; without stored offsets the learner re-applies at most one
  batch, and its state is idempotent per event (docs/design.md §Delivery).
* The ``event_id`` window lives in memory and restarts empty. Duplicates it catches are *producer*
  duplicates (the same event sent twice at different offsets). Duplicates that straddle a restart are
  therefore only possible when the original and its copy lie on either side of the resume point; that
  is the residue of at-least-once delivery that the learner's idempotent, offset-stamped state absorbs.

Lag is ``consumer.highwater(tp) - position``: the high watermark comes from fetch responses and is
correct on Apache Kafka and on Tansu, whose ``ListOffsets(LATEST)`` (``end_offsets``) is not
(docs/design.md §Kafka and the embedded broker).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from mfli import metrics
from mfli.config import Settings
from mfli.events import InteractionEvent, ItemEvent
from mfli.kafka.clients import make_consumer
from mfli.kafka.offsets import lag_of

from .dedupe import DedupeWindow
from .dlq import DeadLetterError, DeadLetterWriter
from .validation import Rejection, Validator

log = logging.getLogger(__name__)

Offsets = dict[TopicPartition, int]


@dataclass
class Batch:
    """One validated micro-batch and the Kafka positions it reflects."""

    events: list[InteractionEvent] = field(default_factory=list)
    items: list[ItemEvent] = field(default_factory=list)
    offsets: Offsets = field(default_factory=dict)  # next offset per partition (what to commit/store)
    invalid: int = 0  # records sent to the dead-letter topic
    duplicates: int = 0  # events dropped by the event_id window
    records: int = 0  # raw records the batch covers

    def __len__(self) -> int:
        return len(self.events) + len(self.items)


class _Listener(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the owner's stored offsets (else Kafka's committed ones)."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.stream._drop_leftover(set(revoked))
        if revoked:
            log.info("partitions revoked: %s", sorted(revoked))
        if self.stream.on_revoked is not None:
            self.stream.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
        stored = dict(self.stream._stored)
        if self.stream.on_assigned is not None:
            stored.update(self.stream.on_assigned(set(assigned)) or {})
        seek = {tp: stored[tp] for tp in assigned if tp in stored}
        self.stream._drop_leftover(set(seek))
        for tp, offset in seek.items():
            self.stream._consumer.seek(tp, offset)


class EventStream:
    """Consumer-group reader handing out :class:`Batch` objects; see the module docstring for usage.

    ``on_assigned(partitions) -> {tp: offset}`` may return stored offsets for newly assigned partitions;
    ``on_revoked(partitions)`` lets the owner flush state before another member takes them over.
    Both run on the consumer's IO loop and must return promptly (well inside ``session_timeout_ms``).
    """

    def __init__(
        self,
        settings: Settings,
        group_id: str | None = None,
        topics: Iterable[str] | None = None,
        *,
        on_assigned: Callable[[set[TopicPartition]], Mapping[TopicPartition, int] | None] | None = None,
        on_revoked: Callable[[set[TopicPartition]], None] | None = None,
        dlq: DeadLetterWriter | None = None,
        partitions: Iterable[TopicPartition] | None = None,
    ) -> None:
        """``partitions``: read exactly these (explicit assignment, no group membership: a data-parallel
        learner rank owns a fixed share of the partitions, learner/group.py) instead of subscribing to
        ``topics``; ``group_id`` is then only where offsets are committed."""
        k, ingest = settings.kafka, settings.ingest
        self.settings = settings
        self.topics = list(topics) if topics is not None else [k.events_topic, k.items_topic]
        if not self.topics:
            raise ValueError("EventStream needs at least one topic")
        self.events_topic, self.items_topic = k.events_topic, k.items_topic
        self.on_assigned, self.on_revoked = on_assigned, on_revoked
        self._validators: dict[str, Validator] = {
            k.events_topic: Validator.for_events(ingest.max_event_bytes, ingest.event_types),
            k.items_topic: Validator.for_items(ingest.max_event_bytes),
        }
        unknown = [t for t in self.topics if t not in self._validators]
        if unknown:
            raise ValueError(f"no schema for topics {unknown}; expected {k.events_topic} and/or {k.items_topic}")
        self.dedupe = DedupeWindow(ingest.dedupe_window)
        self._stored: Offsets = {}
        # kafka-python's poll() costs about a millisecond of thread hand-offs however few records it
        # returns, so we always poll max_poll_records and keep the surplus here for the next batch.
        self._poll_records = k.max_poll_records
        self._leftover: deque[tuple[TopicPartition, list]] = deque()
        self._consumer = make_consumer(k, group_id or k.learner_group)
        if partitions is None:
            self._consumer.subscribe(self.topics, listener=_Listener(self))
        else:
            owned = sorted(partitions)
            if any(tp.topic not in self._validators for tp in owned):
                raise ValueError(f"no schema for some of {owned}")
            self._consumer.assign(owned)
        self._dlq = dlq or DeadLetterWriter(k)
        self._owns_dlq = dlq is None

    # --- reading --------------------------------------------------------------------------------
    def poll_batch(self, max_records: int | None = None, timeout_ms: int | None = None) -> Batch:
        """Up to ``max_records`` records, returned as soon as that many arrived or ``timeout_ms`` passed.

        A batch may be empty (nothing arrived) and may hold fewer valid events than records read.
        Defaults: ``settings.ingest.batch_size`` and ``settings.ingest.batch_timeout_ms``.
        """
        max_records = max_records or self.settings.ingest.batch_size
        timeout_ms = self.settings.ingest.batch_timeout_ms if timeout_ms is None else timeout_ms
        batch = Batch()
        starts: Offsets = {}
        deadline = time.monotonic() + timeout_ms / 1000
        while batch.records < max_records:
            if not self._leftover:
                remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
                polled = self._consumer.poll(timeout_ms=remaining_ms, max_records=self._poll_records)
                if not polled:
                    if batch.records or remaining_ms == 0:
                        break
                    continue
                self._leftover.extend(polled.items())
            for tp, records in self._take(max_records - batch.records):
                starts.setdefault(tp, records[0].offset)
                self._ingest(tp.topic, records, batch)
                batch.offsets[tp] = records[-1].offset + 1
            if time.monotonic() >= deadline:
                break
        try:
            self._dlq.flush()
        except DeadLetterError:
            self._drop_leftover(set(starts))
            for tp, offset in starts.items():  # re-read these records rather than skip them
                self._consumer.seek(tp, offset)
            raise
        if batch.events:
            metrics.EVENTS_CONSUMED.labels(topic=self.events_topic).inc(len(batch.events))
        if batch.items:
            metrics.EVENTS_CONSUMED.labels(topic=self.items_topic).inc(len(batch.items))
        if batch.records:
            metrics.INGEST_BATCH_SIZE.observe(len(batch))
        return batch

    def _take(self, wanted: int) -> list[tuple[TopicPartition, list]]:
        """Up to ``wanted`` records from the poll buffer, in fetch order, split per partition."""
        out: list[tuple[TopicPartition, list]] = []
        while wanted > 0 and self._leftover:
            tp, records = self._leftover[0]
            if len(records) <= wanted:
                out.append(self._leftover.popleft())
                wanted -= len(records)
            else:
                out.append((tp, records[:wanted]))
                self._leftover[0] = (tp, records[wanted:])
                wanted = 0
        return out

    def _drop_leftover(self, partitions: set[TopicPartition]) -> None:
        """Forget buffered records of partitions we lost or re-positioned (they will be fetched again)."""
        if partitions:
            self._leftover = deque((tp, r) for tp, r in self._leftover if tp not in partitions)

    def _ingest(self, topic: str, records: list, batch: Batch) -> None:
        validate = self._validators[topic]
        is_events = topic == self.events_topic
        out = batch.events if is_events else batch.items
        seen = self.dedupe.seen
        duplicates = 0
        for record in records:
            result = validate(record.value)
            if type(result) is Rejection:
                self._dlq.send(record, result)
                batch.invalid += 1
            elif is_events and seen(result.event_id):  # type: ignore[union-attr]
                duplicates += 1
            else:
                out.append(result)  # type: ignore[arg-type]
        batch.records += len(records)
        if duplicates:
            batch.duplicates += duplicates
            metrics.EVENTS_DUPLICATE.inc(duplicates)

    # --- positions --------------------------------------------------------------------------------
    def seek_to(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Resume these partitions at these offsets (the owner's stored state), now and on reassignment."""
        self._stored.update(offsets)
        assigned = self._consumer.assignment()
        self._drop_leftover(set(offsets) & set(assigned))
        for tp, offset in offsets.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Commit exactly these offsets (call only once the state reflecting them is durable).

        Returns False when the group rebalanced meanwhile and Kafka refused the commit: harmless for a
        state that stores its offsets, and the new owner starts from the previous commit otherwise.
        """
        if not offsets:
            return True
        self._stored.update(offsets)
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit of %d partitions failed: %s", len(offsets), exc)
            return False
        return True

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def lag(self) -> dict[TopicPartition, int]:
        """Messages behind the high watermark per assigned partition; also exported to CONSUMER_LAG.

        Partitions not fetched yet have no known high watermark and are left out.
        """
        lags: dict[TopicPartition, int] = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            position = self._next_offset(tp)
            if position is None:
                continue
            lags[tp] = lag_of(high, position)
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lags[tp])
        return lags

    def _next_offset(self, tp: TopicPartition) -> int | None:
        """Offset of the next record this stream hands out for ``tp`` (buffered ones not yet handed out)."""
        for buffered_tp, records in self._leftover:
            if buffered_tp == tp:
                return records[0].offset
        return self._consumer.position(tp, timeout_ms=1000)

    def close(self) -> None:
        """Leave the group (offsets are not committed here: the owner commits what is durable)."""
        try:
            self._consumer.close(autocommit=False)
        finally:
            if self._owns_dlq:
                self._dlq.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
