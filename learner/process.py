"""``mfli learn``: the learner process (DESIGN §1).

Loop: validated micro-batch from Kafka → catalogue changes and one learning step → the batch's events
into the users store (one LMDB transaction, with the offsets) → every ``flush_interval_ms`` the changed
item rows (and a codebook snapshot when it changed) to ``mfli.item-updates`` → every
``checkpoint_interval_s`` an atomic checkpoint with the offsets it reflects, and only then a Kafka
commit of those offsets.

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
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from kafka import TopicPartition

from mfli import metrics
from mfli.config import Settings
from kafka.errors import KafkaError

from mfli.kafka.clients import make_producer, wait_for_broker
from mfli.kafka.offsets import offsets_from_json, offsets_to_json
from mfli.lifecycle import stop_on_signals
from mfli.consumers.stream import Batch, EventStream
from mfli.deltas import CodebookSnapshot, encode_codebook, encode_deltas, encode_model
from mfli.learner.checkpoint import read_checkpoint, save_checkpoint
from mfli.learner.learner import MFLILearner
from mfli.storage.users_lmdb import UsersStore

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "learner.ckpt"
DELTAS_PER_MESSAGE = 256  # ~200 KB per message at F=3, d=64: well under Kafka's 1 MB default
DEDUPE_IDS_KEPT = 100_000  # newest event ids checkpointed: duplicates arrive close to their original
TRENDING_REFRESH = 500
HELD_PER_FLUSH = 256  # held (slightly drifted) rows republished per flush  # top items whose prior is republished so the index's trending source stays current


class LearnerProcess:
    """The learner's main loop; ``run_once`` is one poll → learn → (flush) → (checkpoint) round."""

    def __init__(self, settings: Settings) -> None:
        if settings.model.encoder_input != "shared":
            raise ValueError("model.encoder_input='separate' is an evaluation ablation: the server runs the "
                             "encoder on the indexed vectors, so the learner process only trains 'shared'")
        self.settings = settings
        ls = settings.learner
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
        self.users = UsersStore(ls.users_path, history=settings.model.history)
        self.stream = EventStream(settings, group_id=settings.kafka.learner_group)
        # The de-duplication window is part of the state: without it, a duplicate whose original sits
        # before the checkpoint and whose copy sits after it would be learned twice after a restart.
        self.stream.dedupe.admit_many(recent_ids)
        self.stream.seek_to(self.offsets)
        self.producer = make_producer(settings.kafka)
        self.topic = settings.kafka.item_updates_topic
        self._clock = 0
        self._codebook_version = -1
        self._model_step, self._model_sent_at = -1, float("-inf")
        self._window_start: float | None = None  # ingest time of the oldest unpublished batch
        self._last_flush = self._last_ckpt = self._last_trending = time.monotonic()
        self._published_top = np.empty(0, np.int64)
        self._dirty = False
        # Last published state per row; rows that drifted less wait in _held and trickle out per flush.
        self._pub_vec = np.zeros((0, settings.model.facets, settings.model.dim), np.float32)
        self._pub_prior = np.zeros(0, np.float32)
        self._pub_seen = np.zeros(0, bool)
        # Held rows are state too: the checkpoint holds their new vectors while the index still has the
        # old ones, so they must still be published after a restart (else the index keeps a stale
        # vector until the item changes again; found by ``mfli chaos``).
        self._held: set[int] = set(held)

    # --- one round ------------------------------------------------------------------------------------
    def run_once(self) -> Batch:
        batch = self.stream.poll_batch()
        now = time.time()
        if len(batch):
            self._window_start = self._window_start or now
            t0 = time.perf_counter()
            if batch.items:
                self.learner.upsert_items(batch.items)
            if batch.events:
                self.events_received += len(batch.events)
                # the stepper exports events, step phases and losses itself (Stepper._export)
                self.learner.learn(batch.events)
            self.users.apply(batch.events, offsets=offsets_to_json(batch.offsets))
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
    def _next_version(self) -> int:
        self._clock = max(self._clock + 1, time.time_ns() // 1000)
        return self._clock

    def flush(self, everything: bool = False) -> int:
        """Publish changed item rows (and new codebooks) and wait until Kafka acknowledged them.

        Rows that only drifted a little are held back (see ``publish_min_drift``) and trickle out a few
        hundred per flush, so the index converges to the model without bursts that would delay fresh
        events behind them; ``everything`` (a clean shutdown) publishes all of them at once."""
        self._last_flush = time.monotonic()
        self._mark_trending()
        forced = [self._held.pop() for _ in range(len(self._held) if everything else
                                                  min(HELD_PER_FLUSH, len(self._held)))]
        for row in forced:
            self.learner.changed.setdefault(row, -1)
        deltas = self._significant(self.learner.drain_changed(), everything, np.asarray(forced, np.int64))
        try:
            sent = self._publish(deltas)
        except KafkaError:
            # Not acknowledged: put the rows back so the next flush publishes their newest state.
            for d in deltas:
                if d.deleted:
                    self.learner.deleted.add(d.row)
                else:
                    self.learner.changed[d.row] = max(self.learner.changed.get(d.row, -1), d.event_ts or -1)
            self._codebook_version = -1  # resend the codebook too
            self._model_step, self._model_sent_at = -1, float("-inf")  # and the query encoder
            raise
        self._window_start = None
        self._remember(deltas)
        metrics.ITEM_UPDATES_PUBLISHED.inc(sent)
        self._export_gauges()
        return sent

    def _significant(self, deltas: list, everything: bool, forced: np.ndarray) -> list:
        """New, deleted, re-prioritised, clearly moved or ``forced`` rows; the rest go to ``_held``."""
        if not deltas:
            return deltas
        rows = np.fromiter((d.row for d in deltas), np.int64, len(deltas))
        self._grow(int(rows.max()) + 1)
        if everything:
            return deltas
        ls = self.settings.learner
        vec = np.stack([d.vectors for d in deltas])
        moved = np.linalg.norm(vec - self._pub_vec[rows], axis=2).max(axis=1) > ls.publish_min_drift
        prior = np.fromiter((d.prior for d in deltas), np.float32, len(deltas))
        reprioritised = np.abs(prior - self._pub_prior[rows]) > ls.publish_min_prior_change
        deleted = np.fromiter((d.deleted for d in deltas), bool, len(deltas))
        keep = ~self._pub_seen[rows] | moved | reprioritised | deleted | np.isin(rows, forced)
        self._held.update(rows[~keep].tolist())
        self._held.difference_update(rows[keep].tolist())
        return [d for d, k in zip(deltas, keep.tolist()) if k]

    def _grow(self, need: int) -> None:
        if need <= self._pub_seen.size:
            return
        cap = max(need, 2 * self._pub_seen.size)
        vec = np.zeros((cap,) + self._pub_vec.shape[1:], np.float32)
        vec[: self._pub_vec.shape[0]] = self._pub_vec
        prior = np.zeros(cap, np.float32)
        prior[: self._pub_prior.size] = self._pub_prior
        seen = np.zeros(cap, bool)
        seen[: self._pub_seen.size] = self._pub_seen
        self._pub_vec, self._pub_prior, self._pub_seen = vec, prior, seen

    def _remember(self, deltas: list) -> None:
        for d in deltas:
            self._pub_vec[d.row] = d.vectors
            self._pub_prior[d.row] = d.prior
            self._pub_seen[d.row] = not d.deleted

    def _publish(self, deltas: list) -> int:
        sent = 0
        snapshot = self.learner.codebook_snapshot()
        if snapshot.version != self._codebook_version:
            # A codebook snapshot goes before the deltas coded with it.
            version = self._next_version()
            self.producer.send(self.topic, encode_codebook(CodebookSnapshot(version, snapshot.codebooks)),
                               partition=0)
            self._codebook_version = snapshot.version
        now = time.monotonic()
        if self.learner.step != self._model_step and \
                now - self._model_sent_at >= self.settings.learner.model_publish_interval_s:
            # the query encoder, versioned like everything else on this topic; the server answers with it
            model = self.learner.query_model()
            self.producer.send(self.topic, encode_model(replace(model, version=self._next_version())), partition=0)
            self._model_step, self._model_sent_at = self.learner.step, now
        if deltas:
            version = self._next_version()
            ingest_ms = int((self._window_start or time.time()) * 1000)
            for d in deltas:
                d.version = version
                # Prior refreshes (marked -1) were caused by no event: 0 keeps them out of freshness.
                d.event_ts = 0 if d.event_ts < 0 else ingest_ms
            for i in range(0, len(deltas), DELTAS_PER_MESSAGE):
                # One partition keeps the indexer's view in publication order (it is the single writer).
                self.producer.send(self.topic, encode_deltas(deltas[i : i + DELTAS_PER_MESSAGE]), partition=0)
            sent = len(deltas)
        self.producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000)
        return sent

    def _mark_trending(self) -> None:
        """Republish the priors of today's top items and of yesterday's top that fell out.

        Decayed counts shrink for every item, but only rows touched by events are published; without
        this the index would keep yesterday's trending items at their old prior forever.
        Refresh deltas carry ``event_ts = -1`` so they do not count as event freshness.
        """
        if time.monotonic() - self._last_trending < 2.0:
            return
        self._last_trending = time.monotonic()
        prior = self.learner.prior()
        live = self.learner.items.live[: prior.size]
        prior = np.where(live, prior, -np.inf)
        k = min(TRENDING_REFRESH, int(live.sum()))
        if k == 0:
            return
        top = np.argpartition(-prior, k - 1)[:k].astype(np.int64)
        rows = np.union1d(top, self._published_top[self._published_top < prior.size])
        rows = rows[live[rows]]
        self._published_top = top
        for r in rows.tolist():
            self.learner.changed.setdefault(r, -1)

    def _export_gauges(self) -> None:
        metrics.LEARNER_ITEMS.set(len(self.learner.items))
        metrics.LEARNER_USERS.set(len(self.learner.users))
        self.stream.lag()  # exports mfli_consumer_lag_messages per partition itself

    # --- durability -------------------------------------------------------------------------------------
    def checkpoint(self, final: bool = False) -> None:
        """Deltas out, state on disk (with offsets), then — and only then — the Kafka commit."""
        self.flush(everything=final)
        save_checkpoint(self.learner, self.ckpt_path, offsets=offsets_to_json(self.offsets),
                        extra={"recent_event_ids": self.stream.dedupe.recent(DEDUPE_IDS_KEPT),
                               "events_received": self.events_received, "held_rows": sorted(self._held)})
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (overrides settings)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0 = run forever)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.bootstrap:
        settings.kafka.bootstrap_servers = args.bootstrap
    if not settings.kafka.bootstrap_servers:
        log.error("no Kafka bootstrap servers: set MFLI_KAFKA__BOOTSTRAP_SERVERS or --bootstrap")
        return 2
    metrics.serve_metrics(settings.learner.metrics_port, process="learner")
    stop = stop_on_signals()
    metrics.UP.labels(process="learner").set(1)
    if not wait_for_broker(settings.kafka, "learner", stop.is_set):
        return 0
    proc = LearnerProcess(settings)
    metrics.READY.labels(process="learner").set(1)
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
                metrics.READY.labels(process="learner").set(0)
                time.sleep(backoff)
                continue
            if backoff:
                backoff = 0.0
                metrics.READY.labels(process="learner").set(1)
            if args.max_seconds and time.monotonic() - started >= args.max_seconds:
                break
    finally:
        proc.close()
        metrics.UP.labels(process="learner").set(0)
    return 0
