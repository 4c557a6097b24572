"""Replication through a real Kafka-protocol broker: the index writer publishes, a replica applier
(the real loop, in a thread) consumes into its own LMDB copies; the copies equal the primary's.

Also: the applier's status reports not ready until it has caught up, resumes from its stored offsets
after a restart, rebuilds when the topic is shorter than its position, and the learner-side user-state
publisher's records land byte for byte in the replica's users store.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mfli.deltas import CodebookSnapshot
from mfli.events import InteractionEvent
from mfli.indexer.publish_changes import attach
from mfli.learner.publish_users import UserStatePublisher
from mfli.server.replica import ReplicaApplier, read_status
from mfli.storage.index.compare import compare_indexes
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.writer import IndexWriter
from mfli.storage.users_lmdb import UsersStore

from test_index_writer import SETTINGS, _batch, _catalogue


@pytest.fixture
def settings(kafka_settings, unique_name, tmp_path):
    s = kafka_settings.model_copy(deep=True)
    s.kafka.index_changes_topic = unique_name("index-changes")
    s.kafka.user_state_topic = unique_name("user-state")
    s.index = SETTINGS.model_copy(update={"path": tmp_path / "primary"})
    s.learner.users_path = tmp_path / "users"
    s.replication.data_dir = tmp_path / "replica"
    s.replication.metrics_port = 0
    s.replication.status_interval_s = 0.05
    return s


class Applier:
    """The real applier loop in a thread (the process version is exercised by the end-to-end test)."""

    def __init__(self, settings) -> None:
        self.applier = ReplicaApplier(settings)
        self.thread = threading.Thread(target=self.applier.run, daemon=True)

    def __enter__(self) -> Applier:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.applier.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _wait(predicate, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _status(settings) -> dict:
    return read_status(settings) or {}


def test_replica_follows_the_writer_and_the_users_store_over_kafka(settings):
    writer = IndexWriter(settings.index.path, settings.index)
    publisher = attach(writer, settings)
    cb, v, codes, prior = _catalogue(800, seed=9)
    writer.apply(_batch(range(400), v, codes, prior), {"t:0": 1}, [CodebookSnapshot(1, cb)])
    users = UsersStore(settings.learner.users_path, history=5, keep=15)  # records longer than their event ids
    from mfli.kafka.clients import make_producer

    producer = make_producer(settings.kafka)
    user_state = UserStatePublisher(settings, producer)
    events = [InteractionEvent(event_id=f"e{i}", user_id=f"u{i % 30}", item_id=f"i{i % 400}", event_type="view",
                               ts=1_000 + i) for i in range(600)]
    users.apply(events[:300])
    user_state.publish(users, {e.user_id for e in events[:300]}, int(time.time() * 1000))
    try:
        with Applier(settings) as ap:
            _wait(lambda: _status(settings).get("index_version") == writer.index_version, what="first catch-up")
            _wait(lambda: _status(settings).get("ready") is True, what="ready")
            # more commits while it runs: deltas, deletes, a full pass (one atomic commit on the replica)
            writer.apply(_batch(range(400, 800), v, codes, prior), {"t:0": 2})
            writer.apply(_batch(range(20), v, codes, prior, version=2, deleted=np.ones(20, bool)), {"t:0": 3})
            writer.full_pass()
            users.apply(events[300:])
            user_state.publish(users, {e.user_id for e in events[300:]}, int(time.time() * 1000))
            user_state.ensure_delivered(users)
            _wait(lambda: _status(settings).get("index_version") == writer.index_version, what="catch-up")
            report = compare_indexes(writer.reader(), _copy(ap), wait_s=5)
            assert report.ok and report.entries["rec"] == 800, report.to_dict()
            _wait(lambda: _users_equal(users, ap.applier.users.store), what="users store copy")
        status = _status(settings)
        assert status == {} or status["index_version"] == writer.index_version
        # restart: resumes from the stored offset (no rebuild), applies what came meanwhile
        replica = UsersStore(settings.replication.data_dir / "users.lmdb", readonly=True)
        assert sum(replica.offsets().values()) > 0
        replica.close()
        writer.apply(_batch(range(100, 200), v, codes, prior, version=3), {"t:0": 4})
        with Applier(settings) as again:
            _wait(lambda: _status(settings).get("index_version") == writer.index_version, what="resume")
            assert again.applier.index.tracker.markers_read <= 3, "resumed from its offset, not the start"
            assert compare_indexes(writer.reader(), _copy(again), wait_s=5).ok
    finally:
        publisher.close()
        writer.close()
        users.close()


def _copy(ap: Applier) -> LmdbIndex:
    """The replica's index through the applier's environment (py-lmdb opens one once per process)."""
    return LmdbIndex(ap.applier.index.path, env=ap.applier.index.env)


def _users_equal(users: UsersStore, replica: UsersStore) -> bool:
    ids = users.user_ids(10_000)
    return replica.user_ids(10_000) == ids and replica.records(ids) == users.records(ids)


def test_status_is_not_ready_while_a_new_replica_replays_old_changes(settings):
    """A replica started long after the changes were written reports not ready until it applied them
    (the lag is the age of the oldest unapplied record, here older than max_lag_s)."""
    settings.replication.max_lag_s = 0.5
    writer = IndexWriter(settings.index.path, settings.index)
    publisher = attach(writer, settings)
    cb, v, codes, prior = _catalogue(300, seed=2)
    for start in range(0, 300, 30):
        writer.apply(_batch(range(start, start + 30), v, codes, prior), {"t:0": start + 1},
                     [CodebookSnapshot(1, cb)] if start == 0 else None)
    try:
        _wait(publisher.idle, what="publish")
        time.sleep(1.0)  # every record is now older than max_lag_s
        seen = []
        with Applier(settings):
            _wait(lambda: (seen.append(_status(settings)) or True) and
                  _status(settings).get("ready") is True, what="ready")
        first = [s for s in seen if s][0]
        assert first["ready"] is False
        assert seen[-1]["index_version"] == writer.index_version
    finally:
        publisher.close()
        writer.close()
