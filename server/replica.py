"""``mfli serve --replica``: a server with its own data directory, fed by Kafka, on any machine.

A replica shares no files with the pipeline. Its **applier** (a child process of ``mfli serve``, the one
writer of the replica's LMDB copies) consumes

* ``mfli.index-changes`` (:mod:`mfli.storage.index.changes`, published by the indexer) into its own
  index LMDB, byte for byte the primary's layout, so the unchanged server code (dense mirror included)
  reads it. The topic's offset and the applied version are stored in the sub-db ``repl`` of the same
  environment, in the same transaction as the state, and the transaction commits only at a commit
  marker where the copy equals the primary at that version (:class:`~mfli.storage.index.changes.CommitTracker`):
  a full pass arrives as one commit and is applied as one transaction, so readers never see half of it;
* ``mfli.user-state`` (published by the learner) into its own users LMDB: whole user records,
  applied per poll with the offsets in the same transaction.

Replicas never re-cluster: they store what the indexer decided. A restarted applier seeks to its stored
offsets; one that was stopped longer than ``replication.max_offline_s`` (or whose offset fell off the
log) rebuilds from the topic start inside one write transaction, so its readers keep the old copy until
the new one is consistent.

Readiness: the applier writes a small status file (atomically, twice a second); the HTTP workers report
``/readyz`` 200 only while it is fresh, the broker answers and the oldest unapplied change on both topics
is younger than ``replication.max_lag_s``. Requests are still answered from the last applied state while
not ready (a load balancer stops sending them; a replica cut off from Kafka should not go dark).
Metrics (lag, event-to-visible freshness, applied version) are on ``replication.metrics_port``.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import threading
import time
from pathlib import Path

import orjson

from mfli import metrics
from mfli.config import Settings, load_settings
from mfli.kafka.clients import (
    BrokerHealth,
    bootstrap_of,
    ensure_topics,
    make_consumer,
    wait_for_broker,
    wait_for_partitions,
)
from mfli.lifecycle import take_single_writer_lock
from mfli.storage.index import changes as W
from mfli.storage.index.copy import IndexCopy
from mfli.storage.users_lmdb import USER_STATE_TOPIC_CONFIGS, UsersStore

from .lmdb_state import LmdbState

log = logging.getLogger(__name__)

STATUS_FILE = "replica-status.json"
LOCK_FILE = "applier.pid"
#: commit the open transaction at a consistent marker once it holds this many records, even mid-poll
COMMIT_RECORDS = 100_000
ALIVE_EVERY_S = 60.0
FRESHNESS_SAMPLES = 256
_I64 = struct.Struct("<q")  # header ``ts``: ingest time (ms) of a user-state record


def index_path(settings: Settings) -> Path:
    return Path(settings.replication.data_dir) / "index.lmdb"


def users_path(settings: Settings) -> Path:
    return Path(settings.replication.data_dir) / "users.lmdb"


class UsersCopy:
    """The replica's users LMDB: whole records from ``mfli.user-state``, one transaction per poll."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.store = UsersStore(path, history=settings.model.history, keep=settings.model.seen_kept)
        self.offsets = self.store.offsets()
        self.bad = 0
        self.last_applied_ts: int | None = None

    def apply(self, records, observe: bool) -> int:
        """``records``: (topic, partition, offset, key, value, headers, ts) in offset order per partition."""
        latest: dict[bytes, bytes | None] = {}
        offsets: dict[str, int] = {}
        ingest: list[int] = []
        for topic, partition, offset, key, value, headers, ts in records:
            offsets[f"{topic}:{partition}"] = offset + 1
            self.last_applied_ts = ts
            if not key or len(key) > 511 or (value is not None and not _valid_user(value)):
                self.bad += 1
                metrics.REPLICA_BAD_RECORDS.labels(topic="users").inc()
                log.error("user-state record %s:%d@%d skipped: not a user record", topic, partition, offset)
                continue
            latest[key] = value
            raw = W.header(headers, "ts")
            if raw is not None and len(raw) == 8 and _I64.unpack(raw)[0] > 0:  # 0: a re-send, no event time
                ingest.append(_I64.unpack(raw)[0])
        if not offsets:
            return 0
        self.store.put_records(latest, offsets)
        self.offsets.update(offsets)
        metrics.REPLICA_RECORDS.labels(topic="users").inc(len(latest))
        if observe and ingest:
            done = time.time() * 1000
            sample = ingest[:: max(1, len(ingest) // FRESHNESS_SAMPLES)]
            for t in sample:
                metrics.REPLICA_FRESHNESS_SECONDS.labels(kind="user").observe(max((done - t) / 1000.0, 0.0))
        return len(latest)

    def close(self) -> None:
        self.store.close()


def _valid_user(value: bytes) -> bool:
    try:
        rec = orjson.loads(value)
        return isinstance(rec, dict) and all(isinstance(rec.get(k), list) for k in ("i", "t", "e")) and \
            len(rec["i"]) == len(rec["t"]) >= len(rec["e"]) and isinstance(rec.get("v"), int)  # ids: newest H only
    except orjson.JSONDecodeError:
        return False


def read_status(settings: Settings) -> dict | None:
    try:
        return orjson.loads((Path(settings.replication.data_dir) / STATUS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


class ReplicaApplier:
    """The applier process's loop: Kafka → :class:`IndexCopy` and :class:`UsersCopy`, status and metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.replication.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop = False
        self._lock_fh = None
        self.index: IndexCopy | None = None
        self.users: UsersCopy | None = None
        self.caught_up_once = False
        self._status_at = 0.0
        self._lag: dict[str, tuple[int | None, float | None]] = {"index": (None, None), "users": (None, None)}
        self.broker_ok = False

    def stop(self, *_: object) -> None:
        self._stop = True

    def _take_lock(self) -> None:
        self._lock_fh = take_single_writer_lock(self.data_dir, LOCK_FILE, "replica applier")

    def _consumer(self):
        from kafka import TopicPartition

        k = self.settings.kafka
        ensure_topics(k.bootstrap_servers, k, [k.index_changes_topic], partitions=1,
                      configs=W.INDEX_CHANGES_TOPIC_CONFIGS)
        ensure_topics(k.bootstrap_servers, k, [k.user_state_topic], configs=USER_STATE_TOPIC_CONFIGS)
        consumer = make_consumer(k, None, client_id=f"{k.client_id}-replica", auto_offset_reset="none",
                                 max_partition_fetch_bytes=max(k.max_partition_fetch_bytes, 16 << 20))
        parts = wait_for_partitions(consumer, k.user_state_topic)
        self.index_tp = TopicPartition(k.index_changes_topic, 0)
        self.user_tps = [TopicPartition(k.user_state_topic, p) for p in parts]
        consumer.assign([self.index_tp, *self.user_tps])
        self._seek(consumer)
        return consumer

    def _seek(self, consumer) -> None:
        assert self.index is not None and self.users is not None
        if self.index.offset < 0:
            consumer.seek_to_beginning(self.index_tp)
        else:
            consumer.seek(self.index_tp, self.index.offset)
        for tp in self.user_tps:
            stored = self.users.offsets.get(f"{tp.topic}:{tp.partition}")
            if stored is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, stored)
        log.info("replica consuming %s from %s (version %d) and %s from %s", self.index_tp.topic,
                 self.index.offset if self.index.offset >= 0 else "the start", self.index.version,
                 self.settings.kafka.user_state_topic, self.users.offsets or "the start")

    def run(self, parent_pid: int | None = None) -> int:
        from kafka.errors import KafkaError, OffsetOutOfRangeError

        rs = self.settings.replication
        self._take_lock()
        metrics.serve_metrics(rs.metrics_port, process="replica")
        metrics.UP.labels(process="replica").set(1)
        self.index = IndexCopy(self.data_dir / "index.lmdb", self.settings)
        self.users = UsersCopy(self.data_dir / "users.lmdb", self.settings)
        offline = time.time() - self.index.alive_at / 1000
        if self.index.alive_at and offline > rs.max_offline_s:
            log.warning("replica was offline %.0f s (> replication.max_offline_s): rebuilding", offline)
            self.index.rebootstrap()
        self._write_status("starting")
        if not wait_for_broker(self.settings.kafka, "replica", lambda: self._stop or self._orphaned(parent_pid)):
            return 0
        consumer = self._consumer()
        health = BrokerHealth(bootstrap_of(self.settings.kafka), interval_s=1.0, timeout_s=1.0).start()
        backoff = 0.0
        try:
            while not self._stop and not self._orphaned(parent_pid):
                try:
                    polled = consumer.poll(timeout_ms=100)
                    backoff = 0.0
                except OffsetOutOfRangeError as exc:
                    log.warning("replica offset out of range (%s): rebuilding from the topic start", exc)
                    self.index.rebootstrap()
                    self.users.offsets = {}
                    self._seek(consumer)
                    continue
                except KafkaError as exc:
                    backoff = min(max(0.2, backoff * 2), 5.0)
                    log.warning("Kafka error (%s); retrying in %.1f s", exc, backoff)
                    time.sleep(backoff)
                    continue
                hw = consumer.highwater(self.index_tp)
                if hw is not None and hw < self.index.offset:
                    log.warning("%s ends at %d, before this replica's offset %d (topic recreated?): rebuilding",
                                self.index_tp.topic, hw, self.index.offset)
                    self.index.rebootstrap()
                    self.users.offsets = {}
                    self._seek(consumer)
                    continue
                self._apply(polled, consumer)
                self.broker_ok = health.ok
                self._export_lag(consumer)
                if time.time() * 1000 - self.index.alive_at > ALIVE_EVERY_S * 1000:
                    self.index.touch_alive()
                self._write_status()
        finally:
            health.stop()
            metrics.UP.labels(process="replica").set(0)
            metrics.READY.labels(process="replica").set(0)
            try:
                consumer.close(autocommit=False)
            finally:
                self.index.close()
                self.users.close()
                (self.data_dir / STATUS_FILE).unlink(missing_ok=True)
                if self._lock_fh is not None:
                    self._lock_fh.close()  # releases the flock
                    self._lock_fh = None
        return 0

    @staticmethod
    def _orphaned(parent_pid: int | None) -> bool:
        return parent_pid is not None and os.getppid() != parent_pid

    def _apply(self, polled, consumer) -> None:
        assert self.index is not None and self.users is not None
        observe = self.caught_up_once
        user_records = []
        for tp, records in polled.items():
            if tp == self.index_tp:
                last_marker = max((i for i, r in enumerate(records) if r.key == W.MARKER_KEY), default=-1)
                end = consumer.highwater(tp)
                for i, r in enumerate(records):
                    at_end = end is not None and r.offset == end - 1
                    if self.index.feed(r.offset, r.key, r.value, r.headers, r.timestamp, at_end):
                        if i == last_marker or self.index.pending_records >= COMMIT_RECORDS:
                            self.index.commit(r.offset + 1, r.timestamp, observe)
            else:
                user_records.extend((tp.topic, tp.partition, r.offset, r.key, r.value, r.headers, r.timestamp)
                                    for r in records)
        if user_records:
            self.users.apply(user_records, observe)

    def _export_lag(self, consumer) -> None:
        """Lag from the fetch responses' high watermarks (correct on Tansu and Kafka, KAFKA.md)."""
        assert self.index is not None and self.users is not None
        now = time.time() * 1000
        hw = consumer.highwater(self.index_tp)
        if hw is None:
            self._lag["index"] = (None, None)
        else:
            behind = hw - max(self.index.offset, 0)
            oldest = self.index.oldest_unapplied_ts or self.index.last_applied_ts
            self._lag["index"] = (behind, 0.0 if behind <= 0 else (now - oldest) / 1000 if oldest else None)
        total, known = 0, True
        for tp in self.user_tps:
            hw = consumer.highwater(tp)  # set by every fetch response, an empty partition's too
            if hw is None:
                known = False
                continue
            total += max(hw - self.users.offsets.get(f"{tp.topic}:{tp.partition}", 0), 0)
        last = self.users.last_applied_ts
        secs = None if not known else 0.0 if total == 0 else (now - last) / 1000 if last else None
        self._lag["users"] = (total if known else None, secs)
        for topic, (msgs, secs) in self._lag.items():
            if msgs is not None:
                metrics.REPLICA_LAG_MESSAGES.labels(topic=topic).set(msgs)
            if secs is not None:
                metrics.REPLICA_LAG_SECONDS.labels(topic=topic).set(secs)

    def ready(self) -> tuple[bool, str]:
        limit = self.settings.replication.max_lag_s
        if not self.broker_ok:
            return False, "Kafka does not answer"
        for topic, (msgs, secs) in self._lag.items():
            if msgs is None or secs is None:
                return False, f"{topic} lag not known yet"
            if secs > limit:
                return False, f"{topic} changes {secs:.1f} s behind ({msgs} messages)"
        return True, ""

    def _write_status(self, state: str = "running") -> None:
        now = time.monotonic()
        if now - self._status_at < self.settings.replication.status_interval_s and state == "running":
            return
        self._status_at = now
        ok, reason = self.ready() if state == "running" else (False, state)
        if ok and not self.caught_up_once:
            self.caught_up_once = True
            log.info("replica caught up at index version %d", self.index.version if self.index else -1)
        metrics.READY.labels(process="replica").set(1 if ok else 0)
        status = {"ready": ok, "reason": reason, "updated_ms": int(time.time() * 1000), "pid": os.getpid(),
                  "broker_ok": self.broker_ok, "index_version": self.index.version if self.index else 0,
                  "index_offset": self.index.offset if self.index else -1,
                  "lag": {t: {"messages": m, "seconds": s} for t, (m, s) in self._lag.items()}}
        path = self.data_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(status))
        os.replace(tmp, path)


def applier_main(parent_pid: int | None = None) -> None:
    """Entry point of the applier child process (settings from the ``MFLI_*`` environment)."""
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    applier = ReplicaApplier(settings)
    signal.signal(signal.SIGTERM, applier.stop)
    signal.signal(signal.SIGINT, applier.stop)
    raise SystemExit(applier.run(parent_pid))


class ApplierSupervisor:
    """Runs the applier as a child of ``mfli serve`` and restarts it if it dies (with backoff)."""

    def __init__(self) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="replica-applier", daemon=True)

    def start(self) -> ApplierSupervisor:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        self._proc = self._ctx.Process(target=applier_main, args=(os.getpid(),), name="mfli-replica-applier")
        self._proc.start()
        log.info("replica applier started (pid %d)", self._proc.pid)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.wait(1.0):
            if self._proc is not None and not self._proc.is_alive():
                log.error("replica applier exited (%s); restarting in %.0f s", self._proc.exitcode, backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
                self._spawn()

    def stop(self, grace_s: float = 10.0) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(grace_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()


class ReplicaState(LmdbState):
    """The server's state source on a replica: the copies in its data directory; ``/readyz`` also needs
    the applier to be caught up (its status file), while requests are answered whenever the copy is
    servable (:meth:`serving`)."""

    def __init__(self, settings: Settings) -> None:
        settings = settings.model_copy(deep=True)
        settings.index.path = index_path(settings)
        settings.learner.users_path = users_path(settings)
        super().__init__(settings)
        self._status: tuple[float, dict | None] = (0.0, None)

    def serving(self) -> tuple[bool, str]:
        return super().ready()

    def ready(self) -> tuple[bool, str]:
        now = time.monotonic()
        if now - self._status[0] > 0.25:
            self._status = (now, read_status(self.settings))
        status = self._status[1]
        if status is None:
            return False, "replica applier has not reported yet"
        age = time.time() - status["updated_ms"] / 1000
        if age > self.settings.replication.status_stale_s:
            return False, f"replica applier silent for {age:.0f} s"
        if not status["ready"]:
            return False, f"replica not caught up: {status['reason']}"
        return self.serving()

