"""The learned-index retrieval path (DESIGN §5): cluster lookup and exact rerank, no ANN search.

For a request with trigger items (the user's recent history):

1. **Trigger path** (the paper's): each trigger's cluster in every facet votes; the K clusters with the
   most votes (or K sampled in proportion to votes) are chosen.
2. **Query path** (ours): the pooled query vector is scored against each facet's codewords and the best
   few code paths are descended by beam search; their clusters join. This reaches clusters none of the
   triggers sit in, which matters once a user's trigger clusters are exhausted by seen items.
3. **Trending source**: the items with the highest popularity prior, so recently popular items are
   reachable even when no trigger points at them (DESIGN §3's prior is where much of the recall is).
4. Gather up to N_k members per chosen cluster, drop excluded rows, rerank the union by the exact score
   ``sum_f q_f . e_f + prior`` and return the top k with the facet/cluster each came from.

The class only talks to an :class:`~mfli.retrieval.base.IndexView`, so it runs unchanged over the
in-memory view (evaluation) and the LMDB view (server).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfli.retrieval.base import (
    TRENDING_FACET,
    IndexView,
    Query,
    Recommendation,
    pool_query,
    score,
)


@dataclass(frozen=True)
class LearnedIndexParams:
    """Knobs of the index path; defaults mirror :class:`mfli.config.ServeSettings`."""

    clusters_per_request: int = 64  # K, over all facets, from the trigger histogram
    members_per_cluster: int = 256  # N_k
    query_paths: int = 8  # paths descended per facet by the query path
    beam: int = 4  # level-1 codewords kept per facet while descending
    trending: int = 200
    history: int = 50  # H: triggers pooled into the query vector
    recency_decay: float = 0.97

    @classmethod
    def from_settings(cls, serve, model) -> "LearnedIndexParams":
        return cls(
            clusters_per_request=serve.clusters_per_request,
            members_per_cluster=serve.members_per_cluster,
            query_paths=serve.query_paths,
            trending=serve.trending,
            history=model.history,
            recency_decay=model.recency_decay,
        )


def empty_recommendation(fallback: bool = False) -> Recommendation:
    return Recommendation(
        rows=np.empty(0, np.int64), scores=np.empty(0, np.float32), facets=np.empty(0, np.int16),
        clusters=np.empty(0, np.int64), fallback=fallback,
    )


def finish(
    view: IndexView, q: np.ndarray, rows: np.ndarray, facets: np.ndarray, clusters: np.ndarray,
    exclude: np.ndarray, k: int,
) -> Recommendation:
    """Rerank candidates exactly, then drop duplicates and excluded rows among the best, keep top k.

    Candidates may repeat (an item sits in one cluster per facet and may also be trending). Scoring the
    repeats costs less than de-duplicating thousands of rows first, and only the best few can reach the
    answer: each row repeats at most F + 1 times, so the top ``(k + |exclude|) * (F + 1)`` scores always
    contain the top k distinct, non-excluded rows. Among equal rows the first source wins.
    """
    if rows.size == 0:
        return empty_recommendation()
    scores = score(q, view.vectors(rows), view.prior(rows))
    m = min(rows.size, (k + exclude.size) * (view.facets + 1))
    head = np.argpartition(-scores, m - 1)[:m] if m < rows.size else np.arange(rows.size)
    head = head[np.lexsort((head, -scores[head]))]  # best first; ties: earliest candidate (source order)
    _, first = np.unique(rows[head], return_index=True)
    head = head[np.sort(first)]
    if exclude.size:
        head = head[~np.isin(rows[head], exclude)]
    head = head[:k]
    return Recommendation(
        rows=rows[head], scores=scores[head].astype(np.float32), facets=facets[head].astype(np.int16),
        clusters=clusters[head], candidates=int(rows.size),
    )


class LearnedIndexRetriever:
    """Trigger-cluster histogram + codebook query path + trending, then exact rerank."""

    name = "index"

    def __init__(self, view: IndexView, params: LearnedIndexParams | None = None) -> None:
        self.view = view
        self.params = params or LearnedIndexParams()

    def query_vector(self, history: np.ndarray) -> np.ndarray:
        recent = history[-self.params.history :]
        return pool_query(self.view.vectors(recent), self.params.recency_decay)

    def recommend(self, query: Query) -> Recommendation:
        view, p = self.view, self.params
        history = np.asarray(query.history, dtype=np.int64)
        if history.size == 0:
            return self._fallback(query)
        q = self.query_vector(history)
        chosen = self._trigger_clusters(history[-p.history :], query)
        chosen.extend(self._query_path_clusters(q))
        pairs = np.asarray(list(dict.fromkeys(chosen)), dtype=np.int64).reshape(-1, 2)  # dedup, order kept
        pairs = pairs[pairs[:, 1] >= 0]
        found, counts = view.members_many(pairs[:, 0], pairs[:, 1], p.members_per_cluster)
        rows, sizes = [found], counts.tolist()
        if p.trending:
            hot = view.trending(p.trending)
            rows.append(hot)
            sizes.append(hot.size)
            pairs = np.vstack([pairs, [[TRENDING_FACET, -1]]])
        if not sum(sizes):
            return self._fallback(query)
        exclude = np.asarray(query.exclude, dtype=np.int64)
        return finish(view, q, np.concatenate(rows), np.repeat(pairs[:, 0], sizes).astype(np.int16),
                      np.repeat(pairs[:, 1], sizes), exclude, query.k)

    def _trigger_clusters(self, triggers: np.ndarray, query: Query) -> list[tuple[int, int]]:
        """The K (facet, cluster) pairs with the most trigger votes, across facets."""
        assigned = self.view.clusters_of(triggers)  # [h, F]
        n_facets = assigned.shape[1]
        facet_ids = np.broadcast_to(np.arange(n_facets), assigned.shape).reshape(-1)
        flat = assigned.reshape(-1)
        valid = flat >= 0
        if not valid.any():
            return []
        # Encode (facet, cluster) as one int64 key so numpy counts votes in one pass.
        keys = flat[valid] * n_facets + facet_ids[valid]
        uniq, counts = np.unique(keys, return_counts=True)
        k = min(self.params.clusters_per_request, uniq.size)
        if query.deterministic:
            pick = np.lexsort((uniq, -counts))[:k]
        else:
            rng = np.random.default_rng(query.seed)
            pick = rng.choice(uniq.size, size=k, replace=False, p=counts / counts.sum())
        return [(int(key % n_facets), int(key // n_facets)) for key in uniq[pick]]

    def _query_path_clusters(self, q: np.ndarray) -> list[tuple[int, int]]:
        """Beam-descend every facet's RQ codebook with the query vector at once; clusters of the best paths.

        A path's score is ``q_f . (c_1 + ... + c_l)``, the query's affinity to the reconstruction so far;
        the beam keeps ``beam`` partial paths per facet and the last level keeps ``query_paths``.
        """
        p = self.params
        if p.query_paths <= 0:
            return []
        books = self.view.codebooks()  # [F, L, M, d]
        n_facets, levels, m, _ = books.shape
        # Level scores are additive: q . (c_1 + c_2) = q . c_1 + q . c_2, so score codewords once.
        word_scores = np.einsum("fd,flmd->flm", q, books)  # [F, L, M]
        paths = np.zeros((n_facets, 1, 0), np.int64)
        partial = np.zeros((n_facets, 1), np.float32)
        for level in range(levels):
            width = p.beam if level < levels - 1 else p.query_paths
            cand = partial[:, :, None] + word_scores[:, level][:, None, :]  # [F, beam, M]
            flat = cand.reshape(n_facets, -1)
            keep = min(width, flat.shape[1])
            best = np.argpartition(-flat, keep - 1, axis=1)[:, :keep] if keep < flat.shape[1] else \
                np.broadcast_to(np.arange(flat.shape[1]), (n_facets, flat.shape[1]))
            parent, word = best // m, best % m
            paths = np.concatenate([np.take_along_axis(paths, parent[:, :, None], axis=1), word[:, :, None]], axis=2)
            partial = np.take_along_axis(flat, best, axis=1)
        out: list[tuple[int, int]] = []
        for facet in range(n_facets):
            out.extend((facet, c) for c in self.view.paths_clusters(facet, paths[facet]).tolist())
        return out

    def _fallback(self, query: Query) -> Recommendation:
        """No history: recently popular items (by prior), flagged as a fallback."""
        n = query.k + int(np.asarray(query.exclude).size)
        rows = self.view.trending(max(n, self.params.trending))
        exclude = np.asarray(query.exclude, dtype=np.int64)
        if exclude.size:
            rows = rows[~np.isin(rows, exclude)]
        rows = rows[: query.k]
        prior = self.view.prior(rows)
        return Recommendation(
            rows=rows, scores=prior.astype(np.float32), facets=np.full(rows.size, TRENDING_FACET, np.int16),
            clusters=np.full(rows.size, -1, np.int64), fallback=True, candidates=int(rows.size),
        )
