"""Exact search: score every live item. The yardstick for index recall (docs/design.md §Serving,
§Evaluation protocol)."""

from __future__ import annotations

import math

import numpy as np

from mfli.retrieval.base import (
    TRENDING_FACET,
    DenseColumns,
    IndexView,
    Query,
    Recommendation,
    resolve_query,
    top_k,
)
from mfli.retrieval.learned import empty_recommendation
from mfli.retrieval.query_model import combine


class ExactRetriever:
    """Brute force over all live items with the same score as the index path's rerank.

    The live item matrix is gathered once (flattened to ``[n, F*d]``) so a query is one matrix-vector
    product; call :meth:`refresh` after the view changes.
    """

    name = "exact"

    def __init__(self, view: IndexView, history: int = 50, recency_decay: float = 0.97) -> None:
        self.view = view
        self.history = history
        self.recency_decay = recency_decay
        self.refresh()

    def refresh(self) -> None:
        self._rows = self.view.live_rows()
        self._matrix = np.ascontiguousarray(self.view.vectors(self._rows).reshape(self._rows.size, -1))
        self._prior = self.view.prior(self._rows).astype(np.float32)

    def scores_for(self, query: Query) -> np.ndarray:
        """Score of every live row (aligned with ``self._rows``) for a request."""
        q, gates, tau = resolve_query(self.view, query, self.view.query_model(), self.history, self.recency_decay)
        facets = np.einsum("nfd,fd->nf", self._matrix.reshape(self._rows.size, q.shape[0], -1), q)
        return (combine(facets, gates, tau) + self._prior).astype(np.float32)

    def recommend(self, query: Query) -> Recommendation:
        history = np.asarray(query.history, dtype=np.int64)
        if history.size == 0 or self._rows.size == 0:
            return empty_recommendation(fallback=history.size == 0)
        scores = self.scores_for(query)
        exclude = np.asarray(query.exclude, dtype=np.int64)
        if exclude.size:
            scores = np.where(np.isin(self._rows, exclude), -np.inf, scores)
        order = top_k(scores, query.k)
        order = order[np.isfinite(scores[order])]
        return Recommendation(
            rows=self._rows[order], scores=scores[order].astype(np.float32),
            facets=np.full(order.size, TRENDING_FACET, np.int16), clusters=np.full(order.size, -1, np.int64),
            candidates=int(self._rows.size),
        )


class DenseExactRetriever(ExactRetriever):
    """Exact search over a view's dense columns in place (the server's index mirror): current at the
    view's version, with nothing gathered or cached.

    Why: :class:`ExactRetriever` copies the live item matrix, so a server rebuilds it at most every
    ``serve.exact_refresh_s`` (a copy per index version would cost more than the yardstick is worth);
    while the learner moves items every second, index answers from live vectors were then graded against
    exact answers up to that old, and the sampled index recall read ~0.77 in ``mfli demo`` where the
    offline comparison on one snapshot reads 0.999. Scoring the mirror's rows where they lie is one
    matrix-vector product over its capacity (~3 ms at 10^5 items of 192 floats), then the live rows.
    """

    def __init__(self, view: IndexView, dense: DenseColumns, history: int = 50, recency_decay: float = 0.97) -> None:
        self.dense = dense
        super().__init__(view, history, recency_decay)

    def refresh(self) -> None:
        self._rows = self.view.live_rows()
        self._prior = self.dense.prior[self._rows]

    def scores_for(self, query: Query) -> np.ndarray:
        q, gates, tau = resolve_query(self.view, query, self.view.query_model(), self.history, self.recency_decay)
        vectors = self.dense.vectors  # [capacity, F * d], rows beyond the live ones included
        if math.isinf(tau) or q.shape[0] == 1:  # the linear pool (or one facet) is one product with the queries
            weights = np.exp(gates)[:, None] if math.isinf(tau) else np.ones((1, 1), np.float32)
            flat = vectors @ (q * weights).astype(np.float32).reshape(-1)
            score = flat[self._rows] + (0.0 if math.isinf(tau) else tau * float(gates[0]))
        else:
            facets = np.einsum("nfd,fd->nf", vectors[self._rows].reshape(self._rows.size, q.shape[0], -1), q)
            score = combine(facets, gates, tau)
        return (score + self._prior).astype(np.float32)
