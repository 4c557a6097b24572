"""`mfli produce` paths: synthetic records with injected invalid ones land where the consumers expect."""

from __future__ import annotations

import time

from mfli.consumers import EventStream, read_dead_letters
from mfli.kafka.clients import make_producer
from mfli.orchestration.produce import produce_records
from mfli.sources.synthetic import SyntheticStream


def test_produced_stream_splits_into_valid_items_and_dead_letters(kafka_settings):
    k = kafka_settings.kafka
    producer = make_producer(k)
    stream = SyntheticStream(n_users=50, n_items=60, n_topics=5, seed=2)
    counts = produce_records(producer, kafka_settings, stream.records(1_200), invalid_fraction=0.1, seed=1,
                             progress=False)
    producer.close()
    assert counts["events"] + counts["invalid"] == 1_200 and 60 <= counts["invalid"] <= 180
    assert all(counts[f"invalid:{kind}"] > 0 for kind in ("malformed_json", "non_finite", "oversized"))

    events, items, covered = [], [], 0
    with EventStream(kafka_settings, group_id=k.learner_group) as consumer:
        deadline = time.monotonic() + 30
        while covered < 1_200 + counts["items"] and time.monotonic() < deadline:
            batch = consumer.poll_batch(timeout_ms=300)
            events += batch.events
            items += batch.items
            covered += batch.records
    assert len(events) == counts["events"] and len({e.event_id for e in events}) == counts["events"]
    assert len(items) == counts["items"]
    reasons = [d.reason for d in read_dead_letters(k, expected=counts["invalid"])]
    assert len(reasons) == counts["invalid"]
    assert set(reasons) == {"malformed_json", "schema", "non_finite", "oversized", "unknown_event_type"}
