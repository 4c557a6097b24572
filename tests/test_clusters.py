"""Known-answer tests for the facet-cluster model (split, merge, assignment)."""

import numpy as np
import pytest

from mfli.retrieval.clusters import FacetClusters, build_facet_clusters, path_keys

D = 8


def _codebook(levels: int = 2, m: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(levels, m, D)).astype(np.float32)


def _items_on_path(path, n, codebook, rng, spread=0.3):
    recon = sum(codebook[level, c] for level, c in enumerate(path))
    vectors = recon + spread * rng.normal(size=(n, D)).astype(np.float32)
    return np.tile(np.asarray(path), (n, 1)), vectors.astype(np.float32)


def test_big_path_splits_into_parts_within_bounds():
    rng = np.random.default_rng(1)
    cb = _codebook()
    codes, vecs = _items_on_path((1, 2), 1000, cb, rng)
    fc, assign = build_facet_clusters(codes, vecs, cb, target=32, b_low=8, b_upp=256)
    sizes = np.bincount(assign)
    assert fc.n_clusters == sizes.size
    assert fc.n_clusters >= 4  # 1000 items cannot stay in one cluster above b_upp=256
    assert sizes.max() <= 256
    assert np.mean((sizes >= 8) & (sizes <= 256)) >= 0.95
    assert set(fc.path_clusters((1, 2)).tolist()) == set(range(fc.n_clusters))
    assert np.array_equal(fc.sizes, sizes)


def test_tiny_cluster_merges_into_nearest():
    rng = np.random.default_rng(2)
    cb = np.zeros((1, 3, D), dtype=np.float32)
    cb[0, 0, 0] = 10.0  # path (0,) far along axis 0
    cb[0, 1, 1] = 10.0  # path (1,) far along axis 1
    cb[0, 2, 0] = 9.0  # path (2,) tiny, next to path (0,)
    parts = [_items_on_path((p,), n, cb, rng, spread=0.1) for p, n in ((0, 40), (1, 40), (2, 3))]
    codes = np.concatenate([c for c, _ in parts])
    vecs = np.concatenate([v for _, v in parts])
    fc, assign = build_facet_clusters(codes, vecs, cb, target=32, b_low=8, b_upp=256)
    assert fc.n_clusters == 2
    assert len(set(assign[80:])) == 1 and assign[80] == assign[0]  # tiny path joined path (0,)
    assert assign[40] != assign[0]
    assert np.array_equal(fc.path_clusters((2,)), fc.path_clusters((0,)))


def test_every_item_in_exactly_one_cluster_and_assign_reproduces():
    rng = np.random.default_rng(3)
    cb = _codebook(m=6)
    codes = rng.integers(0, 6, size=(3000, 2))
    codes[:1500] = (0, 0)  # one heavy path to force splits
    vecs = (cb[0, codes[:, 0]] + cb[1, codes[:, 1]] + 0.3 * rng.normal(size=(3000, D))).astype(np.float32)
    fc, assign = build_facet_clusters(codes, vecs, cb, target=32, b_low=8, b_upp=256, seed=7)
    assert assign.shape == (3000,) and assign.min() >= 0 and assign.max() < fc.n_clusters
    assert np.array_equal(fc.assign(codes, vecs), assign)
    # every item's cluster is one of its path's clusters
    for i in range(0, 3000, 97):
        assert assign[i] in fc.path_clusters(tuple(codes[i]))
    fc2, assign2 = build_facet_clusters(codes, vecs, cb, target=32, b_low=8, b_upp=256, seed=7)
    assert np.array_equal(assign, assign2) and np.array_equal(fc.centroids, fc2.centroids)


def test_unknown_path_goes_to_prefix_then_global():
    rng = np.random.default_rng(4)
    cb = _codebook(m=4)
    codes_a, va = _items_on_path((1, 1), 50, cb, rng)
    codes_b, vb = _items_on_path((2, 3), 50, cb, rng)
    fc, assign = build_facet_clusters(np.concatenate([codes_a, codes_b]), np.concatenate([va, vb]), cb,
                                      target=32, b_low=8, b_upp=256)
    # path (1, 0) unknown but prefix (1,) is known -> a cluster of path (1, 1), even if the vector is
    # closer to the (2, 3) cluster
    got = fc.assign(np.array([[1, 0]]), vb[:1])
    assert got[0] in fc.path_clusters((1, 1))
    # path (3, 3): no known prefix -> global nearest centroid
    got = fc.assign(np.array([[3, 3]]), vb[:1])
    assert got[0] == assign[50]


def test_split_merge_off_keeps_raw_paths():
    rng = np.random.default_rng(5)
    cb = _codebook()
    codes, vecs = _items_on_path((1, 2), 600, cb, rng)
    fc, assign = build_facet_clusters(codes, vecs, cb, 32, 8, 256, split_merge=False)
    assert fc.n_clusters == 1 and np.all(assign == 0)


def test_rejects_bad_bounds_and_shapes():
    cb = _codebook()
    with pytest.raises(ValueError, match="b_low"):
        build_facet_clusters(np.zeros((2, 2), int), np.zeros((2, D), np.float32), cb, 32, 64, 256)
    with pytest.raises(ValueError, match="codes must be"):
        build_facet_clusters(np.zeros((2, 3), int), np.zeros((2, D), np.float32), cb, 32, 8, 256)


def test_path_keys_use_a_fixed_radix():
    assert path_keys(np.array([[1, 2], [0, 3]])).tolist() == [(1 << 15) + 2, 3]
    with pytest.raises(ValueError, match="levels"):
        path_keys(np.zeros((1, 5), int))
    assert isinstance(FacetClusters, type)
