"""The learner publishes the user state the server reads to ``mfli.user-state`` (keyed by user), so
server replicas on other machines can keep their own copy of the users store.

What is sent: after each micro-batch is applied to the users LMDB, the *whole stored record* of every
user the batch touched (``{"i", "t", "e", "v"}``, :mod:`mfli.storage.users_lmdb`), as stored. A whole
record, not the events: the topic is log-compacted, so a user's newest record is their state and a new
replica bootstraps by reading the topic once. Header ``ts`` carries the batch's ingest time (ms) so a
replica can measure event-to-visible freshness.

Why nothing is lost to replicas: a record is sent for every user of every batch, replays included (a
replayed batch changes nothing in LMDB but is sent again), and the checkpoint that moves the learner's
offsets past a batch happens only after every record sent so far was acknowledged
(:meth:`UserStatePublisher.ensure_delivered`). A crash before that replays the batch from the previous
checkpoint, which sends those users again.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

from kafka.errors import KafkaError

from mfli import metrics
from mfli.config import Settings
from mfli.kafka.clients import ensure_topics
from mfli.storage.users_lmdb import USER_STATE_TOPIC_CONFIGS, UsersStore

log = logging.getLogger(__name__)

_I64 = struct.Struct("<q")


class UserStatePublisher:
    """Sends user records with the learner's producer; re-sends those whose send failed."""

    def __init__(self, settings: Settings, producer) -> None:
        k = settings.kafka
        self.topic = k.user_state_topic
        self.producer = producer
        self.timeout_s = k.request_timeout_ms / 1000
        self._futures: dict[str, object] = {}  # user -> newest send, until acknowledged
        self._unsent: set[str] = set()  # users whose send raised (broker gone): sent with the next publish
        ensure_topics(k.bootstrap_servers, k, [self.topic], configs=USER_STATE_TOPIC_CONFIGS)

    def publish(self, users: UsersStore, user_ids: Iterable[str], ingest_ms: int) -> int:
        """Send the stored records of ``user_ids`` (plus any whose earlier send failed)."""
        wanted = set(user_ids) | self._failed() | self._unsent
        if not wanted:
            return 0
        records = users.records(wanted)
        header = [("ts", _I64.pack(ingest_ms))]
        self._unsent = set(records)
        for user, raw in records.items():  # a send that raises leaves the rest in _unsent
            self._futures[user] = self.producer.send(self.topic, key=user.encode(), value=raw, headers=header)
            self._unsent.discard(user)
        metrics.USER_STATE_PUBLISHED.inc(len(records))
        if len(self._futures) > 100_000:
            self._forget_acknowledged()
        return len(records)

    def _failed(self) -> set[str]:
        return {u for u, f in self._futures.items() if f.is_done and f.failed()}

    def _forget_acknowledged(self) -> None:
        self._futures = {u: f for u, f in self._futures.items() if not (f.is_done and f.succeeded())}

    def ensure_delivered(self, users: UsersStore) -> None:
        """Block until every record sent so far is acknowledged, re-sending failed ones once; raise
        ``KafkaError`` if some still are not (the caller must not checkpoint past them)."""
        if self._unsent:
            self.publish(users, (), 0)
        self.producer.flush(timeout=self.timeout_s)
        failed = self._failed()
        if failed:
            log.warning("re-sending %d user records whose send failed", len(failed))
            self.publish(users, failed, 0)
            self.producer.flush(timeout=self.timeout_s)
            if self._failed():
                raise KafkaError(f"{len(self._failed())} user-state records not acknowledged")
        self._forget_acknowledged()
