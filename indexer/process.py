"""``mfli index``: the indexer process, a thin Kafka shell around the index's single writer
(:class:`~mfli.storage.index.writer.IndexWriter`, which owns the index format with its readers).

* ``mfli index`` (``run``): consume ``mfli.item-updates`` and apply each poll in one LMDB write
  transaction together with the offsets it reflects. The stored offsets are the truth: on start the
  consumer is *assigned* every partition (no group rebalancing: there is exactly one indexer per index)
  and seeks to them, so a SIGKILL at any point resumes exactly after the last committed batch, and
  replayed deltas are no-ops by version. Offsets are also committed to Kafka after the LMDB commit,
  only so lag shows up in the usual tools.
* A full pass runs every ``index.full_pass_interval_s`` when something changed (computed in a
  background thread, committed in the writer thread; see :mod:`mfli.storage.index.full_pass`), and on
  demand: ``mfli index full-pass`` signals a running indexer (SIGUSR1, pid from its lock file) or, if
  none runs, does the pass itself.
* ``mfli index check``: the invariant checker; exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lmdb
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from mfli import metrics
from mfli.config import Settings
from mfli.deltas import CodebookSnapshot, DeltaBatch, decode_message
from mfli.indexer.check import check_index
from mfli.kafka.clients import BrokerHealth, bootstrap_of, ensure_topics, wait_for_broker, wait_for_partitions
from mfli.kafka.offsets import lag_of, offset_key
from mfli.lifecycle import stop_on_signals, take_single_writer_lock
from mfli.retrieval.query_model import QueryModel
from mfli.storage.index.writer import IndexWriter

log = logging.getLogger(__name__)

LOCK_FILE = "writer.pid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="run", choices=["run", "check", "full-pass"],
                        help="run the indexer (default), check the invariants, or run a full pass now")
    parser.add_argument("--path", default=None, help="index LMDB directory (default: index.path)")
    parser.add_argument("--min-in-bounds", type=float, default=0.95,
                        help="check: required share of items in clusters within [B_low, B_upp] "
                        "(0 = report only)")
    parser.add_argument("--max-batches", type=int, default=0, help="run: stop after this many polls (tests)")
    parser.add_argument("--against", metavar="PATH", default=None,
                        help="check: compare with this index (a replica's copy) byte for byte at the same "
                        "index version instead of checking invariants")
    parser.add_argument("--wait", type=float, default=30.0,
                        help="check --against: seconds to wait for both indexes to show the same version")


def run(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.path or settings.index.path)
    if args.action == "check" and args.against:
        from mfli.storage.index.compare import compare_indexes

        result = compare_indexes(path, args.against, settings.index.map_size, wait_s=args.wait)
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0 if result.ok else 1
    if args.action == "check":
        report = check_index(path, settings.index, min_in_bounds=args.min_in_bounds or None)
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return 0 if report.ok else 1
    if args.action == "full-pass":
        return _full_pass_now(path, settings)
    return IndexerLoop(settings, path).run(max_batches=args.max_batches)


def _full_pass_now(path: Path, settings: Settings) -> int:
    pid = _running_pid(path)
    if pid is not None:
        os.kill(pid, signal.SIGUSR1)
        log.info("asked the running indexer (pid %d) for a full pass", pid)
        return 0
    writer = IndexWriter(path, settings)
    try:
        report = writer.full_pass()
        sys.stdout.write(json.dumps(report.__dict__ if report else {"skipped": True}) + "\n")
    finally:
        writer.close()
    return 0


def _running_pid(path: Path) -> int | None:
    """Pid of the indexer holding the lock file of ``path``, or None if nobody holds it."""
    lock = path / LOCK_FILE
    if not lock.exists():
        return None
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            return int(text) if text else None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


class IndexerLoop:
    """Kafka consumer -> IndexWriter; see the module docstring."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self.settings = settings
        self.path = path
        self._stop = threading.Event()  # replaced by the signal-driven one when run() starts
        self._full_pass_requested = False
        self._lock_fh = None
        self._lag_at = 0.0  # monotonic time lag was last exported

    def _take_lock(self) -> None:
        self._lock_fh = take_single_writer_lock(self.path, LOCK_FILE, "indexer")

    def _consumer(self, writer):
        k = self.settings.kafka
        bootstrap = k.bootstrap_servers
        if not bootstrap:
            raise SystemExit("mfli index needs MFLI_KAFKA__BOOTSTRAP_SERVERS (the demo sets it)")
        if not wait_for_broker(k, "indexer", self._stop.is_set):
            raise SystemExit(0)
        ensure_topics(bootstrap, k, [k.item_updates_topic])
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, client_id=f"{k.client_id}-indexer", group_id=k.indexer_group,
            enable_auto_commit=False, fetch_max_wait_ms=k.fetch_max_wait_ms,
            max_poll_records=k.max_poll_records,
            request_timeout_ms=k.request_timeout_ms, reconnect_backoff_max_ms=k.reconnect_backoff_max_ms,
            auto_offset_reset="earliest", max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20,
        )
        parts = wait_for_partitions(consumer, k.item_updates_topic)
        tps = [TopicPartition(k.item_updates_topic, p) for p in parts]
        consumer.assign(tps)
        for tp in tps:
            stored = writer.offsets.get(offset_key(tp.topic, tp.partition))
            if stored is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, stored)
        log.info("indexer consuming %s partitions %s from stored offsets %s", k.item_updates_topic,
                 parts, writer.offsets)
        return consumer

    def _export_lag(self, consumer) -> None:
        """Lag of the item-update partitions (high watermark from fetches, correct on Tansu and Kafka),
        at most once a second: the "index stuck while deltas wait" alert keys on it."""
        now = time.monotonic()
        if now - self._lag_at < 1.0:
            return
        self._lag_at = now
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = lag_of(highwater, consumer.position(tp))
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    def run(self, max_batches: int = 0) -> int:
        self._take_lock()
        self._stop = stop_on_signals()
        signal.signal(signal.SIGUSR1, self._on_full_pass)
        metrics.serve_metrics(self.settings.index.metrics_port, process="indexer")
        metrics.UP.labels(process="indexer").set(1)
        writer = IndexWriter(self.path, self.settings)
        consumer = self._consumer(writer)
        publisher = None  # server replicas follow the index through Kafka (indexer/publish_changes.py)
        if self.settings.replication.publish:
            from mfli.indexer.publish_changes import attach

            publisher = attach(writer, self.settings)
        metrics.READY.labels(process="indexer").set(1)
        # An idle poll looks the same whether the topic is quiet or the broker hung: probe it for real.
        health = BrokerHealth(bootstrap_of(self.settings.kafka)).start()
        ready = True
        # the pass computes in a background thread (numpy releases the GIL) while deltas keep flowing;
        # only its commit, which reconciles what changed meanwhile, runs in this, the writer's thread
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="full-pass")
        cancel = threading.Event()
        pending: Future | None = None
        last_full = time.monotonic()
        dirty = False
        batches = 0
        map_full_backoff = 0.0
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=200)
                if polled:
                    try:
                        changed = self._apply(writer, consumer, polled)
                    except lmdb.MapFullError:
                        # the writer aborted the transaction (index unchanged, mfli_lmdb_errors_total
                        # counted); stay up, not ready, and retry the same records with backoff rather
                        # than crash-loop: the server keeps answering from the last committed state
                        map_full_backoff = min(30.0, max(0.5, map_full_backoff * 2))
                        log.error("index LMDB map full (index.map_size = %d bytes): batch not applied, "
                                  "retrying in %.1f s; raise MFLI_INDEX__MAP_SIZE and restart the indexer",
                                  self.settings.index.map_size, map_full_backoff)
                        metrics.READY.labels(process="indexer").set(0)
                        ready = False
                        self._rewind(consumer, writer)
                        time.sleep(map_full_backoff)
                        batches += 1
                        if max_batches and batches >= max_batches:
                            break
                        continue
                    map_full_backoff = 0.0  # readiness comes back below, if the broker answers too
                    dirty = dirty or changed
                    batches += 1
                if ready != (health.ok and not map_full_backoff):
                    ready = health.ok and not map_full_backoff
                    metrics.READY.labels(process="indexer").set(1 if ready else 0)
                writer.maybe_sync()
                if publisher is not None:
                    publisher.poll()
                self._export_lag(consumer)
                if pending is not None and pending.done():
                    prep = pending.result()
                    if prep is not None:
                        writer.commit_full_pass(prep)
                    pending = None
                due = dirty and time.monotonic() - last_full >= self.settings.index.full_pass_interval_s
                if pending is None and (due or self._full_pass_requested or writer.full_pass_wanted):
                    self._full_pass_requested = writer.full_pass_wanted = False
                    pending = pool.submit(writer.prepare_full_pass, 0, cancel)
                    last_full, dirty = time.monotonic(), False
                if max_batches and batches >= max_batches:
                    break
        finally:
            # the pass thread may hold a read transaction: closing the environment under it would crash
            cancel.set()
            health.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            metrics.READY.labels(process="indexer").set(0)
            metrics.UP.labels(process="indexer").set(0)
            consumer.close(autocommit=False)
            if publisher is not None:
                publisher.close()
            writer.close()
        return 0

    @staticmethod
    def _rewind(consumer, writer) -> None:
        """Seek every partition back to the offsets the index holds (the failed batch is read again)."""
        for tp in consumer.assignment():
            stored = writer.offsets.get(offset_key(tp.topic, tp.partition))
            if stored is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, stored)

    def _apply(self, writer, consumer, polled) -> bool:
        batches: list[DeltaBatch] = []
        codebooks: list[CodebookSnapshot] = []
        models: list[QueryModel] = []
        offsets: dict[str, int] = {}
        commit = {}
        for tp, records in polled.items():
            for record in records:
                try:
                    msg = decode_message(record.value)
                except ValueError as exc:
                    log.warning("skipping undecodable record %s:%d@%d: %s", tp.topic, tp.partition,
                                record.offset, exc)
                    continue
                if isinstance(msg, CodebookSnapshot):
                    codebooks.append(msg)
                elif isinstance(msg, QueryModel):
                    models.append(msg)
                elif len(msg):
                    batches.append(msg)
            offsets[offset_key(tp.topic, tp.partition)] = records[-1].offset + 1
            commit[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
        result = writer.apply(DeltaBatch.concat(batches) if batches else None, offsets, codebooks, models)
        try:
            consumer.commit(commit)  # monitoring only: LMDB holds the offsets that matter
        except Exception as exc:  # noqa: BLE001 - a failed monitoring commit must not stop indexing
            log.debug("kafka offset commit failed: %s", exc)
        return bool(result.applied or codebooks or models)

    def _on_full_pass(self, *_: object) -> None:
        self._full_pass_requested = True
