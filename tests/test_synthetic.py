"""The synthetic stream's known structure: determinism, topic-faithful tags, on-topic users, churn, drift, skew."""

from __future__ import annotations

from collections import Counter

import pytest

from mfli.events import InteractionEvent, ItemEvent
from mfli.sources.synthetic import SyntheticStream


def _stream(**kw) -> SyntheticStream:
    return SyntheticStream(n_users=200, n_items=400, n_topics=10, seed=5, **kw)


def test_same_seed_same_stream_and_slicing_does_not_matter():
    a = list(_stream().records(3_000))
    b = _stream()
    assert a == list(b.records(1_000)) + list(b.records(2_000))
    assert a != list(SyntheticStream(n_users=200, n_items=400, n_topics=10, seed=6).records(3_000))


def test_events_mostly_hit_the_users_current_interests_and_tags_follow_topics():
    s = _stream(on_topic=0.9, drift_every=500)
    hits = total = 0
    for record in s.records(5_000):
        if isinstance(record, ItemEvent):
            assert f"topic{s.topic_of[record.item_id]}" in record.tags
            continue
        total += 1
        hits += s.topic_of[record.item_id] in s.interests(record.user_id)
    # on-topic draws always hit; off-topic ones hit by chance 2/10 of the time: 0.9 + 0.1 * 0.2 = 0.92
    assert 0.89 < hits / total < 0.95


def test_time_order_and_catalogue_churn_are_consistent():
    s = _stream(new_item_rate=0.01, delete_rate=0.005)
    live: set[str] = set()
    last_ts, created, deleted = 0, 0, 0
    for record in s.records(20_000):
        ts = record.ts if isinstance(record, InteractionEvent) else record.created_ts
        assert ts >= last_ts
        last_ts = ts
        if isinstance(record, ItemEvent):
            if record.op == "upsert":
                live.add(record.item_id)
                created += 1
            else:
                live.remove(record.item_id)
                deleted += 1
        else:
            assert record.item_id in live, "interaction with an item that was never created or already deleted"
    assert created > 400 + 100 and deleted > 50
    assert live == s.live_items()


def test_interests_drift_on_schedule():
    s = _stream(drift_every=1_000, drift_fraction=0.5)
    before = {f"u{u}": s.interests(f"u{u}") for u in range(200)}
    list(s.records(999))
    assert {u: s.interests(u) for u in before} == before
    list(s.records(2_000))
    changed = sum(s.interests(u) != i for u, i in before.items())
    assert 50 < changed < 200


def test_popularity_is_skewed():
    counts = Counter(e.item_id for e in _stream().events(20_000))
    top = sum(c for _, c in counts.most_common(40))  # top 10 % of the 400 items
    assert top / 20_000 > 0.3


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="n_items"):
        SyntheticStream(n_users=10, n_items=5, n_topics=10)
    with pytest.raises(ValueError, match="on_topic"):
        SyntheticStream(on_topic=1.5)
