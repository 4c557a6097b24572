"""The indexer publishes every committed index change to ``mfli.index-changes`` (wire format:
:mod:`mfli.storage.index.changes`), so server replicas on other machines can keep their own copy.

:func:`attach` makes an :class:`~mfli.storage.index.writer.IndexWriter` record its commits
(:mod:`mfli.storage.index.recording`: the keys each transaction changed, and an outbox entry in the
same transaction) and hands each commit's records to a :class:`ChangePublisher`, which sends them in
order from a background thread, so a full pass's ~10^5 records do not stall delta apply. Outbox entries
are pruned once Kafka acknowledged them; what a crash or a failed send (broker gone past the producer's
delivery timeout) left unacknowledged is republished as one recovery commit, so nothing committed to
LMDB is lost to replicas.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Any

from mfli import metrics
from mfli.config import Settings
from mfli.kafka.clients import ensure_topics, make_producer
from mfli.storage.index import changes as W
from mfli.storage.index.recording import Outbox, RecordingEnv
from mfli.storage.index.writer import IndexWriter

log = logging.getLogger(__name__)


class ChangePublisher:
    """Sends commits to Kafka in order from a background thread; tracks which versions Kafka acknowledged."""

    def __init__(self, outbox: Outbox, settings: Settings, producer: Any) -> None:
        self.outbox = outbox
        self.topic = settings.kafka.index_changes_topic
        self.producer = producer
        self._queue: queue.Queue[tuple[int, list[W.Message]] | None] = queue.Queue()
        self._inflight: deque[tuple[int, list]] = deque()
        self._lock = threading.Lock()
        self._acked = -1  # highest version whose records (and all before) Kafka acknowledged
        self._failed = False
        #: commits enqueued and not yet handed to the producer, *including* the one the thread holds between
        #: taking it off the queue and recording it in flight (an empty queue alone let ``idle`` be true
        #: while a commit's records were still being sent: found as a flaky replica test under load)
        self._pending = 0
        self.sent_versions = 0
        self._thread = threading.Thread(target=self._run, name="index-changes", daemon=True)

    # --- sending --------------------------------------------------------------------------------------
    def start(self) -> ChangePublisher:
        rec = self.outbox.recovery()
        if rec is not None:
            self.enqueue(*rec)
        self._thread.start()
        return self

    def enqueue(self, version: int, msgs: list[W.Message]) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put((version, msgs))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            version, msgs = item
            futures = []
            try:
                for m in msgs:
                    futures.append(self.producer.send(self.topic, key=m.key, value=m.value, headers=m.headers,
                                                      partition=0))
            except Exception as exc:  # noqa: BLE001 - a send that cannot even be queued: republish later
                log.warning("index changes of version %d not sent (%s); will republish", version, exc)
                self._failed = True
            with self._lock:
                self._inflight.append((version, futures))
                self._pending -= 1
            self.sent_versions += 1
            metrics.INDEX_CHANGES_PUBLISHED.inc(len(futures))

    def acked(self) -> int:
        """Highest version such that it and every earlier queued version were acknowledged by Kafka."""
        with self._lock:
            while self._inflight:
                version, futures = self._inflight[0]
                if not all(f.is_done for f in futures):
                    break
                if any(f.failed() for f in futures):
                    self._failed = True
                    self._inflight.clear()
                    break
                self._inflight.popleft()
                self._acked = max(self._acked, version)
            return self._acked

    def poll(self) -> None:
        """From the indexer loop: after a failed send, republish everything not acknowledged."""
        self.acked()
        if self._failed:
            with self._lock:
                self._failed = False
                self._inflight.clear()
            rec = self.outbox.recovery()
            if rec is not None:
                self.enqueue(*rec)
        metrics.INDEX_CHANGES_UNACKED.set(len(self._inflight) + self._queue.qsize())

    def idle(self) -> bool:
        """Everything queued was handed to the producer and acknowledged."""
        self.acked()
        with self._lock:
            return self._pending == 0 and not self._inflight

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is queued, wait for acknowledgements, then clear the acknowledged outbox entries."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        try:
            self.producer.flush(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - unsent changes stay in the outbox for the next start
            log.warning("index changes not all acknowledged at shutdown (%s); they are republished at start", exc)
        acked = self.acked()
        with self.outbox.env.begin(write=True) as txn:
            self.outbox.prune(txn, acked)
        self.producer.close(timeout=5)


def attach(writer: IndexWriter, settings: Settings, producer: Any = None) -> ChangePublisher:
    """Make ``writer`` publish its commits: wraps its environment, republishes what a crash left unsent."""
    k = settings.kafka
    if producer is None:
        ensure_topics(k.bootstrap_servers, k, [k.index_changes_topic], partitions=1,
                      configs=W.INDEX_CHANGES_TOPIC_CONFIGS)
        # one partition, in order: idempotence keeps retried batches from reordering; large batches
        # because a full pass sends one record per item
        producer = make_producer(k, max_request_size=4 << 20)
    env = writer.env.real if isinstance(writer.env, RecordingEnv) else writer.env
    outbox = Outbox(env, writer.db, settings.replication.max_value_bytes)
    publisher = ChangePublisher(outbox, settings, producer).start()
    writer.env = RecordingEnv(env, writer.db, outbox, publisher.enqueue, publisher.acked)  # type: ignore[assignment]
    return publisher

