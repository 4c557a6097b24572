"""Popularity retrieval: the baseline to respect on temporal splits (docs/design.md §Evaluation protocol)."""

from __future__ import annotations

import numpy as np

from mfli.retrieval.base import TRENDING_FACET, Query, Recommendation


class PopularityRetriever:
    """Top items by a fixed popularity score, skipping excluded rows; ignores the history.

    ``scores`` is indexed by row: counts over the whole training period, over a recent window, or a
    decayed count — the caller decides which popularity it is.
    """

    def __init__(self, scores: np.ndarray, name: str = "popularity", live: np.ndarray | None = None) -> None:
        self.name = name
        scores = np.asarray(scores, dtype=np.float64)
        rows = np.flatnonzero(live) if live is not None else np.arange(scores.size)
        rows = rows[scores[rows] > 0]
        self._ranked = rows[np.argsort(-scores[rows], kind="stable")].astype(np.int64)
        self._scores = scores

    def recommend(self, query: Query) -> Recommendation:
        exclude = np.asarray(query.exclude, dtype=np.int64)
        head = self._ranked[: query.k + exclude.size]
        if exclude.size:
            head = head[~np.isin(head, exclude)]
        rows = head[: query.k]
        return Recommendation(
            rows=rows, scores=self._scores[rows].astype(np.float32),
            facets=np.full(rows.size, TRENDING_FACET, np.int16), clusters=np.full(rows.size, -1, np.int64),
            fallback=False, candidates=int(rows.size),
        )
