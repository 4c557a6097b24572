"""Exact search: score every live item. The yardstick for index recall (docs/design.md §Serving,
§Evaluation protocol)."""

from __future__ import annotations

import numpy as np

from mfli.retrieval.base import TRENDING_FACET, IndexView, Query, Recommendation, resolve_query, top_k
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
