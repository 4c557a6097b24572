"""The learner's publishing policy (learner/publisher.py) over a real broker, and the learner API it uses
(``drain_changed``, ``mark_changed``, ``requeue``) instead of reaching into the learner's state."""

from __future__ import annotations

import numpy as np
import pytest
from kafka.errors import KafkaError

from mfli.config import ModelSettings
from mfli.deltas import CodebookSnapshot, DeltaBatch
from mfli.kafka.clients import make_producer
from mfli.learner.learner import MFLILearner
from mfli.learner.publisher import Publisher
from mfli.retrieval.query_model import QueryModel

from learner_streams import clustered_stream, published_updates


def _learner(events: int = 1_500, seed: int = 5) -> MFLILearner:
    users, items, values, ts, catalogue = clustered_stream(n_clusters=4, items_per_cluster=20, n_users=40,
                                                           n_events=events, seed=seed)
    learner = MFLILearner(ModelSettings(members=1, facets=2, dim=8, history=10, warmup_events=500, negatives=32,
                                        seed=1))
    learner.upsert_items(catalogue)
    for s in range(0, events, 250):
        learner.learn_columns(users[s:s + 250], items[s:s + 250], values[s:s + 250], ts[s:s + 250])
    return learner


def test_requeued_deltas_come_back_in_their_newest_state_and_deletions_stay_deletions():
    learner = _learner()
    deltas = learner.drain_changed()
    assert deltas and learner.drain_changed() == []
    gone = deltas[0].item_id
    learner.delete_items([gone])
    deleted = learner.drain_changed()
    assert [d.deleted for d in deleted] == [True]
    learner.requeue(deltas[1:5] + deleted)
    again = {d.row: d for d in learner.drain_changed()}
    assert sorted(again) == sorted(d.row for d in deltas[1:5] + deleted)
    assert again[deleted[0].row].deleted
    for d in deltas[1:5]:
        np.testing.assert_allclose(again[d.row].vectors, learner.snapshot().vectors[d.row], atol=1e-6)
        assert again[d.row].event_ts == d.event_ts  # the event time that caused the change is kept


def test_mark_changed_publishes_untouched_rows_without_faking_an_event_time():
    learner = _learner()
    learner.drain_changed()
    learner.mark_changed([3, 7])
    marked = {d.row: d.event_ts for d in learner.drain_changed()}
    assert marked == {3: -1, 7: -1}
    learner.mark_changed([3], event_ts=5_000)
    learner.mark_changed([3])  # a later refresh must not erase the real event time
    assert [(d.row, d.event_ts) for d in learner.drain_changed()] == [(3, 5_000)]


@pytest.mark.slow
def test_flush_sends_codebook_then_encoder_then_versioned_deltas_and_holds_small_drift(kafka_settings):
    settings = kafka_settings.model_copy(deep=True)
    learner = _learner()
    producer = make_producer(settings.kafka)
    publisher = Publisher(settings, learner, producer)
    try:
        first = publisher.flush()
        assert first == len(learner.items)  # every row is new to the index
        settings.learner.publish_min_drift = 10.0  # nothing moves that far: changed rows are held
        settings.learner.publish_min_prior_change = 10.0
        learner.mark_changed(range(10))
        assert publisher.flush() == 0 and publisher.held_rows == list(range(10))
        assert publisher.flush(everything=True) == 10 and publisher.held_rows == []
    finally:
        producer.close()
    messages = published_updates(settings)
    kinds = [type(m).__name__ for m in messages]
    assert kinds[:2] == ["CodebookSnapshot", "QueryModel"] and set(kinds[2:]) == {"DeltaBatch"}
    batches = [m for m in messages if isinstance(m, DeltaBatch)]
    assert sum(len(b) for b in batches) == first + 10
    versions = [int(v) for b in batches for v in np.unique(b.versions)]
    assert versions == sorted(versions) and len(set(versions)) == 2  # one version per flush, increasing
    codebook = next(m for m in messages if isinstance(m, CodebookSnapshot))
    model = next(m for m in messages if isinstance(m, QueryModel))
    assert codebook.version < model.version < versions[0]  # one clock for everything on the topic


@pytest.mark.slow
def test_a_failed_flush_loses_nothing(kafka_settings):
    """A send Kafka refuses (here: a closed producer, a real KafkaError) puts every row back into the
    learner and marks the codebook and the encoder unsent; the next flush publishes all of it."""
    learner = _learner()
    rows = len(learner.items)
    broken = make_producer(kafka_settings.kafka)
    broken.close()
    publisher = Publisher(kafka_settings, learner, broken)
    with pytest.raises(KafkaError):
        publisher.flush()
    assert published_updates(kafka_settings) == []
    publisher.producer = working = make_producer(kafka_settings.kafka)
    try:
        assert publisher.flush() == rows
    finally:
        working.close()
    messages = published_updates(kafka_settings)
    assert sum(len(m) for m in messages if isinstance(m, DeltaBatch)) == rows
    assert any(isinstance(m, CodebookSnapshot) for m in messages) and any(isinstance(m, QueryModel) for m in messages)
