"""The retrieval contract shared by evaluation, benchmarks, the indexer and the server.

Every backend (learned index in memory, learned index over LMDB, exact search, hnswlib, popularity)
implements :class:`Retriever` over the same :class:`Query`, so evaluation and benchmarks compare like
with like (the pattern of ``implicit``'s ANN wrappers). The learned-index retriever reads item state
through :class:`IndexView`, which has an in-memory implementation (evaluation) and an LMDB one
(indexer/server): same interface, same results on the same state.

Conventions
-----------
* Items are dense int64 *rows*; mapping to external string ids is the view's job.
* Item vectors are ``float32[F, d]`` per item, L2-normalised per facet.
* A query is ``float32[F, d]`` (one L2-normalised vector per facet) plus ``float32[F]`` log gates,
  computed from the history by the learner's published query encoder
  (:class:`mfli.retrieval.query_model.QueryModel`, numpy, so the server never needs torch), or
  carried ready-made by the :class:`Query`. Without a model it is the recency-weighted mean of the
  history's vectors with uniform gates (:func:`pool_query`, the mean-pooling ablation).
* The score of an item is ``combine_f(q_f . e_f) + prior`` (:func:`score`): the mixture of softmaxes
  of :func:`mfli.retrieval.query_model.combine` (``q . e`` for one facet), plus the popularity prior
  ``beta * log1p(decayed count)`` stored with each item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from mfli.retrieval.query_model import combine

if TYPE_CHECKING:
    from mfli.retrieval.query_model import QueryModel

#: facet value used for candidates that came from the trending source or the fallback
TRENDING_FACET = -1


@dataclass(frozen=True)
class Query:
    """A retrieval request in row space."""

    history: np.ndarray  # int64 item rows engaged by the user, oldest first (triggers)
    k: int
    exclude: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # rows never returned
    deterministic: bool = True  # top-count clusters instead of sampling in proportion to counts
    seed: int = 0
    history_ts: np.ndarray | None = None  # int64 ms of each history event (None: all "now")
    vector: np.ndarray | None = None  # float32[F, d] ready-made query (else computed from the history)
    log_gates: np.ndarray | None = None  # float32[F] with ``vector``


@dataclass
class Recommendation:
    """Top-k answer: rows sorted by descending score, with where each candidate came from."""

    rows: np.ndarray  # int64[k']
    scores: np.ndarray  # float32[k']
    facets: np.ndarray  # int16[k'], facet of origin or TRENDING_FACET
    clusters: np.ndarray  # int64[k'], cluster of origin within that facet, -1 if none
    fallback: bool = False
    candidates: int = 0  # how many items were reranked


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a :class:`Query`."""

    name: str

    def recommend(self, query: Query) -> Recommendation: ...


@dataclass(frozen=True)
class DenseColumns:
    """In-memory columns for the compiled rerank (:func:`mfli.retrieval.kernels.rerank_top_k`).

    ``vectors``/``prior`` are indexed by row. ``codes``/``scale`` (int8 copies from
    :func:`quantize_rows`) are indexed by *slot*: a view may lay codes out
    cluster by cluster so a cluster's members are read sequentially (the in-memory view does, IVF
    style); row ``r`` outside such a layout is at slot ``row_slot + r``.
    """

    vectors: np.ndarray  # float32[cap, F * d]
    prior: np.ndarray  # float32[cap]
    codes: np.ndarray  # int8[slots, F * d]
    scale: np.ndarray  # float32[slots]
    bias: np.ndarray  # float32[slots]: ``prior`` by slot
    row_slot: int = 0


@runtime_checkable
class IndexView(Protocol):
    """Read access to a learned index (one consistent snapshot for the duration of a request).

    Cluster ids are ints unique within a facet. A code path (tuple of L codeword ids) maps to one or
    more clusters: several after a split (each with its own centroid), and a merged cluster can be
    the target of several paths.
    """

    facets: int
    dim: int
    levels: int

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32[n, F, d] item vectors."""

    def prior(self, rows: np.ndarray) -> np.ndarray:
        """float32[n] popularity prior added to the score."""

    def clusters_of(self, rows: np.ndarray) -> np.ndarray:
        """int64[n, F] cluster of each item in each facet (-1 if the item is not indexed)."""

    def members(self, facet: int, cluster: int, limit: int) -> np.ndarray:
        """int64 rows of up to ``limit`` members of a cluster (highest prior first)."""

    def members_many(
        self, facets: np.ndarray, clusters: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Batched :meth:`members` for (facet, cluster) pairs: (all rows concatenated, count per pair,
        each row's slot in :meth:`dense` ``.codes`` or None). The hot path uses this: one CSR gather
        (memory) or one ``getmulti`` (LMDB) per request."""

    def paths_clusters(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`path_clusters` for int64 paths ``[F, p, L]`` of every facet (rows starting
        with -1 are padding): (facets, clusters) of all their clusters, concatenated."""

    def codebooks(self) -> np.ndarray:
        """float32[F, L, M, d] residual-quantisation codebooks."""

    def path_clusters(self, facet: int, path: tuple[int, ...]) -> np.ndarray:
        """int64 cluster ids a code path maps to (empty if the path holds no items)."""

    def trending(self, n: int) -> np.ndarray:
        """int64 rows of the n items with the highest prior (recently popular)."""

    def live_rows(self) -> np.ndarray:
        """int64 rows of every indexed (not deleted) item: the universe of exact search."""

    def query_model(self) -> QueryModel | None:
        """The published query encoder the index was built for (None before the learner published one)."""

    def dense(self) -> DenseColumns | None:
        """The columns the compiled rerank reads in place, if the view holds them in memory, else None."""


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices ``starts[i] .. starts[i] + counts[i]`` for every i, concatenated (CSR gather, no loop)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64)
    shift = np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.repeat(shift, counts) + np.arange(total, dtype=np.int64)


def pool_query(history_vectors: np.ndarray, decay: float) -> np.ndarray:
    """Recency-weighted mean of ``float32[h, F, d]`` history vectors (oldest first) → ``float32[F, d]``.

    The newest item has weight 1, the one before it ``decay``, and so on; each facet is L2-normalised.
    The learner trains with exactly this pooling, so queries at serve time match training.
    """
    h = history_vectors.shape[0]
    if h == 0:
        raise ValueError("pool_query needs at least one history item")
    weights = decay ** np.arange(h - 1, -1, -1, dtype=np.float32)
    pooled = np.einsum("h,hfd->fd", weights, history_vectors.astype(np.float32, copy=False))
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


def score(query_vec: np.ndarray, item_vectors: np.ndarray, prior: np.ndarray, log_gates: np.ndarray | None = None,
          tau: float = 0.05) -> np.ndarray:
    """``combine_f(q_f . e_f) + prior`` for ``float32[n, F, d]`` items → ``float32[n]``."""
    facets = np.einsum("nfd,fd->nf", item_vectors, query_vec)
    gates = np.full(facets.shape[1], -np.log(facets.shape[1]), np.float32) if log_gates is None else log_gates
    return (combine(facets, gates, tau) + prior).astype(np.float32)


def uniform_gates(facets: int) -> np.ndarray:
    return np.full(facets, -np.log(facets), np.float32)


def resolve_query(view: IndexView, query: Query, model: QueryModel | None, horizon: int, decay: float
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """The request's (queries ``[F, d]``, log gates ``[F]``, tau): carried by the query, else the
    published encoder over the history's vectors, else mean pooling (no model published yet)."""
    if query.vector is not None:
        gates = uniform_gates(query.vector.shape[0]) if query.log_gates is None else query.log_gates
        return (np.asarray(query.vector, np.float32), np.asarray(gates, np.float32),
                model.score_tau if model is not None else 0.05)
    history = np.asarray(query.history, dtype=np.int64)
    if model is not None and model.weights:
        recent = history[-model.horizon:]
        ts = np.zeros(recent.size, np.int64) if query.history_ts is None else \
            np.asarray(query.history_ts, np.int64)[-model.horizon:]
        cached = getattr(view, "encoder_inputs", None)  # the server's per-item cache (mfli.retrieval.inputs)
        x = cached(model, recent) if cached is not None and recent.size else None
        if x is None:
            q, g = model.query(view.vectors(recent).reshape(recent.size, -1), ts)
        else:
            q, g = model.query_inputs(x, ts)
        return q, g, model.score_tau
    q = pool_query(view.vectors(history[-horizon:]), decay)
    return q, uniform_gates(q.shape[0]), model.score_tau if model is not None else 0.05


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, sorted descending (argpartition, then sort the k)."""
    if k >= scores.shape[0]:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 copy of float32[n, D] rows with a per-row scale (``row ~= codes * scale``), for the
    approximate first pass of :func:`mfli.retrieval.kernels.rerank_top_k`: a quarter of the bytes per
    candidate."""
    flat = np.asarray(vectors, dtype=np.float32).reshape(vectors.shape[0], -1)
    scale = np.abs(flat).max(axis=1) / 127.0 if flat.size else np.zeros(flat.shape[0], np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.rint(flat / scale[:, None]).astype(np.int8), scale


def target_ranks(scores: np.ndarray, targets: np.ndarray, excluded: list[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(rank, ties) of each target among its row's candidates: candidates scored strictly above it,
    and other candidates scored equal to it (``excluded`` must not contain the target). Used by the evaluation's
    streaming protocol and by the learner's prequential probe, so both rank alike."""
    rows = np.arange(len(targets))
    t = scores[rows, targets][:, None]
    above = (scores > t).sum(axis=1)
    ties = (scores == t).sum(axis=1) - 1
    for r, ex in enumerate(excluded):
        if ex.size:
            above[r] -= int((scores[r, ex] > t[r]).sum())
            ties[r] -= int((scores[r, ex] == t[r]).sum())
    return above, ties
