"""An in-memory :class:`~mfli.retrieval.base.IndexView` built from an :class:`ItemSnapshot`.

Evaluation and benchmarks use it to run the learned-index path without LMDB. It builds clusters with
the same code (:mod:`mfli.retrieval.clusters`, split/merge included) as the indexer's full pass, so a
recall measured here is the recall the LMDB index serves on the same state.

Posting lists are one CSR layout per facet: rows sorted by (cluster, descending prior), plus offsets.
``members(f, c, limit)`` is then a slice, and truncating to N_k keeps the most popular members.
"""

from __future__ import annotations

import numpy as np

from mfli.retrieval.base import DenseColumns, quantize_rows
from mfli.retrieval.clusters import FACET_SHIFT, PATH_BITS, FacetClusters, build_facet_clusters
from mfli.retrieval.kernels import gather_members, lookup_paths
from mfli.retrieval.router import ClusterRouter
from mfli.retrieval.snapshot import ItemSnapshot


class MemoryIndexView:
    """Clusters, posting lists and priors of one snapshot, held in numpy arrays."""

    def __init__(
        self,
        snapshot: ItemSnapshot,
        target: int = 32,
        b_low: int = 8,
        b_upp: int = 256,
        split_merge: bool = True,
        seed: int = 0,
    ) -> None:
        self.snapshot = snapshot
        self.facets, self.dim, self.levels = snapshot.facets, snapshot.dim, snapshot.levels
        self._vectors = snapshot.vectors
        self._flat = np.ascontiguousarray(snapshot.vectors, dtype=np.float32).reshape(snapshot.n_items, -1)
        self._prior = snapshot.prior.astype(np.float32, copy=False)
        self._codebooks = snapshot.codebooks
        self._query_model = snapshot.query_model
        live = snapshot.live_rows()
        self._live = live
        self._assign = np.full((snapshot.n_items, self.facets), -1, dtype=np.int64)
        self.clusters: list[FacetClusters] = []
        self._sorted_rows: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for f in range(self.facets):
            fc, assign = build_facet_clusters(
                snapshot.codes[live, f], snapshot.vectors[live, f], snapshot.codebooks[f],
                target=target, b_low=b_low, b_upp=b_upp, split_merge=split_merge, seed=seed + f,
            )
            self.clusters.append(fc)
            self._assign[live, f] = assign
            order = np.lexsort((-self._prior[live], assign))
            self._sorted_rows.append(live[order])
            counts = np.bincount(assign, minlength=len(fc.centroids))
            self._offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        self._trending = live[np.argsort(-self._prior[live], kind="stable")]
        # One CSR over all facets for batched gathers: global cluster id = facet base + cluster.
        self._all_rows = np.concatenate(self._sorted_rows) if self._sorted_rows else np.empty(0, np.int64)
        row_base = np.cumsum([0] + [r.size for r in self._sorted_rows])
        self._cluster_base = np.cumsum([0] + [o.size - 1 for o in self._offsets]).astype(np.int64)
        # row_base has one entry more than there are facets (its total): zip stops at the facets
        self._gstart = np.concatenate(
            [o[:-1] + b for o, b in zip(self._offsets, row_base, strict=False)]).astype(np.int64)
        self._gend = np.concatenate([o[1:] + b for o, b in zip(self._offsets, row_base, strict=False)]).astype(np.int64)
        # One path map over all facets (key = facet << FACET_SHIFT | path key): one lookup per request.
        if self.facets > 7 or self.levels * PATH_BITS > FACET_SHIFT:
            raise ValueError("the in-memory index supports at most 7 facets and 4 levels")
        self._path_key = np.concatenate(
            [(np.int64(f) << FACET_SHIFT) | fc.path_key for f, fc in enumerate(self.clusters)]
            or [np.empty(0, np.int64)])
        self._path_ptr = np.concatenate([[0]] + [fc.path_ptr[1:] + base for fc, base in zip(
            self.clusters, np.cumsum([0] + [fc.path_ids.size for fc in self.clusters]), strict=False)]).astype(np.int64)
        self._path_ids = np.concatenate([fc.path_ids for fc in self.clusters] or [np.empty(0, np.int64)])
        # int8 codes laid out posting list by posting list (every member of a cluster is read in one
        # sequential run, the IVF layout), then once more by row for candidates outside posting lists
        # (trending): slot of row r = row_slot + r. About (F + 1) * F * d bytes per item.
        self._router = ClusterRouter.build([fc.centroids for fc in self.clusters], seed=seed)
        codes, scale = quantize_rows(self._flat)
        self._dense = DenseColumns(
            vectors=self._flat, prior=self._prior, codes=np.concatenate([codes[self._all_rows], codes]),
            scale=np.concatenate([scale[self._all_rows], scale]),
            bias=np.concatenate([self._prior[self._all_rows], self._prior]), row_slot=int(self._all_rows.size),
        )

    @classmethod
    def from_settings(cls, snapshot: ItemSnapshot, index_settings, seed: int = 0) -> MemoryIndexView:
        return cls(
            snapshot, target=index_settings.target_cluster_size, b_low=index_settings.b_low,
            b_upp=index_settings.b_upp, split_merge=index_settings.split_merge, seed=seed,
        )

    # --- IndexView ------------------------------------------------------------------------------------
    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[rows]

    def prior(self, rows: np.ndarray) -> np.ndarray:
        return self._prior[rows]

    def clusters_of(self, rows: np.ndarray) -> np.ndarray:
        return self._assign[rows]

    def members(self, facet: int, cluster: int, limit: int) -> np.ndarray:
        offsets = self._offsets[facet]
        if cluster < 0 or cluster + 1 >= offsets.size:
            return np.empty(0, np.int64)
        start, end = offsets[cluster], offsets[cluster + 1]
        return self._sorted_rows[facet][start : min(end, start + limit)]

    def members_many(
        self, facets: np.ndarray, clusters: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batched :meth:`members`: (rows of all pairs concatenated, count per pair, their code slots)."""
        g = self._cluster_base[facets] + clusters
        starts = self._gstart[g]
        counts = np.minimum(self._gend[g] - starts, limit)
        rows, slots = gather_members(self._all_rows, starts, counts)
        return rows, counts, slots

    def paths_clusters(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`path_clusters` for paths ``[F, p, L]`` of every facet: (facets, clusters)."""
        return lookup_paths(self._path_key, self._path_ptr, self._path_ids, paths, PATH_BITS)

    def query_model(self):
        return self._query_model

    def codebooks(self) -> np.ndarray:
        return self._codebooks

    def path_clusters(self, facet: int, path: tuple[int, ...]) -> np.ndarray:
        return self.clusters[facet].path_clusters(path)

    def trending(self, n: int) -> np.ndarray:
        return self._trending[:n]

    def live_rows(self) -> np.ndarray:
        return self._live

    def dense(self) -> DenseColumns:
        return self._dense

    def router(self) -> ClusterRouter:
        return self._router

    # --- introspection used by reports ------------------------------------------------------------------
    def cluster_sizes(self, facet: int) -> np.ndarray:
        return np.diff(self._offsets[facet])
