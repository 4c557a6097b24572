"""Compile the retrieval kernels before the first request.

numba compiles a kernel the first time it is called with a new combination of argument types (~10 s
cold, ~0.3 s from the on-disk cache), so the server runs the whole request path once, on a tiny
synthetic index, before it reports ready. This lives apart from :mod:`mfli.retrieval.kernels`
because it drives the retrievers that use the kernels (the kernels module stays a leaf).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from mfli.retrieval.base import Query
from mfli.retrieval.kernels import assemble_members
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.query_model import QueryModel
from mfli.retrieval.snapshot import ItemSnapshot


def warm_up() -> float:
    """Compile (or load from the on-disk cache) every kernel with the argument types the hot path uses,
    on a tiny synthetic index; returns the seconds it took. The server calls it before it says ready,
    so no request pays a compile (~10 s cold, ~0.3 s from the cache)."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    n, facets, levels, m, dim = 64, 2, 2, 4, 8
    vectors = rng.normal(size=(n, facets, dim)).astype(np.float32)
    snap = ItemSnapshot(
        item_ids=np.array([f"w{i}" for i in range(n)], dtype=object), vectors=vectors,
        codes=rng.integers(0, m, size=(n, facets, levels)).astype(np.int32),
        codebooks=rng.normal(size=(facets, levels, m, dim)).astype(np.float32),
        prior=rng.uniform(0, 0.1, n).astype(np.float32), live=np.ones(n, bool),
    )
    view = MemoryIndexView(snap, target=8, b_low=2, b_upp=16)
    history = np.arange(10, dtype=np.int64)
    LearnedIndexRetriever(view, LearnedIndexParams(clusters_per_request=4, trending=4)).recommend(
        Query(history=history, k=5, exclude=history))
    # and with a published query encoder (its compiled forward, mfli.retrieval.encoder_kernel)
    view = MemoryIndexView(replace(snap, query_model=QueryModel.random(facets, dim, 16)), target=8, b_low=2, b_upp=16)
    LearnedIndexRetriever(view, LearnedIndexParams(clusters_per_request=4, trending=4)).recommend(
        Query(history=history, k=5, exclude=history, history_ts=np.arange(10, dtype=np.int64) * 1000))
    assemble_members(history, np.array([0, -1], np.int64), np.array([4, 6], np.int64), np.array([False, True]),
                     history, 0)  # the LMDB view's path
    return time.perf_counter() - started
