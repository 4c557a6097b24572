"""Cluster routing by the query: the clusters whose centroids score highest against each facet's query.

Why (issue 13): on a catalogue learned from a stream, with queries from the encoder for users the learner
never saw, the trigger histogram and the RQ-codebook beam reached few of the true neighbours (100k items:
recall@20 0.54 with ~900 candidates, most of it from the trending source), while ranking the balanced
clusters' own centroids by ``q . centroid`` reached 0.90 with ~1,600 candidates and 0.95 with ~3,600.
The codebook paths are coarse (``M^L ~ items / 32`` codewords, fitted by the learner for its quantised
loss); the split/merge clusters' centroids are where the members actually are.

Scoring every centroid costs ``C x d`` per facet (``C ~ items / 32``), several MB read per request at
10^6 items. Above :data:`GROUP_ABOVE` clusters a facet's centroids are grouped by a small k-means
(``~sqrt(C)`` groups, a two-level tree as ScaNN's partitioner): a request scores the group centroids,
then only the centroids of the best ``groups`` groups. 1,024 (was 4,096) after a measurement on the
learned 100k workload of ``mfli bench serve`` (the default two-member ensemble: 2,662 and 2,592 clusters,
the 200 workload queries): every centroid 44 µs a request; through 16 of 52 groups 21 µs, finding 99.75 %
of the 32 clusters a flat scan picks (12 groups: 12 µs, 99.6 %; 8: 9 µs, 99.0 %).

The router depends only on centroids, which change only at a full pass (items arriving between passes
join existing clusters), so it is built once per cluster version and shared by every request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from mfli.retrieval.kernels import _insert

#: facets with more clusters than this are routed through a two-level tree
GROUP_ABOVE = 1024


@dataclass(frozen=True)
class ClusterRouter:
    """Every facet's cluster centroids, and for big facets a grouping of them (CSR)."""

    centroids: np.ndarray  # float32[sum C_f, d], facet by facet; row - facet_base[f] = cluster id in f
    facet_base: np.ndarray  # int64[F + 1]
    group_centroids: np.ndarray  # float32[sum G_f, d]
    group_base: np.ndarray  # int64[F + 1]: facet f's groups are group_base[f]:group_base[f + 1] (none: flat)
    group_ptr: np.ndarray  # int64[sum G_f + 1]: members of group g are group_members[group_ptr[g]:group_ptr[g+1]]
    group_members: np.ndarray  # int64[...] centroid rows (global)

    @classmethod
    def build(cls, centroids: list[np.ndarray], seed: int = 0, group_above: int = GROUP_ABOVE) -> ClusterRouter:
        """Router over ``centroids[f]`` (float32[C_f, d]) of each facet."""
        dim = next((c.shape[1] for c in centroids if c.ndim == 2), 0)
        flat = np.ascontiguousarray(np.concatenate(centroids) if centroids else np.empty((0, dim)), np.float32)
        facet_base = np.concatenate([[0], np.cumsum([c.shape[0] for c in centroids])]).astype(np.int64)
        g_cents, g_sizes, members, g_base = [], [], [], [0]
        rng = np.random.default_rng(seed)
        for f, c in enumerate(centroids):
            if c.shape[0] > group_above:
                labels, cents = _kmeans(np.ascontiguousarray(c, np.float32), int(math.ceil(math.sqrt(c.shape[0]))), rng)
                order = np.argsort(labels, kind="stable")
                counts = np.bincount(labels, minlength=cents.shape[0])
                keep = counts > 0
                g_cents.append(cents[keep])
                g_sizes.append(counts[keep])
                members.append(order + facet_base[f])
                g_base.append(g_base[-1] + int(keep.sum()))
            else:
                g_base.append(g_base[-1])
        group_ptr = np.concatenate([[0], np.cumsum(np.concatenate(g_sizes))]) if g_sizes else np.zeros(1)
        return cls(
            centroids=flat, facet_base=facet_base,
            group_centroids=np.ascontiguousarray(np.concatenate(g_cents) if g_cents else np.empty((0, dim)),
                                                 np.float32),
            group_base=np.asarray(g_base, np.int64), group_ptr=group_ptr.astype(np.int64),
            group_members=np.concatenate(members).astype(np.int64) if members else np.empty(0, np.int64),
        )

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.centroids, self.facet_base, self.group_centroids, self.group_base,
                                          self.group_ptr, self.group_members)))

    def probe(self, q: np.ndarray, clusters: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
        """(facets, clusters) of the ``clusters`` best clusters of every facet for queries ``q`` [F, d]."""
        return probe_clusters(self.centroids, self.facet_base, self.group_centroids, self.group_base, self.group_ptr,
                              self.group_members, np.ascontiguousarray(q, np.float32), clusters, groups)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids) of a small Lloyd's k-means (inner-product assignment on normalised data is not
    assumed: L2, as the clusters themselves are built)."""
    cents = x[rng.choice(x.shape[0], size=k, replace=False)].copy()
    with threadpool_limits(1):
        for _ in range(iters):
            labels = np.argmin(np.einsum("kd,kd->k", cents, cents)[None, :] - 2.0 * (x @ cents.T), axis=1)
            counts = np.bincount(labels, minlength=k)
            sums = np.zeros_like(cents)
            np.add.at(sums, labels, x)
            nonempty = counts > 0
            cents[nonempty] = sums[nonempty] / counts[nonempty, None]
        labels = np.argmin(np.einsum("kd,kd->k", cents, cents)[None, :] - 2.0 * (x @ cents.T), axis=1)
    return labels.astype(np.int64), cents.astype(np.float32)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _dot(a: np.ndarray, i: int, q: np.ndarray, f: int) -> np.float32:
    s = np.float32(0.0)
    for j in range(q.shape[1]):
        s += a[i, j] * q[f, j]
    return s


@njit(cache=True, nogil=True, fastmath=True)
def _scores(a: np.ndarray, lo: int, hi: int, q: np.ndarray, f: int, out: np.ndarray) -> None:
    """``out[c - lo] = a[c] . q[f]`` for rows ``lo:hi``, four rows at a time: four independent sums share
    each load of ``q`` (one row at a time, the single sum's dependency chain bounds the loop)."""
    n, d = hi - lo, q.shape[1]
    qf = q[f]
    c = 0
    while c + 4 <= n:
        r = lo + c
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for j in range(d):
            qj = qf[j]
            s0 += a[r, j] * qj
            s1 += a[r + 1, j] * qj
            s2 += a[r + 2, j] * qj
            s3 += a[r + 3, j] * qj
        out[c] = s0
        out[c + 1] = s1
        out[c + 2] = s2
        out[c + 3] = s3
        c += 4
    while c < n:
        out[c] = _dot(a, lo + c, q, f)
        c += 1


@njit(cache=True, nogil=True, inline="always")
def _keep(idx: np.ndarray, vals: np.ndarray, filled: int, i: int, v: np.float32) -> int:
    """Insert ``(i, v)`` into the descending top list ``idx/vals`` (earlier wins ties); returns the fill."""
    if filled == idx.shape[0] and v <= vals[filled - 1]:
        return filled
    return _insert(idx, vals, filled, i, v)


@njit(cache=True, nogil=True, fastmath=True)
def probe_clusters(centroids: np.ndarray, facet_base: np.ndarray, group_centroids: np.ndarray,
                   group_base: np.ndarray, group_ptr: np.ndarray, group_members: np.ndarray, q: np.ndarray,
                   clusters: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``clusters`` clusters of each facet by ``q_f . centroid`` (facets, cluster ids), best first
    within a facet; through the best ``groups`` groups where the facet has them."""
    n_facets = q.shape[0]
    out_f = np.empty(n_facets * clusters, np.int64)
    out_c = np.empty(n_facets * clusters, np.int64)
    top = np.empty(clusters, np.int64)
    top_s = np.empty(clusters, np.float32)
    n = 0
    for f in range(n_facets):
        filled = 0
        g0, g1 = group_base[f], group_base[f + 1]
        if g1 > g0:
            keep = min(groups, g1 - g0)
            gi = np.empty(keep, np.int64)
            gs = np.empty(keep, np.float32)
            gf = 0
            for g in range(g0, g1):
                gf = _keep(gi, gs, gf, g, _dot(group_centroids, g, q, f))
            for t in range(gf):
                g = gi[t]
                for m in range(group_ptr[g], group_ptr[g + 1]):
                    c = group_members[m]
                    filled = _keep(top, top_s, filled, c, _dot(centroids, c, q, f))
        else:
            lo, hi = facet_base[f], facet_base[f + 1]
            scores = np.empty(hi - lo, np.float32)
            _scores(centroids, lo, hi, q, f, scores)
            for c in range(hi - lo):
                filled = _keep(top, top_s, filled, lo + c, scores[c])
        for t in range(filled):
            out_f[n] = f
            out_c[n] = top[t] - facet_base[f]
            n += 1
    return out_f[:n], out_c[:n]
