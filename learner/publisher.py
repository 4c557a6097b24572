"""What the learner tells the indexer, and when: the publishing policy, in one object.

Every flush, :class:`Publisher` drains the learner's changed rows and sends to ``mfli.item-updates``
(one partition, so the single indexer sees publication order):

* a codebook snapshot whenever the codebooks changed, *before* the deltas coded with it;
* the query encoder's weights every ``learner.model_publish_interval_s`` while the model learns (the
  server computes request queries with them);
* the item deltas, all stamped with one version from a clock that only moves forward across restarts
  (wall-clock microseconds, bumped past the last one sent), so the indexer accepts post-restart states
  and ignores a replayed message.

Not every changed row is worth a message. A row is sent when it is new, deleted, re-prioritised
(``publish_min_prior_change``) or moved by more than ``publish_min_drift`` since it was last sent;
the others are *held* and trickle out :data:`HELD_PER_FLUSH` per flush, so the index converges to the
model without bursts that would delay fresh events behind them (a clean shutdown sends them all).
Held rows are state: the checkpoint stores them (:attr:`Publisher.held_rows`), because the
checkpoint's vectors are newer than the index's for exactly those rows.

Decayed popularity shrinks for every item while only rows touched by events change, so every two
seconds the priors of today's top items, and of yesterday's top that fell out, are republished too
(with ``event_ts`` -1: no event caused them, and freshness must not count them).

The publisher talks to the learner only through its public API (``drain_changed``, ``mark_changed``,
``requeue``, snapshots); what was published, held and versioned is the publisher's own state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaError

from mfli import metrics
from mfli.config import Settings
from mfli.deltas import CodebookSnapshot, ItemDelta, encode_codebook, encode_deltas, encode_model
from mfli.learner.learner import MFLILearner

DELTAS_PER_MESSAGE = 256  # ~200 KB per message at F=3, d=64: well under Kafka's 1 MB default
TRENDING_REFRESH = 500  # top items whose prior is republished so the index's trending source stays current
TRENDING_EVERY_S = 2.0
HELD_PER_FLUSH = 256  # held (slightly drifted) rows republished per flush


class Publisher:
    """Publishes a learner's changes to the item-updates topic; see the module docstring."""

    def __init__(self, settings: Settings, learner: MFLILearner, producer: KafkaProducer,
                 held: Iterable[int] = ()) -> None:
        """``held``: rows a previous run held back and had not published yet (from its checkpoint)."""
        self.settings = settings
        self.learner = learner
        self.producer = producer
        self.topic = settings.kafka.item_updates_topic
        self._clock = 0
        self._codebook_version = -1
        self._model_step, self._model_sent_at = -1, float("-inf")
        self._window_start: float | None = None  # ingest time of the oldest unpublished batch
        self._last_trending = time.monotonic()
        self._published_top = np.empty(0, np.int64)
        # Last published state per row; rows that drifted less wait in _held and trickle out per flush.
        model = learner.settings  # a restored learner's shape comes from its checkpoint
        self._pub_vec = np.zeros((0, model.facets, model.dim), np.float32)
        self._pub_prior = np.zeros(0, np.float32)
        self._pub_seen = np.zeros(0, bool)
        # Held rows are state too: the checkpoint holds their new vectors while the index still has the
        # old ones, so they must still be published after a restart (else the index keeps a stale
        # vector until the item changes again; found by ``mfli chaos``).
        self._held: set[int] = set(held)
        self.model_due = False  # decided by prepare(): the query encoder goes out with this flush

    @property
    def held_rows(self) -> list[int]:
        """Rows changed in the model but not published yet (what a checkpoint must remember)."""
        return sorted(self._held)

    def ingested(self, now: float) -> None:
        """A batch was polled at ``now`` (wall clock): freshness of the next deltas counts from the oldest."""
        self._window_start = self._window_start or now

    def flush(self, everything: bool = False) -> int:
        """Publish changed item rows (and new codebooks, and the encoder when due) and wait until Kafka
        acknowledged them; returns the deltas sent. ``everything`` (a clean shutdown) sends held rows too.

        On a Kafka error nothing is lost: the rows go back to the learner (:meth:`MFLILearner.requeue`),
        the codebook and the encoder are marked unsent, and the error propagates."""
        return self.send(self.prepare(everything), everything)

    def prepare(self, everything: bool = False) -> list[int]:
        """The first half of :meth:`flush`: mark the rows this flush will drain (trending priors, held rows
        due) and decide whether the query encoder goes out; returns the forced (held) rows. An ensemble
        group gathers its members' state for exactly these rows between the halves (learner/members.py)."""
        self._mark_trending()
        forced = [self._held.pop() for _ in range(len(self._held) if everything else
                                                  min(HELD_PER_FLUSH, len(self._held)))]
        self.learner.mark_changed(forced)
        self.model_due = self.learner.step != self._model_step and \
            time.monotonic() - self._model_sent_at >= self.settings.learner.model_publish_interval_s
        return forced

    def send(self, forced: list[int], everything: bool = False) -> int:
        """The second half of :meth:`flush`: drain, filter and publish."""
        deltas = self._significant(self.learner.drain_changed(), everything, np.asarray(forced, np.int64))
        try:
            sent = self._publish(deltas)
        except KafkaError:
            # Not acknowledged: put the rows back so the next flush publishes their newest state.
            self.learner.requeue(deltas)
            self._codebook_version = -1  # resend the codebook too
            self._model_step, self._model_sent_at = -1, float("-inf")  # and the query encoder
            raise
        self._window_start = None
        self._remember(deltas)
        metrics.ITEM_UPDATES_PUBLISHED.inc(sent)
        return sent

    # --- policy ---------------------------------------------------------------------------------------
    def _next_version(self) -> int:
        self._clock = max(self._clock + 1, time.time_ns() // 1000)
        return self._clock

    def _significant(self, deltas: list[ItemDelta], everything: bool, forced: np.ndarray) -> list[ItemDelta]:
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
        return [d for d, k in zip(deltas, keep.tolist(), strict=True) if k]

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

    def _remember(self, deltas: list[ItemDelta]) -> None:
        for d in deltas:
            self._pub_vec[d.row] = d.vectors
            self._pub_prior[d.row] = d.prior
            self._pub_seen[d.row] = not d.deleted

    def _publish(self, deltas: list[ItemDelta]) -> int:
        sent = 0
        snapshot = self.learner.codebook_snapshot()
        if snapshot.version != self._codebook_version:
            # A codebook snapshot goes before the deltas coded with it.
            version = self._next_version()
            self.producer.send(self.topic, encode_codebook(CodebookSnapshot(version, snapshot.codebooks)),
                               partition=0)
            self._codebook_version = snapshot.version
        if self.model_due:
            # the query encoder, versioned like everything else on this topic; the server answers with it
            model = self.learner.query_model()
            self.producer.send(self.topic, encode_model(replace(model, version=self._next_version())), partition=0)
            self._model_step, self._model_sent_at = self.learner.step, time.monotonic()
            self.model_due = False
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
        """Republish the priors of today's top items and of yesterday's top that fell out (see the
        module docstring); at most every :data:`TRENDING_EVERY_S`."""
        if time.monotonic() - self._last_trending < TRENDING_EVERY_S:
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
        self.learner.mark_changed(rows.tolist())
