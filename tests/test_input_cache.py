"""The server's per-item encoder-input cache (mfli/retrieval/inputs.py) on its own: what it returns is
what the encoder computes, and a stamp it has not seen (an updated row, a row never written, a row past
its capacity) is computed, never served from memory."""

from __future__ import annotations

import numpy as np

from mfli.retrieval.inputs import InputCache
from mfli.retrieval.query_model import QueryModel


def _model() -> QueryModel:
    parts = [QueryModel.random(facets=1, dim=8, horizon=5, heads=2, seed=s) for s in (0, 1)]
    return QueryModel.ensemble(parts, version=3)


def test_cached_inputs_are_the_encoders_and_follow_stamps():
    model = _model()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    stamp = np.arange(1, 51, dtype=np.int64)
    stamp[40:] = -1  # rows the mirror never wrote
    cache = InputCache(model.members, model.encoder_dim, capacity=20)  # smaller than the rows asked for: it grows
    reads: list[np.ndarray] = []

    def read(rows: np.ndarray) -> np.ndarray:
        reads.append(rows.copy())
        return vectors[rows]

    rows = np.array([3, 7, 3, 45, 31], np.int64)
    expect = model.inputs(vectors[rows])
    np.testing.assert_array_equal(cache.inputs(model, rows, stamp, read), expect)
    assert (cache.hits, cache.misses) == (0, 5) and sorted(reads[-1].tolist()) == [3, 3, 7, 31, 45]
    np.testing.assert_array_equal(cache.inputs(model, rows, stamp, read), expect)
    assert (cache.hits, cache.misses) == (5, 5) and len(reads) == 1
    vectors[7] += 1.0  # the mirror rewrote row 7: new vector, new stamp
    stamp[7] = 99
    got = cache.inputs(model, rows, stamp, read)
    assert cache.misses == 6 and reads[-1].tolist() == [7]
    np.testing.assert_array_equal(got, model.inputs(vectors[rows]))
    assert not np.allclose(got[:, 1], expect[:, 1])
    # new weights: every entry is recomputed with them, and the old version's entries are not served
    newer = QueryModel.ensemble([QueryModel.random(facets=1, dim=8, horizon=5, heads=2, seed=s) for s in (4, 5)],
                                version=4)
    np.testing.assert_array_equal(cache.inputs(newer, rows, stamp, read), newer.inputs(vectors[rows]))
    assert cache.misses == 11
    np.testing.assert_array_equal(cache.inputs(newer, rows, stamp, read), newer.inputs(vectors[rows]))
    assert cache.misses == 11
    # the query from cached inputs is the query from the vectors
    ts = np.arange(rows.size, dtype=np.int64) * 60_000
    q, g = model.query_inputs(got, ts)
    rq, rg = model.query(vectors[rows], ts)
    np.testing.assert_allclose(q, rq, atol=1e-6)
    np.testing.assert_allclose(g, rg, atol=1e-6)
