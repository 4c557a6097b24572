"""The facet-cluster model shared by the in-memory index (evaluation) and the LMDB indexer
(docs/design.md §Index).

Per facet, an item's residual-quantisation code path (tuple of L codeword ids) is its *base cluster*.
Raw paths are badly balanced (a few paths hold thousands of items, most hold a handful), so a build
pass **splits** clusters above ``b_upp`` by k-means on their members' residuals into about
``size / target`` parts, and **merges** clusters below ``b_low`` into the nearest cluster (by centroid)
of the same facet. The paper reports this balancing as its most important ablation.

After balancing, a path maps to one or more clusters (several after a split; after a merge several paths
share one cluster). :meth:`FacetClusters.assign` places an item: the clusters of its path, then the
nearest centroid among them; a path never seen falls back to the clusters of its longest known prefix,
and finally to the globally nearest centroid. The build's final assignment *is* ``assign()`` with the
final centroids, so re-assigning an unchanged member always reproduces its cluster (the indexer relies
on this to detect drift: an item moves only when its cluster really changed).

Everything is vectorised numpy so a full pass handles 10^6 items x 3 facets in seconds. The many small
k-means problems run with BLAS limited to one thread: on a busy 2-core box, multi-threaded OpenBLAS
spin-waits on small matrices and was measured 7-80x slower than single-threaded there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

#: k-means on one cluster never uses more parts than this at once; bigger splits recurse (cost stays
#: O(n * KMEANS_MAX_K * d) instead of O(n^2 / target)).
KMEANS_MAX_K = 64
KMEANS_ITERS = 6
#: rows of a distance block; bounds temporary memory to about BLOCK x C floats
_BLOCK = 4096


#: bits per level in a path key. Fixed (not the codebook size M) because the learner grows M with the
#: catalogue: keys must mean the same path before and after a codebook with more codewords arrives.
PATH_BITS = 15
PATH_RADIX = 1 << PATH_BITS
#: a path key of any facet in one int64 (readers' path maps): ``facet << FACET_SHIFT | path key``
FACET_SHIFT = 60


def path_keys(codes: np.ndarray) -> np.ndarray:
    """int64 key per code path (radix 2^15 per level, level 0 most significant): a cheap sortable id.

    Supports up to 4 levels of up to 32768 codewords.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim == 1:
        codes = codes[None, :]
    if codes.shape[1] * PATH_BITS > 62 or (codes.size and (codes.max() >= PATH_RADIX or codes.min() < 0)):
        raise ValueError(
            f"code paths need <= 4 levels of codes in [0, {PATH_RADIX}), got shape {codes.shape}")
    keys = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(codes.shape[1]):
        keys = (keys << PATH_BITS) | codes[:, level]
    return keys


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the L2-nearest centroid for each row of ``x``, in row blocks (bounded memory)."""
    out = np.empty(x.shape[0], dtype=np.int64)
    c_sq = np.einsum("cd,cd->c", centroids, centroids)
    for start in range(0, x.shape[0], _BLOCK):
        block = x[start : start + _BLOCK]
        out[start : start + _BLOCK] = np.argmin(c_sq[None, :] - 2.0 * (block @ centroids.T), axis=1)
    return out


def _csr_nearest(
    vectors: np.ndarray, groups: np.ndarray, ptr: np.ndarray, ids: np.ndarray, centroids: np.ndarray
) -> np.ndarray:
    """Nearest centroid per item among its candidate list ``ids[ptr[g]:ptr[g+1]]`` (g = groups[i]).

    Items whose list has one entry are assigned directly. For the rest: when many items share few
    lists (a full pass), one small matmul per list; otherwise (a delta batch) the lists are padded to
    a common width and scored in chunks, so there is no Python loop over items.
    """
    width = ptr[groups + 1] - ptr[groups]
    out = np.empty(groups.shape[0], dtype=np.int64)
    single = width == 1
    out[single] = ids[ptr[groups[single]]]
    multi = np.flatnonzero(~single)
    if multi.size == 0:
        return out
    c_sq = np.einsum("cd,cd->c", centroids, centroids)
    uniq, inverse = np.unique(groups[multi], return_inverse=True)
    if multi.size >= 16 * uniq.size:
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=uniq.size))])
        for j, g in enumerate(uniq.tolist()):
            items = multi[order[bounds[j] : bounds[j + 1]]]
            cand = ids[ptr[g] : ptr[g + 1]]
            dist = c_sq[cand][None, :] - 2.0 * (vectors[items] @ centroids[cand].T)
            out[items] = cand[np.argmin(dist, axis=1)]
        return out
    # bucket by width (powers of two) so one wide list does not pad every item to its width
    bucket = np.ceil(np.log2(width[multi])).astype(np.int64)
    for b in np.unique(bucket):
        sel = multi[bucket == b]
        _pad_nearest(vectors, groups, ptr, ids, centroids, c_sq, width, sel, out)
    return out


def _pad_nearest(vectors, groups, ptr, ids, centroids, c_sq, width, items, out) -> None:
    w_max = int(width[items].max())
    chunk = max(1, (1 << 18) // w_max)
    offs = np.arange(w_max)
    for start in range(0, items.size, chunk):
        idx = items[start : start + chunk]
        g = groups[idx]
        pos = ptr[g][:, None] + offs[None, :]
        valid = offs[None, :] < width[idx][:, None]
        cand = ids[np.where(valid, pos, ptr[g][:, None])]  # pad with the first candidate
        dots = np.einsum("nwd,nd->nw", centroids[cand], vectors[idx])
        dist = np.where(valid, c_sq[cand] - 2.0 * dots, np.inf)
        out[idx] = cand[np.arange(idx.size), np.argmin(dist, axis=1)]


@dataclass
class FacetClusters:
    """Clusters of one facet: centroids, sizes and the code-path -> clusters map (CSR, sorted by key)."""

    levels: int
    codewords: int  # M of the codebook the clusters were built with (informational; keys do not use it)
    centroids: np.ndarray  # float32[C, d]
    sizes: np.ndarray  # int64[C]
    path_key: np.ndarray  # int64[P] sorted unique path keys
    path_ptr: np.ndarray  # int64[P + 1]
    path_ids: np.ndarray  # int64[path_ptr[-1]] cluster ids, per path ascending
    _prefix_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def from_pairs(
        cls, levels: int, codewords: int, centroids: np.ndarray, sizes: np.ndarray, keys: np.ndarray,
        clusters: np.ndarray,
    ) -> FacetClusters:
        """Build the path map from (path key, cluster) pairs (duplicates allowed)."""
        keys, clusters = keys.astype(np.int64), clusters.astype(np.int64)
        width = int(clusters.max(initial=0)) + 1
        combined = np.unique(keys * width + clusters)  # 1-D unique: far faster than unique(axis=0)
        pair_keys, pair_ids = combined // width, combined % width
        uniq, counts = np.unique(pair_keys, return_counts=True)
        ptr = np.zeros(uniq.size + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        return cls(
            levels, codewords, np.ascontiguousarray(centroids, dtype=np.float32), sizes.astype(np.int64),
            uniq, ptr, np.ascontiguousarray(pair_ids),
        )

    def keys_of(self, codes: np.ndarray) -> np.ndarray:
        return path_keys(codes)

    def path_clusters(self, path: tuple[int, ...] | np.ndarray) -> np.ndarray:
        """int64 clusters a code path maps to (empty if no item was ever seen on it)."""
        key = int(path_keys(np.asarray(path, dtype=np.int64))[0])
        i = int(np.searchsorted(self.path_key, key))
        if i < self.path_key.size and self.path_key[i] == key:
            return self.path_ids[self.path_ptr[i] : self.path_ptr[i + 1]].copy()
        return np.empty(0, dtype=np.int64)

    def _prefix_map(self, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR map of depth-``depth`` prefix keys -> union of the clusters of the paths below them."""
        if depth not in self._prefix_cache:
            scale = PATH_RADIX ** (self.levels - depth)
            per_path = np.repeat(self.path_key // scale, np.diff(self.path_ptr))
            tmp = FacetClusters.from_pairs(
                self.levels, self.codewords, self.centroids[:0], self.sizes[:0], per_path, self.path_ids
            )
            self._prefix_cache[depth] = (tmp.path_key, tmp.path_ptr, tmp.path_ids)
        return self._prefix_cache[depth]

    def assign(self, codes: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """int64[n] cluster per item: its path's clusters, else longest known prefix, else global nearest."""
        codes = np.asarray(codes)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n = codes.shape[0]
        out = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return out
        if self.n_clusters == 0:
            raise ValueError("cannot assign items: this facet has no clusters (run a full pass first)")
        keys = path_keys(codes)
        todo = np.arange(n)
        for depth in range(self.levels, 0, -1):
            if depth == self.levels:
                map_key, map_ptr, map_ids = self.path_key, self.path_ptr, self.path_ids
                k = keys[todo]
            else:
                map_key, map_ptr, map_ids = self._prefix_map(depth)
                k = keys[todo] // (PATH_RADIX ** (self.levels - depth))
            if map_key.size == 0:
                continue
            pos = np.minimum(np.searchsorted(map_key, k), map_key.size - 1)
            hit = map_key[pos] == k
            if hit.any():
                sel = todo[hit]
                out[sel] = _csr_nearest(vectors[sel], pos[hit], map_ptr, map_ids, self.centroids)
            todo = todo[~hit]
            if todo.size == 0:
                return out
        out[todo] = _nearest(vectors[todo], self.centroids)
        return out


# --------------------------------------------------------------------------------------------------
# build: base clusters from paths, then split / merge rounds


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = KMEANS_ITERS) -> np.ndarray:
    """Labels of a small Lloyd's k-means (random distinct seeds, empty parts keep their old centroid)."""
    n = x.shape[0]
    if k <= 1 or n <= k:
        return np.arange(n, dtype=np.int64) % max(k, 1) if n <= k else np.zeros(n, dtype=np.int64)
    centroids = x[rng.choice(n, size=k, replace=False)].copy()
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        labels = _nearest(x, centroids)
        onehot = np.zeros((k, n), dtype=np.float32)
        onehot[labels, np.arange(n)] = 1.0
        counts = onehot.sum(axis=1)
        sums = onehot @ x
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    return _nearest(x, centroids)


def _split_labels(x: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Partition rows into about ceil(n / target) parts, recursing when that exceeds KMEANS_MAX_K."""
    n = x.shape[0]
    k = math.ceil(n / target)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if k <= KMEANS_MAX_K:
        return _kmeans(x, k, rng)
    coarse = _kmeans(x, KMEANS_MAX_K, rng)
    labels = np.empty(n, dtype=np.int64)
    next_id = 0
    for part in range(KMEANS_MAX_K):
        idx = np.flatnonzero(coarse == part)
        if idx.size == 0:
            continue
        sub = _split_labels(x[idx], target, rng)
        labels[idx] = sub + next_id
        next_id += int(sub.max()) + 1
    return labels


def _cluster_means(assign: np.ndarray, vectors: np.ndarray, n_clusters: int) -> np.ndarray:
    counts = np.bincount(assign, minlength=n_clusters)
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nonempty = counts > 0
    sums = np.zeros((n_clusters, vectors.shape[1]), dtype=np.float32)
    sums[nonempty] = np.add.reduceat(vectors[order], starts[nonempty], axis=0)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def _reconstruct(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    recon = np.zeros((codes.shape[0], codebook.shape[2]), dtype=np.float32)
    for level in range(codebook.shape[0]):
        recon += codebook[level, codes[:, level]]
    return recon


def _split_round(assign, codes, vectors, codebook, target, b_upp, rng) -> tuple[np.ndarray, int]:
    sizes = np.bincount(assign)
    big = np.flatnonzero(sizes > b_upp)
    if big.size == 0:
        return assign, 0
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    assign = assign.copy()
    next_id = sizes.size
    for c in big:
        members = order[starts[c] : starts[c + 1]]
        residual = vectors[members] - _reconstruct(codes[members], codebook)
        labels = _split_labels(residual, target, rng)
        # part 0 keeps the old id so ids stay stable; other parts get fresh ids
        fresh = labels > 0
        assign[members[fresh]] = next_id + labels[fresh] - 1
        next_id += int(labels.max())
    return assign, int(big.size)


def _merge_round(assign, vectors, b_low) -> tuple[np.ndarray, int]:
    sizes = np.bincount(assign)
    small = np.flatnonzero((sizes > 0) & (sizes < b_low))
    receivers = np.flatnonzero(sizes >= b_low)
    if small.size == 0:
        return assign, 0
    if receivers.size == 0:  # tiny catalogue: everything merges into the largest cluster's neighbourhood
        receivers = np.array([int(np.argmax(sizes))])
        small = small[small != receivers[0]]
    centroids = _cluster_means(assign, vectors, sizes.size)
    target = receivers[_nearest(centroids[small], centroids[receivers])]
    mapping = np.arange(sizes.size, dtype=np.int64)
    mapping[small] = target
    return mapping[assign], int(small.size)


def _balance(assign, codes, vectors, codebook, target, b_low, b_upp, rng, max_rounds) -> np.ndarray:
    """Split/merge rounds until no cluster is out of bounds or ``max_rounds`` is reached."""
    for round_no in range(max_rounds):
        assign, n_split = _split_round(assign, codes, vectors, codebook, target, b_upp, rng)
        assign, n_merged = _merge_round(assign, vectors, b_low)
        log.debug("round %d: split %d, merged %d", round_no, n_split, n_merged)
        if n_split == 0 and n_merged == 0:
            break
    return assign


def build_facet_clusters(
    codes: np.ndarray,
    vectors: np.ndarray,
    codebook: np.ndarray,
    target: int,
    b_low: int,
    b_upp: int,
    split_merge: bool = True,
    seed: int = 0,
    max_rounds: int = 4,
) -> tuple[FacetClusters, np.ndarray]:
    """Clusters of one facet from its items' codes ``int[n, L]`` and vectors ``float32[n, d]``.

    ``codebook`` is ``float32[L, M, d]`` (residuals for splitting are vector minus RQ reconstruction).
    With ``split_merge=False`` the clusters are the raw code paths (the ablation). Deterministic for a
    given ``seed``. Returns the clusters and the int64[n] assignment (equal to ``assign(codes, vectors)``).
    """
    codes = np.asarray(codes, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    levels, codewords = codebook.shape[0], codebook.shape[1]
    if codes.shape != (vectors.shape[0], levels):
        raise ValueError(f"codes must be int[n={vectors.shape[0]}, L={levels}], got {codes.shape}")
    if not 0 < b_low <= target <= b_upp:
        raise ValueError(f"need 0 < b_low ({b_low}) <= target ({target}) <= b_upp ({b_upp})")
    keys = path_keys(codes)
    if vectors.shape[0] == 0:
        empty = np.empty(0, dtype=np.int64)
        fc = FacetClusters.from_pairs(levels, codewords, np.empty((0, vectors.shape[1]), np.float32), empty,
                                      empty, empty)
        return fc, empty
    _, assign = np.unique(keys, return_inverse=True)
    assign = assign.astype(np.int64).ravel()
    if split_merge:
        rng = np.random.default_rng(seed)
        with threadpool_limits(limits=1, user_api="blas"):
            assign = _balance(assign, codes, vectors, codebook, target, b_low, b_upp, rng, max_rounds)
    _, assign = np.unique(assign, return_inverse=True)
    assign = assign.astype(np.int64).ravel()
    n_clusters = int(assign.max()) + 1
    centroids = _cluster_means(assign, vectors, n_clusters)
    # Final assignment = assign() under the final centroids, so members always reproduce their cluster.
    draft = FacetClusters.from_pairs(levels, codewords, centroids, np.bincount(assign), keys, assign)
    with threadpool_limits(limits=1, user_api="blas"):
        final = draft.assign(codes, vectors)
    used, final = np.unique(final, return_inverse=True)
    final = final.astype(np.int64).ravel()
    fc = FacetClusters.from_pairs(
        levels, codewords, centroids[used], np.bincount(final, minlength=used.size), keys, final
    )
    return fc, final
