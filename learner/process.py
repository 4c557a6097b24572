"""``mfli learn``: the learner process (docs/design.md §Delivery).

Loop: validated micro-batch from Kafka → catalogue changes and one learning step → the batch's events
into the users store (one LMDB transaction, with the offsets) → every ``flush_interval_ms`` the changed
item rows (and a codebook snapshot when it changed) to ``mfli.item-updates`` (what and when is the
:class:`~mfli.learner.publisher.Publisher`'s policy) → every ``checkpoint_interval_s`` an atomic
checkpoint with the offsets it reflects, and only then a Kafka commit of those offsets.

Why nothing is lost or applied twice after a crash:

* the checkpoint holds the offsets its state reflects; a restart restores it and seeks there, so the
  model re-learns exactly the events after the checkpoint, once;
* the users store is idempotent per ``event_id`` (replays are no-ops);
* deltas are published *before* the checkpoint that covers them, so the index never lags the
  checkpoint; their versions come from a clock that only moves forward across restarts (wall-clock
  microseconds, bumped past the last one published), so the indexer accepts post-restart states and
  ignores a replayed message (same version).

Freshness: ``event_ts`` of a published delta is the *ingest* time (wall clock when the oldest batch in
the flush window was polled), not the event's own timestamp: a replayed dataset carries timestamps
from years ago, and what users care about is how long an event takes to become visible.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from kafka import TopicPartition
from kafka.errors import KafkaError

from mfli import metrics
from mfli.config import Settings
from mfli.consumers.stream import Batch, EventStream
from mfli.kafka.clients import BrokerHealth, bootstrap_of, make_producer, wait_for_broker
from mfli.kafka.offsets import offsets_from_json, offsets_to_json
from mfli.learner import group
from mfli.learner.checkpoint import DEDUPE_IDS_KEPT, read_checkpoint, save_checkpoint
from mfli.learner.distributed import exit_now
from mfli.learner.learner import MFLILearner
from mfli.learner.publisher import Publisher
from mfli.lifecycle import stop_on_signals
from mfli.storage.users_lmdb import UsersStore

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "learner.ckpt"


class LearnerProcess:
    """The learner's main loop; ``run_once`` is one poll → learn → (flush) → (checkpoint) round."""

    def __init__(self, settings: Settings) -> None:
        if settings.model.encoder_input != "shared":
            raise ValueError("model.encoder_input='separate' is an evaluation ablation: the server runs the "
                             "encoder on the indexed vectors, so the learner process only trains 'shared'")
        self.settings = settings
        ls = settings.learner
        torch.set_num_threads(ls.threads)
        self.ckpt_path = Path(ls.checkpoint_dir) / CHECKPOINT_NAME
        self.offsets: dict[TopicPartition, int] = {}
        recent_ids: list[str] = []
        held: list[int] = []
        #: valid, distinct events this state reflects (the model skips those on already-deleted items)
        self.events_received = 0
        if self.ckpt_path.exists():
            self.learner, stored, extra = read_checkpoint(self.ckpt_path)
            self.offsets = offsets_from_json(stored)
            recent_ids = extra.get("recent_event_ids", [])
            self.events_received = int(extra.get("events_received", 0))
            held = [int(r) for r in extra.get("held_rows", [])]
            log.info("restored checkpoint at step %d (%d events), offsets %s", self.learner.step,
                     self.learner.events_seen, stored)
        else:
            self.learner = MFLILearner(settings.model)
        self.users = UsersStore(ls.users_path, history=settings.model.history, keep=settings.model.seen_kept)
        self.stream = EventStream(settings, group_id=settings.kafka.learner_group)
        # The de-duplication window is part of the state: without it, a duplicate whose original sits
        # before the checkpoint and whose copy sits after it would be learned twice after a restart.
        self.stream.dedupe.admit_many(recent_ids)
        self.stream.seek_to(self.offsets)
        self.producer = make_producer(settings.kafka)
        # Rows held back by the drift gate are state: a restart must still publish them.
        self.publisher = Publisher(settings, self.learner, self.producer, held=held)
        self.user_state = None  # server replicas read user state from Kafka (learner/publish_users.py)
        if settings.replication.publish:
            from mfli.learner.publish_users import UserStatePublisher

            self.user_state = UserStatePublisher(settings, self.producer)
        self.probe = None
        if settings.learner.probe_path is not None:
            from mfli.learner.probe import PrequentialProbe

            self.probe = PrequentialProbe(settings.learner.probe_path)
        self._last_flush = self._last_ckpt = time.monotonic()
        self._dirty = False

    # --- one round ------------------------------------------------------------------------------------
    def run_once(self) -> Batch:
        batch = self.stream.poll_batch()
        now = time.time()
        if len(batch):
            self.publisher.ingested(now)
            t0 = time.perf_counter()
            if batch.items:
                self.learner.upsert_items(batch.items)
            if batch.events:
                self.events_received += len(batch.events)
                if self.probe is not None:
                    self.probe.score_events(self.learner, batch.events)
                # the stepper exports events, step phases and losses itself (Stepper._export)
                self.learner.learn(batch.events)
            self.users.apply(batch.events, offsets=offsets_to_json(batch.offsets))
            if self.user_state is not None and batch.events:
                self.user_state.publish(self.users, {ev.user_id for ev in batch.events}, int(now * 1000))
            metrics.LEARNER_STEP_SECONDS.labels(phase="total").observe(time.perf_counter() - t0)
        if batch.offsets:
            self.offsets.update(batch.offsets)
            self._dirty = True
        mono = time.monotonic()
        if mono - self._last_flush >= self.settings.learner.flush_interval_ms / 1000:
            self.flush()
        if self._dirty and mono - self._last_ckpt >= self.settings.learner.checkpoint_interval_s:
            self.checkpoint()
        return batch

    # --- publishing -----------------------------------------------------------------------------------
    def flush(self, everything: bool = False) -> int:
        """Publish what changed (:meth:`Publisher.flush`) and export the learner's gauges."""
        self._last_flush = time.monotonic()
        sent = self.publisher.flush(everything)
        self._export_gauges()
        return sent

    def _export_gauges(self) -> None:
        metrics.LEARNER_ITEMS.set(len(self.learner.items))
        metrics.LEARNER_USERS.set(len(self.learner.users))
        self.stream.lag()  # exports mfli_consumer_lag_messages per partition itself

    # --- durability -------------------------------------------------------------------------------------
    def checkpoint(self, final: bool = False) -> None:
        """Deltas out, state on disk (with offsets), then — and only then — the Kafka commit."""
        self.flush(everything=final)
        if self.user_state is not None:
            self.user_state.ensure_delivered(self.users)
        save_checkpoint(self.learner, self.ckpt_path, offsets=offsets_to_json(self.offsets),
                        extra={"recent_event_ids": self.stream.dedupe.recent(DEDUPE_IDS_KEPT),
                               "events_received": self.events_received,
                               "held_rows": self.publisher.held_rows})
        self.stream.commit(dict(self.offsets))
        self._last_ckpt = time.monotonic()
        self._dirty = False
        log.info("checkpoint: step %d, %d events, offsets %s", self.learner.step, self.learner.events_seen,
                 offsets_to_json(self.offsets))

    def close(self) -> None:
        try:
            self.checkpoint(final=True)
        finally:
            self.stream.close()
            self.producer.close()
            self.users.close()
            if self.probe is not None:
                self.probe.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (overrides settings)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0 = run forever)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-parallel learner ranks on this machine (default: learner.workers); > 1 starts "
                             "a group that learns one model (learner/group.py) and restarts it if a rank fails")
    parser.add_argument("--rank", type=int, default=None,
                        help="run as this rank of a group (set by the launcher, or RANK under torchrun)")
    parser.add_argument("--world", type=int, default=None, help="the group's size (or WORLD_SIZE under torchrun)")
    parser.add_argument("--init-method", default=None,
                        help="torch.distributed rendezvous, e.g. tcp://host:port (default under torchrun: env://)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.bootstrap:
        settings.kafka.bootstrap_servers = args.bootstrap
    if not settings.kafka.bootstrap_servers:
        log.error("no Kafka bootstrap servers: set MFLI_KAFKA__BOOTSTRAP_SERVERS or --bootstrap")
        return 2
    workers = args.workers or settings.learner.workers
    if settings.model.members > 1:  # an ensemble trains as a group of one rank per member (learner/members.py)
        if workers > 1 and workers != settings.model.members:
            log.error("learner.workers=%d with model.members=%d: a group is either data-parallel or an ensemble "
                      "(one rank per member)", workers, settings.model.members)
            return 2
        workers = settings.model.members
    rank = args.rank if args.rank is not None else _env_int("RANK")
    if rank is not None:  # one rank of a group: started by our launcher or by torchrun
        world = args.world or _env_int("WORLD_SIZE") or 1
        init = args.init_method or "env://"
        group.serve_rank_metrics(settings, rank, _env_int("LOCAL_RANK"))
        if not wait_for_broker(settings.kafka, "learner", lambda: False):
            return 0
        code = group.rank_main(settings, rank, world, init, args.max_seconds, _env_int("LOCAL_RANK"))
        exit_now(code)  # the rank's state is durable and the group left: skip the teardown that races gloo
    if workers > 1:
        stop = stop_on_signals()
        extra = ["--max-seconds", str(args.max_seconds)] if args.max_seconds else []
        if args.bootstrap:
            extra += ["--bootstrap", args.bootstrap]
        return group.launch(settings, workers, extra, stop.is_set)
    metrics.serve_metrics(settings.learner.metrics_port, process="learner")
    stop = stop_on_signals()
    metrics.UP.labels(process="learner").set(1)
    if not wait_for_broker(settings.kafka, "learner", stop.is_set):
        return 0
    proc = LearnerProcess(settings)
    metrics.READY.labels(process="learner").set(1)
    # An idle learner raises no KafkaError while its broker hangs (an empty poll is not an error, and with
    # everything checkpointed there is nothing to commit), and its loop may sit blocked in a call to the
    # hung broker, so readiness also follows a background probe that sets the gauge from its own thread
    # (found by tests/test_broker_outage.py once the learner got faster).
    failing = False  # the loop's own view: the last run_once raised a KafkaError

    def probe_changed(ok: bool) -> None:
        metrics.READY.labels(process="learner").set(1 if ok and not failing else 0)

    health = BrokerHealth(bootstrap_of(settings.kafka), on_change=probe_changed).start()
    started = time.monotonic()
    backoff = 0.0
    try:
        while not stop.is_set():
            try:
                proc.run_once()
            except KafkaError as exc:
                # The broker went away mid-run: stay up, not ready, and retry; nothing is lost because
                # offsets only move with a checkpoint and unacknowledged deltas were put back.
                backoff = min(max(0.5, backoff * 2), settings.kafka.reconnect_backoff_max_ms / 1000)
                log.warning("Kafka error (%s); retrying in %.1f s", exc, backoff)
                failing = True
                metrics.READY.labels(process="learner").set(0)
                time.sleep(backoff)
                continue
            if failing:
                failing, backoff = False, 0.0
                metrics.READY.labels(process="learner").set(1 if health.ok else 0)
            if args.max_seconds and time.monotonic() - started >= args.max_seconds:
                break
    finally:
        health.stop()
        proc.close()
        metrics.UP.labels(process="learner").set(0)
    return 0
