"""The learned-index retrieval path (docs/design.md §Serving): cluster lookup and exact rerank, no ANN search.

For a request with trigger items (the user's recent history):

1. **Trigger path** (the paper's): each trigger's cluster in every facet votes; the K clusters with the
   most votes (or K sampled in proportion to votes) are chosen.
2. **Query path** (ours): the pooled query vector is scored against each facet's codewords and the best
   few code paths are descended by beam search; their clusters join. This reaches clusters none of the
   triggers sit in, which matters once a user's trigger clusters are exhausted by seen items.
3. **Trending source**: the items with the highest popularity prior, so recently popular items are
   reachable even when no trigger points at them (the popularity prior, docs/design.md §Model, is where
   much of the recall is).
4. Gather up to N_k members per chosen cluster, drop excluded rows, rerank the union by the exact score
   (the facet mixture of :func:`~mfli.retrieval.base.score` plus the prior) and return the top k with the
   facet/cluster each came from.

The query path descends each facet's codebook with *that facet's* query, so the facets' indexes
return different neighbours when the encoder's facet queries differ.

The class only talks to an :class:`~mfli.retrieval.base.IndexView`, so it runs unchanged over the
in-memory view (evaluation) and the LMDB view (server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mfli.retrieval.base import (
    TRENDING_FACET,
    IndexView,
    Query,
    Recommendation,
    resolve_query,
    score,
    uniform_gates,
)
from mfli.retrieval.kernels import (
    beam_paths,
    pool_rows,
    rerank_top_k,
    seen_scratch,
    top_voted_clusters,
    unique_pairs,
)


@dataclass(frozen=True)
class LearnedIndexParams:
    """Knobs of the index path; defaults mirror :class:`mfli.config.ServeSettings`."""

    clusters_per_request: int = 8  # K, over all facets, from the trigger histogram
    members_per_cluster: int = 256  # N_k
    query_paths: int = 0  # paths descended per facet by the query path
    beam: int = 4  # level-1 codewords kept per facet while descending
    trending: int = 200
    history: int = 50  # H: triggers pooled into the query vector
    recency_decay: float = 0.97
    probe_clusters: int = 96  # clusters per facet routed by q . centroid (mfli.retrieval.router); 0 = off
    probe_groups: int = 16  # centroid groups scored first where a facet has them

    @classmethod
    def from_settings(cls, serve, model) -> LearnedIndexParams:
        return cls(
            clusters_per_request=serve.clusters_per_request,
            members_per_cluster=serve.members_per_cluster,
            query_paths=serve.query_paths,
            trending=serve.trending,
            probe_clusters=serve.probes_per_facet(model.members),
            probe_groups=serve.probe_groups,
            history=model.history,
            recency_decay=model.recency_decay,
        )


#: the compiled rerank's int8 pass keeps this many times k candidates (+16) for the exact float32 pass
SHORTLIST_FACTOR = 4
_NO_PAIRS = (np.empty(0, np.int64), np.empty(0, np.int64))


def empty_recommendation(fallback: bool = False) -> Recommendation:
    return Recommendation(
        rows=np.empty(0, np.int64), scores=np.empty(0, np.float32), facets=np.empty(0, np.int16),
        clusters=np.empty(0, np.int64), fallback=fallback,
    )


def finish(
    view: IndexView, q: np.ndarray, rows: np.ndarray, slots: np.ndarray | None, facets: np.ndarray,
    clusters: np.ndarray, ends: np.ndarray, exclude: np.ndarray, k: int,
    log_gates: np.ndarray | None = None, tau: float = 0.05,
) -> Recommendation:
    """Rerank candidates exactly and keep the top k distinct, non-excluded rows (first source wins).

    ``rows`` are the candidates of source ``i`` (facet ``facets[i]``, cluster ``clusters[i]``) at
    positions ``ends[i - 1]:ends[i]``; the answer reports each row's source. ``slots`` locate the
    candidates' int8 codes in :meth:`~mfli.retrieval.base.IndexView.dense` (None: by row).

    With the view's vectors dense in memory this is one compiled pass (:mod:`mfli.retrieval.kernels`);
    otherwise :func:`finish_numpy`, the reference it is tested against.
    """
    if rows.size == 0:
        return empty_recommendation()
    dense = view.dense()
    if dense is None:
        source = np.repeat(np.arange(ends.size), np.diff(ends, prepend=0))
        return finish_numpy(view, q, rows, facets[source], clusters[source], exclude, k, log_gates, tau)
    rows = rows.astype(np.int64, copy=False)
    if slots is None:
        slots = rows + dense.row_slot
    pos, scores = np.empty(k, np.int64), np.empty(k, np.float32)
    gates = uniform_gates(view.facets) if log_gates is None else np.ascontiguousarray(log_gates, np.float32)
    if math.isinf(tau):  # the linear pool is one dot with the gate-scaled queries: the kernel's one-facet path
        q = np.asarray(q, np.float32).reshape(gates.size, -1) * np.exp(gates)[:, None]
        gates = np.zeros(1, np.float32)
    n = rerank_top_k(dense.vectors, dense.prior, dense.codes, dense.scale, dense.bias,
                     np.ascontiguousarray(q, np.float32).reshape(-1), gates, np.float32(tau),
                     rows, slots, np.unique(exclude.astype(np.int64, copy=False)), k, SHORTLIST_FACTOR * k + 16,
                     pos, scores, seen_scratch(dense.vectors.shape[0]))
    pos = pos[:n]
    source = np.searchsorted(ends, pos, side="right")
    return Recommendation(rows=rows[pos], scores=scores[:n], facets=facets[source].astype(np.int16),
                          clusters=clusters[source], candidates=int(rows.size))


def finish_numpy(
    view: IndexView, q: np.ndarray, rows: np.ndarray, facets: np.ndarray, clusters: np.ndarray,
    exclude: np.ndarray, k: int, log_gates: np.ndarray | None = None, tau: float = 0.05,
) -> Recommendation:
    """numpy rerank: gather, score, keep the best few, then drop duplicates and excluded rows.

    Candidates may repeat (an item sits in one cluster per facet and may also be trending). Scoring the
    repeats costs less than de-duplicating thousands of rows first, and only the best few can reach the
    answer: each row repeats at most F + 1 times, so the top ``(k + |exclude|) * (F + 1)`` scores always
    contain the top k distinct, non-excluded rows. Among equal rows the first source wins.
    """
    if rows.size == 0:
        return empty_recommendation()
    scores = score(q, view.vectors(rows), view.prior(rows), log_gates, tau)
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

    def query_vector(self, query: Query) -> tuple[np.ndarray, np.ndarray, float]:
        """(queries ``[F, d]``, log gates, tau) of the request (:func:`~mfli.retrieval.base.resolve_query`)."""
        model = self.view.query_model()
        dense = self.view.dense()
        if query.vector is None and (model is None or not model.weights) and dense is not None:
            # mean pooling (no encoder published), compiled, reading the rows in place
            recent = np.asarray(query.history, dtype=np.int64)[-self.params.history :]
            q = pool_rows(dense.vectors, recent, self.params.recency_decay, self.view.facets)
            return q, uniform_gates(self.view.facets), model.score_tau if model is not None else 0.05
        return resolve_query(self.view, query, model, self.params.history, self.params.recency_decay)

    def recommend(self, query: Query) -> Recommendation:
        view, p = self.view, self.params
        history = np.asarray(query.history, dtype=np.int64)
        if history.size == 0:
            return self._fallback(query)
        q, gates, tau = self.query_vector(query)
        trig_f, trig_c = self._trigger_clusters(history[-p.history :], query) if p.clusters_per_request else _NO_PAIRS
        path_f, path_c = self._query_path_clusters(q)
        probe_f, probe_c = self._probed_clusters(q)
        facets, clusters = unique_pairs(np.concatenate([probe_f, trig_f, path_f]),
                                        np.concatenate([probe_c, trig_c, path_c]))
        rows, counts, slots = view.members_many(facets, clusters, p.members_per_cluster)
        dense = view.dense()
        if dense is None:
            slots = None
        if p.trending:
            hot = view.trending(p.trending)
            if slots is not None and dense is not None:
                slots = np.concatenate([slots, hot + dense.row_slot])
            rows = np.concatenate([rows, hot])
            facets = np.append(facets, TRENDING_FACET)
            clusters = np.append(clusters, -1)
            counts = np.append(counts, hot.size)
        if rows.size == 0:
            return self._fallback(query)
        exclude = np.asarray(query.exclude, dtype=np.int64)
        return finish(view, q, rows, slots, facets, clusters, np.cumsum(counts), exclude, query.k, gates, tau)

    def _trigger_clusters(self, triggers: np.ndarray, query: Query) -> tuple[np.ndarray, np.ndarray]:
        """(facets, clusters) of the K pairs with the most trigger votes, across facets."""
        assigned = np.ascontiguousarray(self.view.clusters_of(triggers), dtype=np.int64)  # [h, F]
        if query.deterministic:
            return top_voted_clusters(assigned, self.params.clusters_per_request)
        n_facets = assigned.shape[1]
        facet_ids = np.broadcast_to(np.arange(n_facets), assigned.shape).reshape(-1)
        flat = assigned.reshape(-1)
        valid = flat >= 0
        # Encode (facet, cluster) as one int64 key so numpy counts votes in one pass.
        uniq, counts = np.unique(flat[valid] * n_facets + facet_ids[valid], return_counts=True)
        k = min(self.params.clusters_per_request, uniq.size)
        rng = np.random.default_rng(query.seed)
        picked = uniq[rng.choice(uniq.size, size=k, replace=False, p=counts / counts.sum())] if k else uniq
        return picked % n_facets, picked // n_facets

    def _query_path_clusters(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Beam-descend every facet's RQ codebook with the query vector; (facets, clusters) of the best paths.

        A path's score is ``q_f . (c_1 + ... + c_l)``, the query's affinity to the reconstruction so far;
        the beam keeps ``beam`` partial paths per facet and the last level keeps ``query_paths``.
        """
        p = self.params
        if p.query_paths <= 0:
            return _NO_PAIRS
        books = self.view.codebooks()  # [F, L, M, d]
        n_facets, levels, m, dim = books.shape
        # Level scores are additive: q . (c_1 + c_2) = q . c_1 + q . c_2, so score codewords once.
        word_scores = np.matmul(books.reshape(n_facets, levels * m, dim), q[:, :, None]).reshape(n_facets, levels, m)
        paths = beam_paths(word_scores.astype(np.float32, copy=False), p.beam, p.query_paths)
        return self.view.paths_clusters(paths)

    def _probed_clusters(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(facets, clusters) of each facet's ``probe_clusters`` best clusters by ``q_f . centroid``."""
        p = self.params
        router = self.view.router() if p.probe_clusters > 0 and hasattr(self.view, "router") else None
        if router is None:
            return _NO_PAIRS
        return router.probe(q, p.probe_clusters, p.probe_groups)

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
