"""Request logic between HTTP and the retrievers: ids <-> rows, fallback, exact mode, answer dicts.

Everything here is synchronous numpy and runs on the event loop: a learned-index request costs well
under a millisecond, which is cheaper than handing it to a thread pool (measured in the module docstring
of :mod:`mfli.server.app`). Exact mode is the yardstick, not the product: its item matrix is built once per
index version and cached, and it is the only path whose cost grows with the catalogue.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from mfli.config import Settings
from mfli.metrics import CANDIDATES, FALLBACKS
from mfli.retrieval.base import TRENDING_FACET, Query, Recommendation
from mfli.retrieval.exact import DenseExactRetriever, ExactRetriever
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever

from .schemas import BadRequest, NotFound
from .state import ReadState

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """A retrieval result in row space plus where each row came from."""

    rows: np.ndarray
    scores: np.ndarray
    facets: np.ndarray
    clusters: np.ndarray
    sources: list[str]
    fallback: bool
    candidates: int


class RecommendService:
    """Turns validated requests into answer dicts over one :class:`ReadState`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.params = LearnedIndexParams.from_settings(settings.serve, settings.model)
        self._exact: tuple[int, float, ExactRetriever] | None = None
        self._exact_lock = threading.Lock()

    # --- validation helpers -------------------------------------------------------------------------
    def check_k(self, k: int | None) -> int:
        if k is None:
            return self.settings.serve.default_k
        if k <= 0 or k > self.settings.serve.max_k:
            raise BadRequest(f"k must be between 1 and {self.settings.serve.max_k}, got {k}")
        return k

    # --- retrieval ------------------------------------------------------------------------------------
    def exact(self, state: ReadState) -> ExactRetriever:
        """Exact retriever over the state's items. With the index mirror (float32), over its columns in
        place: current at the request's version, nothing to rebuild. Otherwise a copied item matrix,
        rebuilt when the index version moved and the cached one is older than ``serve.exact_refresh_s``:
        with deltas landing every second, rebuilding an N x F*d matrix per version would cost more than
        the yardstick is worth (answers may lag that long)."""
        dense = state.view.dense()
        if dense is not None:
            return DenseExactRetriever(state.view, dense, self.params.history, self.params.recency_decay)
        with self._exact_lock:
            now = time.monotonic()
            stale = self._exact is None or (
                self._exact[0] != state.index_version and now - self._exact[1] >= self.settings.serve.exact_refresh_s
            )
            if stale:
                retriever = ExactRetriever(state.view, self.params.history, self.params.recency_decay)
                self._exact = (state.index_version, now, retriever)
            cached = self._exact[2]
        # The cached item matrix outlives the request it was built in, but the query vector must be read
        # through *this* request's view (an LMDB view dies with its read transaction): a shallow copy
        # shares the matrix and rebinds the view, without racing the sampler thread.
        bound = copy.copy(cached)
        bound.view = state.view
        return bound

    def retrieve(self, state: ReadState, history: np.ndarray, exclude: np.ndarray, k: int, mode: str,
                 deterministic: bool = True, seed: int = 0, history_ts: np.ndarray | None = None) -> Answer:
        """Index or exact answer; users without usable history get the popular + fresh fallback.

        The query is the learner's encoder (published weights, :mod:`mfli.retrieval.query_model`) over
        the history's vectors and event times, computed here per request."""
        if history.size == 0:
            return self.fallback(state, exclude, k)
        query = Query(history=history, k=k, exclude=exclude, deterministic=deterministic, seed=seed,
                      history_ts=history_ts)
        if mode == "exact":
            rec = self.exact(state).recommend(query)
            sources = ["exact"] * rec.rows.size
        else:
            rec = LearnedIndexRetriever(state.view, self.params).recommend(query)
            sources = ["trending" if f == TRENDING_FACET else "cluster" for f in rec.facets.tolist()]
        CANDIDATES.observe(rec.candidates)
        return Answer(rec.rows, rec.scores, rec.facets, rec.clusters, sources, rec.fallback, rec.candidates)

    def fallback(self, state: ReadState, exclude: np.ndarray, k: int) -> Answer:
        """Recently popular and fresh items, interleaved (fresh ones would never win on popularity alone)."""
        FALLBACKS.inc()
        want = k + int(exclude.size)
        seen = set(exclude.tolist())
        n_fresh = k // 4  # a quarter of the slots; k = 1 stays purely popular
        rows: list[int] = []
        sources: list[str] = []

        def take(pool: np.ndarray, source: str, limit: int) -> None:
            for row in pool.tolist():
                if len(rows) >= limit:
                    return
                if row not in seen:
                    seen.add(row)
                    rows.append(row)
                    sources.append(source)

        hot = state.view.trending(want + n_fresh)
        take(hot, "trending", k - n_fresh)
        take(state.fresh(want + k), "fresh", k)
        take(hot, "trending", k)  # top up if there were too few fresh items
        arr = np.asarray(rows, dtype=np.int64)
        prior = state.view.prior(arr) if arr.size else np.empty(0, np.float32)
        n = arr.size
        return Answer(arr, prior.astype(np.float32), np.full(n, TRENDING_FACET, np.int16), np.full(n, -1, np.int64),
                      sources, True, n)

    # --- routes ---------------------------------------------------------------------------------------
    def recommend(self, state: ReadState, user_id: str | None, triggers: list[str], exclude_ids: list[str],
                  k: int, mode: str, deterministic: bool) -> dict:
        history, history_ts = np.empty(0, np.int64), np.empty(0, np.int64)
        if user_id is not None:
            found = state.history(user_id)
            if found is not None:
                history, history_ts = found
        unknown: list[str] = []
        if triggers:
            # trigger items count as engaged now, after the stored history (newest last)
            trig_rows, unknown = state.rows_of(triggers)
            history = np.concatenate([history, trig_rows])
            history_ts = np.concatenate([history_ts, np.full(trig_rows.size, _now_ms(), np.int64)])
        exclude = history
        if exclude_ids:
            extra, _ = state.rows_of(exclude_ids)  # unknown ids cannot be returned anyway
            exclude = np.concatenate([exclude, extra])
        answer = self.retrieve(state, history, exclude, k, mode, deterministic, history_ts=history_ts)
        out = self.render(state, answer, mode)
        out.update(user_id=user_id, fallback=answer.fallback, unknown_items=unknown)
        return out

    def similar(self, state: ReadState, item_id: str, k: int, mode: str) -> dict:
        rows, _ = state.rows_of([item_id])
        if rows.size == 0:
            raise NotFound(f"unknown item_id {item_id!r}")
        answer = self.retrieve(state, rows, rows, k, mode, history_ts=np.full(rows.size, _now_ms(), np.int64))
        out = self.render(state, answer, mode)
        out["item_id"] = item_id
        return out

    def item(self, state: ReadState, item_id: str) -> dict:
        rows, _ = state.rows_of([item_id])
        if rows.size == 0:
            raise NotFound(f"unknown item_id {item_id!r}")
        row = int(rows[0])
        info = state.item_info(row)
        return {
            "item_id": item_id, "row": row, "codes": info["codes"],
            "clusters": state.view.clusters_of(rows)[0].tolist(), "prior": float(state.view.prior(rows)[0]),
            "version": int(info["version"]), "updated_ts": int(info["updated_ts"]),
            "index_version": state.index_version,
        }

    def render(self, state: ReadState, answer: Answer, mode: str) -> dict:
        ids = state.ids_of(answer.rows)
        items = [
            {"item_id": i, "score": s, "facet": None if f < 0 else f, "cluster": None if c < 0 else c, "source": src}
            for i, s, f, c, src in zip(ids, answer.scores.tolist(), answer.facets.tolist(),
                                       answer.clusters.tolist(), answer.sources, strict=True)
        ]
        return {"items": items, "mode": mode, "candidates": answer.candidates, "index_version": state.index_version}

    # --- used by the monitors -------------------------------------------------------------------------
    def rows_for(self, state: ReadState, history: np.ndarray, k: int, mode: str,
                 history_ts: np.ndarray | None = None) -> np.ndarray:
        """Rows we would serve for a history (no metrics side effects beyond candidates)."""
        if history.size == 0:
            return state.view.trending(k)
        query = Query(history=history, k=k, exclude=history, history_ts=history_ts)
        if mode == "exact":
            return self.exact(state).recommend(query).rows
        rec: Recommendation = LearnedIndexRetriever(state.view, self.params).recommend(query)
        return rec.rows


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
