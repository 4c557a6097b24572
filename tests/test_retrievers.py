"""Every retriever behind the same interface, on a toy catalogue whose right answer is known.

Items belong to one of four topics; each facet vector is its topic's direction plus small noise and
the RQ code's first level is the topic. A user whose history lies in topic 2 must get topic-2 items
from every history-aware retriever, and the learned index must agree with exact search.
"""

from __future__ import annotations

import numpy as np
import pytest

from mfli.retrieval.base import Query, Retriever
from mfli.retrieval.exact import ExactRetriever
from mfli.retrieval.hnsw import HnswRetriever
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.popularity import PopularityRetriever
from mfli.retrieval.snapshot import ItemSnapshot

N, F, D, L, M, TOPICS = 800, 2, 16, 2, 8, 4


def toy_snapshot(seed: int = 0) -> tuple[ItemSnapshot, np.ndarray]:
    rng = np.random.default_rng(seed)
    topic = np.arange(N) % TOPICS
    books = rng.normal(size=(F, L, M, D)).astype(np.float32)
    books[:, 0, :TOPICS] = np.eye(TOPICS, D, dtype=np.float32) * 3  # level-1 codeword t = topic t direction
    books[:, 1] *= 0.1
    vectors = np.eye(TOPICS, D, dtype=np.float32)[topic][:, None, :] + rng.normal(0, 0.15, (N, F, D))
    vectors = (vectors / np.linalg.norm(vectors, axis=2, keepdims=True)).astype(np.float32)
    codes = np.zeros((N, F, L), np.int32)
    codes[:, :, 0] = topic[:, None]
    codes[:, :, 1] = rng.integers(0, M, size=(N, F))
    prior = rng.uniform(0, 0.05, N).astype(np.float32)
    live = np.ones(N, bool)
    live[7] = False  # a deleted item (topic 3) must never come back
    snap = ItemSnapshot(
        item_ids=np.array([f"i{r}" for r in range(N)], dtype=object), vectors=vectors, codes=codes,
        codebooks=books, prior=prior, live=live,
    )
    return snap, topic


@pytest.fixture(scope="module")
def toy():
    snap, topic = toy_snapshot()
    view = MemoryIndexView(snap, target=32, b_low=8, b_upp=256)
    return snap, topic, view


def retrievers(view: MemoryIndexView) -> list[Retriever]:
    params = LearnedIndexParams(clusters_per_request=16, members_per_cluster=64, query_paths=4, trending=10)
    return [LearnedIndexRetriever(view, params), ExactRetriever(view), HnswRetriever(view, ef=200)]


def test_every_retriever_implements_the_interface(toy):
    _, _, view = toy
    for r in retrievers(view) + [PopularityRetriever(view.prior(np.arange(N)))]:
        assert isinstance(r, Retriever), r


@pytest.mark.parametrize("which", ["index", "exact", "hnsw"])
def test_history_in_one_topic_retrieves_that_topic(toy, which):
    _, topic, view = toy
    retriever = {r.name: r for r in retrievers(view)}[which]
    history = np.flatnonzero(topic == 2)[:10]
    rec = retriever.recommend(Query(history=history, k=20, exclude=history))
    assert rec.rows.size == 20
    assert (topic[rec.rows] == 2).mean() == 1.0
    assert not np.isin(rec.rows, history).any()
    assert np.all(np.diff(rec.scores) <= 1e-6), "scores must be sorted descending"


def test_index_agrees_with_exact_and_never_returns_deleted(toy):
    _, topic, view = toy
    index, exact, _ = retrievers(view)
    overlaps = []
    for t in range(TOPICS):
        history = np.flatnonzero(topic == t)[3:13]
        a = index.recommend(Query(history=history, k=30))
        b = exact.recommend(Query(history=history, k=30))
        assert 7 not in a.rows and 7 not in b.rows
        overlaps.append(np.intersect1d(a.rows, b.rows).size / 30)
    assert np.mean(overlaps) >= 0.95


def test_index_reports_facet_and_cluster_of_origin(toy):
    _, topic, view = toy
    index = retrievers(view)[0]
    history = np.flatnonzero(topic == 1)[:5]
    rec = index.recommend(Query(history=history, k=10))
    from_clusters = rec.facets >= 0
    assert from_clusters.any()
    picked = (rec.rows[from_clusters], rec.facets[from_clusters], rec.clusters[from_clusters])
    for row, facet, cluster in zip(*picked, strict=True):
        assert view.clusters_of(np.array([row]))[0, facet] == cluster


def test_empty_history_falls_back_to_trending(toy):
    _, _, view = toy
    index = retrievers(view)[0]
    rec = index.recommend(Query(history=np.empty(0, np.int64), k=5))
    assert rec.fallback
    expected = view.trending(5)
    assert list(rec.rows) == list(expected)


def test_popularity_skips_excluded_rows():
    pop = PopularityRetriever(np.array([5.0, 9.0, 1.0, 7.0]))
    rec = pop.recommend(Query(history=np.empty(0, np.int64), k=2, exclude=np.array([1])))
    assert list(rec.rows) == [3, 0]


def test_sampled_trigger_clusters_are_seeded(toy):
    _, topic, view = toy
    index = retrievers(view)[0]
    history = np.flatnonzero(topic < 2)[:40]
    a = index.recommend(Query(history=history, k=10, deterministic=False, seed=3))
    b = index.recommend(Query(history=history, k=10, deterministic=False, seed=3))
    assert list(a.rows) == list(b.rows)
