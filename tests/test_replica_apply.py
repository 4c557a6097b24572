"""Index replication without the broker in the way: the writer's recorded commits, applied by a replica's
:class:`~mfli.server.replica.IndexCopy` (real LMDB on both sides), give the primary's exact index.

The records are captured from the publisher's producer (Kafka itself is exercised by
``test_replica_kafka.py``); here the log can be cut, compacted and replayed at will:

* in order: every commit the replica makes is the primary's state at that version, byte for byte;
* after Kafka-style log compaction (a cleaned prefix keeps only each key's newest record and at most one
  commit marker): the replica still only ever commits primary states, and ends at the primary's;
* a crash between the LMDB commit and the Kafka send: the outbox republishes what was lost;
* values larger than the message limit travel in parts.
"""

from __future__ import annotations

import numpy as np
import pytest
from kafka.future import Future

from mfli.config import load_settings
from mfli.deltas import CodebookSnapshot
from mfli.indexer.publish_changes import attach
from mfli.retrieval.query_model import QueryModel
from mfli.storage.index import changes as W
from mfli.storage.index import layout as L
from mfli.storage.index.compare import compare_indexes
from mfli.storage.index.copy import IndexCopy
from mfli.storage.index.writer import IndexWriter

from test_index_writer import SETTINGS, _batch, _catalogue


class CapturingProducer:
    """Kafka's producer interface, keeping the records in a list (the log) instead of sending them."""

    def __init__(self) -> None:
        self.log: list[tuple[bytes, bytes | None, list]] = []
        self.drop = False

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        if self.drop:
            return Future()  # never acknowledged: the process dies before Kafka has it
        self.log.append((key, value, headers))
        return Future().success(None)

    def flush(self, timeout=None) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


def _settings(tmp_path, max_value: int = 524_288):
    return load_settings(index=SETTINGS.model_dump() | {"path": str(tmp_path / "primary")},
                         replication={"max_value_bytes": max_value, "data_dir": str(tmp_path / "replica")})


def _dump(env, dbs) -> dict:
    with env.begin() as txn:
        return {name: {bytes(k): bytes(v) for k, v in txn.cursor(db=dbs[name])} for name in L.DB_NAMES}


def _drain(publisher) -> None:
    import time

    deadline = time.monotonic() + 60  # a loaded shared machine
    while not publisher.idle():
        assert time.monotonic() < deadline, "publisher did not drain"
        time.sleep(0.005)


def _keep_states(writer, publisher, states: dict) -> None:
    """Record the primary's state right after every commit (version -> dump): the publisher is handed
    each commit in the writer's thread just after LMDB committed it."""
    enqueue = writer.env.on_commit

    def spy(version, msgs):
        states[version] = _dump(writer.env.real, writer.db)
        enqueue(version, msgs)

    writer.env.on_commit = spy


def _workload(writer, publisher, states: dict) -> None:
    """Deltas, a codebook, a query encoder, full passes, moves and deletes."""
    _keep_states(writer, publisher, states)
    cb, v, codes, prior = _catalogue(900, seed=3)

    def commit(fn) -> None:
        fn()
        _drain(publisher)

    commit(lambda: writer.apply(_batch(range(300), v, codes, prior), {"t:0": 1}, [CodebookSnapshot(1, cb)]))
    commit(lambda: writer.apply(_batch(range(300, 600), v, codes, prior), {"t:0": 2}))
    commit(lambda: writer.apply(None, {"t:0": 3}, models=[QueryModel.random(3, 16, 8)]))
    v2 = v.copy()
    v2[:100] = v[500:600]
    commit(lambda: writer.apply(_batch(range(100), v2, codes[list(range(500, 600)) + list(range(100, 900))],
                                       prior, version=2), {"t:0": 4}))
    commit(lambda: writer.apply(_batch([5, 6, 7], v, codes, prior, version=3, deleted=np.ones(3, bool)),
                                {"t:0": 5}))
    commit(lambda: writer.full_pass())
    commit(lambda: writer.apply(_batch(range(600, 900), v, codes, prior, version=4), {"t:0": 6}))
    commit(lambda: writer.full_pass())


def _replay(copy: IndexCopy, log, states: dict, primary_dbs=None) -> list[int]:
    """Feed the log to ``copy`` like the applier does with one poll; returns the versions it committed,
    each checked against the primary's state at that version."""
    committed = []
    for offset, (key, value, headers) in enumerate(log):
        if copy.feed(offset, key, value, headers, 0, at_end=offset == len(log) - 1):
            copy.commit(offset + 1, 0, observe=False)
            committed.append(copy.version)
            assert _dump(copy.env, copy.db) == states[copy.version], f"replica at {copy.version} is not the primary's"
    return committed


def test_the_publisher_is_not_idle_while_it_holds_a_commit_it_has_not_sent(tmp_path):
    """``idle()`` must stay false from the moment a commit is enqueued until its records are in flight,
    including while the sending thread holds it between the queue and the producer (an empty queue alone
    had made it true there: the fixture above then read a log missing the last commit under load)."""
    import threading

    class SlowProducer(CapturingProducer):
        def __init__(self) -> None:
            super().__init__()
            self.inside, self.release = threading.Event(), threading.Event()

        def send(self, topic, key=None, value=None, headers=None, partition=None):
            self.inside.set()
            assert self.release.wait(30)
            return super().send(topic, key, value, headers, partition)

    settings = _settings(tmp_path)
    writer = IndexWriter(tmp_path / "primary", settings.index)
    producer = SlowProducer()
    publisher = attach(writer, settings, producer=producer)
    assert publisher.idle()
    publisher.enqueue(1, [W.Message(b"k", b"v")])  # one commit: the queue is empty once the thread takes it
    assert producer.inside.wait(30), "the publisher never started sending"
    assert not publisher.idle(), "idle while a commit was still being handed to the producer"
    producer.release.set()
    _drain(publisher)
    assert producer.log == [(b"k", b"v", [])]
    writer.close()


@pytest.fixture
def primary(tmp_path):
    settings = _settings(tmp_path)
    writer = IndexWriter(tmp_path / "primary", settings.index)
    producer = CapturingProducer()
    publisher = attach(writer, settings, producer=producer)
    states: dict = {}
    _workload(writer, publisher, states)
    yield settings, writer, publisher, producer, states
    writer.close()


def test_replica_commits_exactly_the_primary_states_in_order(primary, tmp_path):
    settings, writer, publisher, producer, states = primary
    copy = IndexCopy(tmp_path / "replica", settings)
    committed = _replay(copy, producer.log, states)
    assert committed == sorted(states), "one replica commit per primary commit, in order"
    kinds = [W.Marker.decode(v).kind for k, v, _ in producer.log if k == W.MARKER_KEY]
    assert kinds.count("full_pass") == 3 and "delta" in kinds and "meta" in kinds
    copy.close()
    report = compare_indexes(writer.reader(), tmp_path / "replica", SETTINGS.map_size, wait_s=1)
    assert report.ok and report.entries["rec"] == 900, report.to_dict()
    # replaying the same log again (a replica that restarted before its offset moved) changes nothing
    copy = IndexCopy(tmp_path / "replica", settings)
    assert copy.offset == len(producer.log) and _replay(copy, producer.log, states) == []
    copy.close()
    # commits it already has, published again after them (an outbox republish): skipped, and the offset
    # moves past them without a transaction left open (else its lag would never reach 0)
    copy = IndexCopy(tmp_path / "again", settings)
    assert _replay(copy, producer.log + producer.log, states) == sorted(states)
    assert copy.offset == 2 * len(producer.log) and copy._txn is None
    copy.close()


def _compact(log, clean_to: int) -> list:
    """Kafka log compaction of records [0, clean_to): keep each key's newest record there (a tombstone
    too, as within delete.retention.ms) unless a later record anywhere in the cleaned range has the key;
    records from ``clean_to`` on are untouched."""
    last = {}
    for i, (key, _, _) in enumerate(log[:clean_to]):
        last[key] = i
    return [rec for i, rec in enumerate(log) if i >= clean_to or last[rec[0]] == i]


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95, 1.0])
def test_replica_bootstraps_from_a_compacted_log_and_never_commits_a_torn_state(primary, tmp_path, fraction):
    settings, writer, publisher, producer, states = primary
    log = _compact(producer.log, int(len(producer.log) * fraction))
    assert len(log) < len(producer.log)
    copy = IndexCopy(tmp_path / f"replica-{fraction}", settings)
    committed = _replay(copy, log, states)  # asserts every commit is a primary state
    assert committed and committed[-1] == max(states)
    copy.close()
    assert compare_indexes(writer.reader(), tmp_path / f"replica-{fraction}", SETTINGS.map_size, wait_s=1).ok


def test_a_replica_resumes_from_its_offset_in_a_log_compacted_meanwhile(primary, tmp_path):
    settings, writer, publisher, producer, states = primary
    half = len(producer.log) // 2
    copy = IndexCopy(tmp_path / "replica", settings)
    _replay(copy, producer.log[:half], states)
    resume = copy.offset
    copy.close()
    # offsets stay the same under compaction: keep (offset, record) pairs, drop the removed ones
    log = list(enumerate(producer.log))
    kept = {i for i, _ in [(i, r) for i, r in log]}
    cleaned = set(i for i, _ in log[:int(len(log) * 0.9)])
    last = {}
    for i, (key, _, _) in log[:int(len(log) * 0.9)]:
        last[key] = i
    kept = [i for i in kept if i not in cleaned or last[producer.log[i][0]] == i]
    copy = IndexCopy(tmp_path / "replica", settings)
    for i in sorted(kept):
        if i < resume:
            continue
        key, value, headers = producer.log[i]
        if copy.feed(i, key, value, headers, 0):
            copy.commit(i + 1, 0, observe=False)
            assert _dump(copy.env, copy.db) == states[copy.version]
    assert copy.version == max(states)
    copy.close()


def test_outbox_republishes_what_a_crash_kept_from_kafka(tmp_path):
    settings = _settings(tmp_path)
    writer = IndexWriter(tmp_path / "primary", settings.index)
    producer = CapturingProducer()
    publisher = attach(writer, settings, producer=producer)
    states: dict = {}
    cb, v, codes, prior = _catalogue(400, seed=4)
    writer.apply(_batch(range(200), v, codes, prior), {"t:0": 1}, [CodebookSnapshot(1, cb)])
    _drain(publisher)
    writer.apply(_batch(range(200, 300), v, codes, prior), {"t:0": 2})  # prunes the acknowledged entries
    _drain(publisher)
    producer.drop = True  # the next commits reach LMDB but never Kafka: the process "dies" before the send
    writer.apply(_batch(range(300, 400), v, codes, prior), {"t:0": 3})
    writer.apply(_batch(range(50), v, codes, prior, version=2, deleted=np.ones(50, bool)), {"t:0": 4})
    assert len(publisher.outbox.pending_versions()) >= 2
    final = _dump(writer.env.real, writer.db)
    writer.env.real.close()  # the crash: no clean shutdown of the publisher
    # restart: the outbox is republished as one recovery commit up to the current version
    writer = IndexWriter(tmp_path / "primary", settings.index)
    producer.drop = False
    publisher = attach(writer, settings, producer=producer)
    _drain(publisher)
    markers = [W.Marker.decode(v) for k, v, _ in producer.log if k == W.MARKER_KEY]
    assert markers[-1].kind == "recovery" and markers[-1].version == writer.index_version
    states[writer.index_version] = final
    copy = IndexCopy(tmp_path / "replica", settings)
    for offset, (key, value, headers) in enumerate(producer.log):
        if copy.feed(offset, key, value, headers, 0):
            copy.commit(offset + 1, 0, observe=False)
    assert copy.version == writer.index_version and _dump(copy.env, copy.db) == final
    copy.close()
    writer.apply(_batch(range(10), v, codes, prior, version=3), {"t:0": 5})  # acknowledged: outbox pruned
    _drain(publisher)
    writer.apply(None, {"t:0": 6})
    assert publisher.outbox.pending_versions() == [writer.index_version]
    writer.close()


def test_large_values_travel_in_parts(tmp_path):
    settings = _settings(tmp_path, max_value=1024)  # codebooks, centroids and the encoder exceed it
    writer = IndexWriter(tmp_path / "primary", settings.index)
    producer = CapturingProducer()
    publisher = attach(writer, settings, producer=producer)
    states: dict = {}
    _workload(writer, publisher, states)
    parts = [k for k, _, _ in producer.log if k.startswith(W.PART_PREFIX)]
    assert parts and any(W.header(h, W.PARTS_HEADER) for _, _, h in producer.log)
    copy = IndexCopy(tmp_path / "replica", settings)
    assert _replay(copy, producer.log, states)[-1] == max(states)
    copy.close()
    log = _compact(producer.log, int(len(producer.log) * 0.8))
    copy = IndexCopy(tmp_path / "replica-compacted", settings)
    assert _replay(copy, log, states)[-1] == max(states)
    copy.close()
    writer.close()


def test_bad_records_are_skipped_with_an_error_and_lose_nothing(primary, tmp_path):
    settings, writer, publisher, producer, states = primary
    log = list(producer.log)
    log.insert(3, (b"garbage/key", b"x", [("v", L.pack_i64(10**9))]))
    log.insert(5, (W.MARKER_KEY, b"{not json", []))
    copy = IndexCopy(tmp_path / "replica", settings)
    committed = _replay(copy, log, states)
    assert copy.bad == 2 and committed[-1] == max(states)
    copy.close()
