"""Seeded synthetic streams with a known answer, and what the learner published, shared by the learner tests."""

from __future__ import annotations

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from mfli.deltas import decode_message
from mfli.events import InteractionEvent, ItemEvent


def clustered_stream(n_clusters: int = 8, items_per_cluster: int = 40, n_users: int = 200,
                     n_events: int = 20_000, seed: int = 0):
    """Users each like one cluster of items; items carry their cluster as a tag.

    Returns columns (users, items, values, ts) and the catalogue as ItemEvents.
    """
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(n_clusters, size=n_users)
    users = rng.integers(n_users, size=n_events)
    clusters = user_cluster[users]
    # a user strays to another cluster 10 % of the time
    stray = rng.random(n_events) < 0.1
    clusters = np.where(stray, rng.integers(n_clusters, size=n_events), clusters)
    # within a cluster, item popularity is Zipf-like so counts and log-Q matter
    within = np.minimum(rng.zipf(1.3, size=n_events) - 1, items_per_cluster - 1)
    items = clusters * items_per_cluster + within
    values = rng.integers(1, 6, size=n_events).astype(np.float32)
    ts = np.arange(n_events, dtype=np.int64) * 1000
    catalogue = [ItemEvent(item_id=f"i{c * items_per_cluster + j}", tags=[f"c{c}"])
                 for c in range(n_clusters) for j in range(items_per_cluster)]
    return (np.asarray([f"u{u}" for u in users], dtype=object), np.asarray([f"i{i}" for i in items], dtype=object),
            values, ts, catalogue)


def as_events(users, items, values, ts, lo: int, hi: int) -> list[InteractionEvent]:
    return [InteractionEvent(event_id=f"e{n}", user_id=users[n], item_id=items[n], event_type="rating",
                             value=float(values[n]), ts=int(ts[n])) for n in range(lo, hi)]


def published_updates(settings) -> list:
    """Every message on the item-updates topic so far, decoded (read from the start, one partition)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(settings.kafka.item_updates_topic, 0)])
    out = [decode_message(r.value) for r in consumer]
    consumer.close()
    return out
