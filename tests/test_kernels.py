"""The compiled serving kernels against plain numpy references.

The kernels replace numpy on the hot path only for speed: every one must give the numpy answer,
including the awkward cases (repeated candidates, excluded rows, exact score ties, fewer than k
candidates, clusters missing from a lookup).
"""

from __future__ import annotations

import numpy as np
import pytest

from mfli.retrieval.base import DenseColumns, Query, pool_query, quantize_rows
from mfli.retrieval.kernels import (
    FACET_SHIFT,
    beam_paths,
    gather_members,
    lookup_paths,
    pool_rows,
    top_voted_clusters,
    unique_pairs,
)
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever, finish, finish_numpy
from mfli.retrieval.memory import MemoryIndexView

from test_retrievers import toy_snapshot


class _View:
    """Just enough of an IndexView for ``finish``: dense columns, or none (numpy path)."""

    def __init__(self, vectors: np.ndarray, prior: np.ndarray, facets: int, dense: bool) -> None:
        self._v, self._p, self.facets, self._dense = vectors, prior, facets, dense
        self._flat = vectors.reshape(vectors.shape[0], -1)
        self._codes, self._scale = quantize_rows(self._flat)

    def vectors(self, rows):
        return self._v[rows]

    def prior(self, rows):
        return self._p[rows]

    def dense(self):
        return DenseColumns(self._flat, self._p, self._codes, self._scale, self._p) if self._dense else None


def _case(seed: int, n_items: int = 3000, n_cand: int = 2000, ties: bool = False):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_items, 3, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    if ties:  # many items with identical vectors and priors: exact score ties everywhere
        vectors[1::2] = vectors[0::2][: vectors[1::2].shape[0]]
    prior = rng.uniform(0, 0.3, n_items).astype(np.float32)
    if ties:
        prior[1::2] = prior[0::2][: prior[1::2].shape[0]]
    rows = rng.integers(0, n_items, n_cand)  # repeats on purpose
    rows = np.concatenate([rows, rows[:300]])  # the same rows again from "another source"
    sizes = rng.multinomial(rows.size, np.ones(40) / 40)
    ends = np.cumsum(sizes)
    facets = rng.integers(0, 3, 40).astype(np.int64)
    clusters = rng.integers(0, 500, 40).astype(np.int64)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exclude = rng.choice(rows, 60, replace=False)
    return vectors, prior, rows, facets, clusters, ends, q, exclude


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 20, 100])
@pytest.mark.parametrize("ties", [False, True])
def test_compiled_rerank_equals_numpy_reference(seed, k, ties):
    vectors, prior, rows, facets, clusters, ends, q, exclude = _case(seed, ties=ties)
    got = finish(_View(vectors, prior, 3, True), q, rows, None, facets, clusters, ends, exclude, k)
    source = np.repeat(np.arange(ends.size), np.diff(ends, prepend=0))
    want = finish_numpy(_View(vectors, prior, 3, False), q, rows, facets[source], clusters[source], exclude, k)
    assert got.rows.size == k
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.facets, want.facets)
    np.testing.assert_array_equal(got.clusters, want.clusters)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    assert not np.isin(got.rows, exclude).any() and np.unique(got.rows).size == got.rows.size


def test_compiled_rerank_with_fewer_candidates_than_k():
    vectors, prior, rows, facets, clusters, ends, q, _ = _case(0, n_cand=30)
    rows, ends = rows[:12], np.array([5, 12])
    rows[6] = rows[0]  # a repeat
    got = finish(_View(vectors, prior, 3, True), q, rows, None, facets[:2], clusters[:2], ends, rows[1:2], 20)
    want = finish_numpy(_View(vectors, prior, 3, False), q, rows, np.repeat(facets[:2], [5, 7]),
                        np.repeat(clusters[:2], [5, 7]), rows[1:2], 20)
    assert got.rows.size == np.setdiff1d(rows, rows[1:2]).size == want.rows.size
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.clusters, want.clusters)


def test_quantised_rows_approximate_the_vectors():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 192)).astype(np.float32)
    x[0] = 0.0  # an all-zero row (a deleted item) must not divide by zero
    codes, scale = quantize_rows(x)
    assert codes.dtype == np.int8 and np.isfinite(scale).all()
    err = np.abs(codes * scale[:, None] - x).max(axis=1)
    assert (err <= scale * 0.5 + 1e-6).all()


def test_top_voted_clusters_match_lexsort():
    rng = np.random.default_rng(5)
    for _ in range(50):
        assigned = rng.integers(-1, 12, size=(rng.integers(1, 60), 3)).astype(np.int64)
        k = int(rng.integers(1, 20))
        facets, clusters = top_voted_clusters(assigned, k)
        facet_ids = np.broadcast_to(np.arange(3), assigned.shape).reshape(-1)
        flat = assigned.reshape(-1)
        keys = flat[flat >= 0] * 3 + facet_ids[flat >= 0]
        uniq, counts = np.unique(keys, return_counts=True)
        pick = uniq[np.lexsort((uniq, -counts))[:k]]
        np.testing.assert_array_equal(facets, pick % 3)
        np.testing.assert_array_equal(clusters, pick // 3)


def test_beam_search_with_a_full_beam_finds_the_best_paths():
    rng = np.random.default_rng(7)
    words = rng.normal(size=(3, 2, 9)).astype(np.float32)
    paths = beam_paths(words, 9, 5)  # beam = M: exhaustive at level 1, so exact
    for f in range(3):
        total = words[f, 0][:, None] + words[f, 1][None, :]
        best = np.argsort(-total.reshape(-1), kind="stable")[:5]
        np.testing.assert_array_equal(paths[f], np.stack([best // 9, best % 9], axis=1))
    narrow = beam_paths(words, 1, 30)  # fewer paths than asked: padded with -1
    assert (narrow[:, 9:] == -1).all() and (narrow[:, :9] >= 0).all()


def test_small_helpers():
    f, c = unique_pairs(np.array([0, 1, 0, 2, 1, 0]), np.array([5, 5, 5, -1, 5, 6]))
    np.testing.assert_array_equal(f, [0, 1, 0])
    np.testing.assert_array_equal(c, [5, 5, 6])
    rows, slots = gather_members(np.arange(100, 120), np.array([0, 10, 3]), np.array([2, 0, 3]))
    np.testing.assert_array_equal(slots, [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(rows, [100, 101, 103, 104, 105])
    # facet 0: path (0, 3) -> clusters [7, 9]; facet 1: path (0, 3) -> [4], path (1, 0) -> [1, 2]
    keys = np.array([3, (1 << FACET_SHIFT) | 3, (1 << FACET_SHIFT) | (1 << 15)])
    ptr, ids = np.array([0, 2, 3, 5]), np.array([7, 9, 4, 1, 2])
    paths = np.array([[[0, 3], [5, 5], [-1, -1]], [[1, 0], [0, 3], [-1, -1]]])
    facets, clusters = lookup_paths(keys, ptr, ids, paths, 15)
    np.testing.assert_array_equal(facets, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(clusters, [7, 9, 1, 2, 4])


def test_compiled_pooling_equals_pool_query():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(200, 3, 16)).astype(np.float32)
    rows = rng.integers(0, 200, 37)
    got = pool_rows(vectors.reshape(200, -1), rows, 0.97, 3)
    np.testing.assert_allclose(got, pool_query(vectors[rows], 0.97), rtol=1e-5, atol=1e-6)


def test_index_retriever_answers_identically_with_and_without_the_kernels():
    snap, _ = toy_snapshot()
    view = MemoryIndexView(snap, target=32, b_low=8, b_upp=256)

    class NumpyView(MemoryIndexView):
        def dense(self):
            return None

    plain = object.__new__(NumpyView)
    plain.__dict__.update(view.__dict__)
    params = LearnedIndexParams(clusters_per_request=16, members_per_cluster=64, query_paths=4, trending=10)
    rng = np.random.default_rng(1)
    for _ in range(40):
        history = rng.integers(0, snap.n_items, 30)
        query = Query(history=history, k=15, exclude=history)
        a = LearnedIndexRetriever(view, params).recommend(query)
        b = LearnedIndexRetriever(plain, params).recommend(query)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.facets, b.facets)
        np.testing.assert_array_equal(a.clusters, b.clusters)
