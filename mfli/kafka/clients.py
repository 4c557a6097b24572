"""kafka-python clients built from ``settings.kafka``, so every process dials Kafka alike: consumer and
producer factories, topic creation, and the probes that tell a live broker from a hung one.

Every option tests or operators may need to change comes from :class:`mfli.config.KafkaSettings`
(names mirror Kafka's own). Producers are idempotent with ``acks='all'``: a retried send can then
never duplicate or reorder a record, which is what makes "at-least-once, idempotent state" hold.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from mfli import metrics
from mfli.config import KafkaSettings

log = logging.getLogger(__name__)


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


def _any_broker(bootstrap: str, timeout_s: float, check: Callable[[socket.socket], bool]) -> bool:
    """True if ``check`` passes on a connection to any bootstrap address (``host:port``, comma-separated)."""
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=timeout_s) as sock:
                sock.settimeout(timeout_s)
                if check(sock):
                    return True
        except (OSError, ValueError):
            continue
    return False


def broker_reachable(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """True if any bootstrap address accepts a TCP connection (cheap; no Kafka client state)."""
    return _any_broker(bootstrap, timeout_s, lambda sock: True)


_API_VERSIONS_V0 = struct.pack(">hhih", 18, 0, 7, len(b"mfli-health")) + b"mfli-health"  # correlation id 7


def _answers_api_versions(sock: socket.socket) -> bool:
    sock.sendall(struct.pack(">i", len(_API_VERSIONS_V0)) + _API_VERSIONS_V0)
    head = sock.recv(8, socket.MSG_WAITALL)  # response size, correlation id
    return len(head) == 8 and struct.unpack(">ii", head)[1] == 7


def broker_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True if a bootstrap broker answers a Kafka ``ApiVersions`` (v0) request within ``timeout_s``.

    Why not just TCP: a hung broker (stopped process, partition behind a proxy) still completes the TCP
    handshake from the kernel's listen backlog, and kafka-python's consumer keeps polling quietly for
    ``request_timeout_ms`` and longer. A real request/response is what "the broker is up" means.
    """
    return _any_broker(bootstrap, timeout_s, _answers_api_versions)


class BrokerHealth:
    """Background probe (:func:`broker_answers` every ``interval_s``) for processes whose main loop cannot
    tell a hung broker from a quiet topic (an idle ``poll`` returns nothing in both cases)."""

    def __init__(self, bootstrap: str, interval_s: float = 2.0, timeout_s: float = 2.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.ok = True
        #: called from the probe thread when the answer changes: for a process whose main loop may itself
        #: be blocked on the hung broker (the learner's poll or commit), so it cannot read ``ok`` in time
        self._on_change = on_change
        self._bootstrap, self._interval, self._timeout = bootstrap, interval_s, timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-health", daemon=True)

    def start(self) -> BrokerHealth:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            ok = broker_answers(self._bootstrap, self._timeout)
            if ok != self.ok:
                (log.info if ok else log.warning)("Kafka at %s %s", self._bootstrap,
                                                  "answers again" if ok else "does not answer (not ready)")
                self.ok = ok
                if self._on_change is not None:
                    self._on_change(ok)


def wait_for_broker(kafka: KafkaSettings, process: str, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Block until the broker answers, with exponential backoff up to ``reconnect_backoff_max_ms``.

    Why: kafka-python gives up on an unreachable bootstrap after ``request_timeout_ms`` with an
    exception, so a process started before its broker would exit and be restarted in a loop. Waiting
    here, not ready (``mfli_process_ready`` 0) until the broker is back, is what operators expect.
    Returns False if ``stopping()`` became true first.
    """
    bootstrap = bootstrap_of(kafka)
    backoff, logged = 0.1, False
    while not broker_reachable(bootstrap):
        metrics.READY.labels(process=process).set(0)
        if not logged:
            log.warning("Kafka at %s is not reachable; waiting (retrying with backoff)", bootstrap)
            logged = True
        if stopping():
            return False
        time.sleep(backoff)
        backoff = min(backoff * 2, kafka.reconnect_backoff_max_ms / 1000)
    if logged:
        log.info("Kafka at %s is reachable again", bootstrap)
    return True


def ensure_topics(bootstrap: str, kafka: KafkaSettings, topics: Iterable[str], partitions: int | None = None,
                  configs: dict[str, str] | None = None) -> None:
    """Create ``topics`` with ``kafka.partitions`` (or ``partitions``) partitions; existing ones are fine.

    Idempotent so every process can call it at start-up without coordinating who creates what.
    Tansu cannot add partitions later (no ``create_partitions``), so get the count right first.
    ``configs``: topic configs for topics created here (log compaction for the replication topics).
    """
    count = partitions or kafka.partitions
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=f"{kafka.client_id}-admin",
                             request_timeout_ms=kafka.request_timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        for topic in missing:
            try:
                admin.create_topics([NewTopic(name=topic, num_partitions=count, replication_factor=1,
                                              topic_configs=dict(configs or {}))])
            except TopicAlreadyExistsError:
                pass  # another process won the race: fine
        if missing:
            log.info("created topics %s with %d partitions", missing, count)
    finally:
        admin.close()


def wait_for_partitions(consumer, topic: str, timeout_s: float = 30.0) -> list[int]:
    """The sorted partition ids of ``topic``, waiting up to ``timeout_s`` for its metadata (a topic just
    created by another process may not be in the consumer's first metadata response); exits with a clear
    message if it still has none."""
    deadline = time.monotonic() + timeout_s
    parts = consumer.partitions_for_topic(topic)
    while not parts and time.monotonic() < deadline:
        time.sleep(0.2)
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise SystemExit(f"topic {topic} has no partitions")
    return sorted(parts)
