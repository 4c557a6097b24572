"""A dense numpy mirror of the index's per-item columns, kept current from the index's change log.

Why: a request reranks a few thousand candidates. Fetching their vectors and records from LMDB key by
key costs about 1.5 µs per key in py-lmdb (B-tree walk plus Python objects), ~10 ms per request, far
above the serving budget. The mirror holds ``vectors`` (``[rows, F, d]``, the stored dtype),
``prior``, ``clusters`` and ``live`` as arrays indexed by row, the rerank's int8 codes, a
cluster-ordered copy of every posting list as of its last full load, and the ``paths`` map, so
candidate gathering is numpy and compiled kernels, not LMDB reads. LMDB stays the source of truth: a
posting list edited by a delta since the load is read from LMDB inside the request's transaction
(``MirrorArrays.dirty``), ids are read there on a cache miss, and so is the users store.

Keeping it current: the single writer records, for every committed index version, the rows it changed
(sub-db ``chg``, key = index version, value = packed int64 rows) and bumps ``clusters_version`` on a
full pass. :meth:`IndexMirror.sync` reads through the *request's own* transaction, so after it the
mirror reflects exactly the version that transaction sees:

* same version → nothing to do (one meta read per request);
* a few versions behind → re-read only the changed rows (``chg`` range scan + two ``getmulti``);
* a full pass happened, the change log was pruned past us, or the index is new → full reload into
  fresh arrays, swapped in by reference, so a reader holding the old arrays is never torn.

A view uses the mirror only when its version equals the transaction's version (a request whose
transaction is older than the mirror falls back to per-key reads rather than mixing versions).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from mfli.retrieval.base import concat_ranges, quantize_rows
from mfli.retrieval.clusters import FACET_SHIFT, path_keys
from mfli.retrieval.inputs import InputCache
from mfli.retrieval.query_model import QueryModel
from mfli.storage.index import layout as L

log = logging.getLogger(__name__)


@dataclass
class MirrorArrays:
    """One immutable-by-reference set of columns (replaced wholesale on a full reload).

    ``codes``/``scale``/``bias`` (the rerank's int8 first pass, :class:`~mfli.retrieval.base.DenseColumns`)
    hold two regions: first every posting list as loaded at the last full load, laid out cluster by
    cluster (a request reads a cluster's members sequentially instead of one random row each: 2-3x
    faster at 10^6 items), then one slot per row at ``row_slot + row``. ``ivf_first``/``ivf_len`` give
    each (facet, cluster)'s first slot and length at load, ``ivf_rows`` the row at each slot; a posting
    list edited since (``dirty``, see :meth:`IndexMirror._track_edits`) is read from LMDB instead and
    its codes from the row slots. Codes in both regions are rewritten for every changed row, so
    whichever region a request reads is current. ``path_*`` is the ``paths`` sub-db as one sorted map.
    """

    vectors: np.ndarray  # [cap, F, d], stored dtype
    prior: np.ndarray  # float32[cap]
    clusters: np.ndarray  # int64[cap, F], -1 where not live
    live: np.ndarray  # bool[cap]
    codes: np.ndarray  # int8[row_slot + cap, F * d]
    scale: np.ndarray  # float32[row_slot + cap]
    bias: np.ndarray  # float32[row_slot + cap]: the prior, by slot
    row_slot: int  # slots below it are the cluster-ordered region
    ivf_of_row: np.ndarray  # int64[cap, F]: a row's slot in the cluster-ordered region per facet, or -1
    ivf_first: np.ndarray  # int64[F, clusters]: first slot of each posting list at load, -1 if none
    ivf_len: np.ndarray  # int64[F, clusters]: its length at load
    ivf_rows: np.ndarray  # int64[row_slot]: the row at each cluster-ordered slot
    dirty: np.ndarray  # bool[F, clusters]: posting list edited since the load (read it from LMDB)
    path_key: np.ndarray  # int64[P] sorted ``facet << FACET_SHIFT | path key`` (the ``paths`` sub-db)
    path_ptr: np.ndarray  # int64[P + 1]
    path_ids: np.ndarray  # int64[...] clusters of each path
    rows: int  # rows in use (max row + 1)
    stamp: np.ndarray  # int64[cap]: generation of the row's last write (never repeats; -1 never written)


class IndexMirror:
    """Dense per-row columns of one index; thread-safe ``sync``, lock-free reads."""

    def __init__(self) -> None:
        self.version = -1
        self.clusters_version = -1
        self.arrays: MirrorArrays | None = None
        self._lock = threading.Lock()
        self._live_rows: tuple[int, np.ndarray] | None = None
        self.full_loads = 0
        self.delta_syncs = 0
        # id <-> row lookups never change (the index owns its rows and an id keeps its row for good,
        # :mod:`mfli.storage.index.rows`), so they are cached (each saves an LMDB B-tree walk per key, ~1.5 µs;
        # a request resolves ~50 history ids and ~20 answer rows); emptied on a full load to be safe.
        self.id_rows: dict[str, int] = {}
        self.row_ids: dict[int, str] = {}
        self.cache_limit = 1_000_000  # entries per dict; a full one is emptied (bounded memory)
        self._generation = 0  # stamps rows as they are written, across full loads (mfli.retrieval.inputs)
        self._inputs: InputCache | None = None

    # --- keeping up ---------------------------------------------------------------------------------
    def sync(self, view) -> bool:
        """Bring the mirror to ``view.version`` using ``view``'s transaction. False if it cannot
        (the mirror is already newer than the view, or the index has no change log)."""
        if view.version == self.version:
            return True
        with self._lock:
            if view.version == self.version:
                return True
            if view.version < self.version:
                return False
            clusters_version = view.clusters_version()
            oldest = view.oldest_change()
            if (
                self.arrays is None
                or clusters_version != self.clusters_version
                or oldest is None
                or oldest > self.version + 1
            ):
                self._full_load(view)
            else:
                self._apply_changes(view)
            self.version = view.version
            self.clusters_version = clusters_version
        return True

    def _full_load(self, view) -> None:
        rows, rec, vec = view.scan_all()
        postings = view.scan_postings()
        cap = int(rows.max()) + 1 if rows.size else 0
        arrays = self._empty(view, max(cap, 1024), sum(len(v) for _, v in postings) // 8)
        keys = np.array([L.post_key_parts(k) for k, _ in postings], np.int64).reshape(-1, 2)
        lens = np.array([len(v) // 8 for _, v in postings], np.int64)
        shape = (view.facets, int(keys[:, 1].max()) + 1 if keys.size else 0)
        arrays.ivf_first, arrays.ivf_len = np.full(shape, -1, np.int64), np.zeros(shape, np.int64)
        arrays.ivf_first[keys[:, 0], keys[:, 1]] = np.cumsum(lens) - lens
        arrays.ivf_len[keys[:, 0], keys[:, 1]] = lens
        ivf_rows = np.frombuffer(b"".join(v for _, v in postings), dtype="<i8") if postings else np.empty(0, np.int64)
        arrays.ivf_rows = ivf_rows.astype(np.int64)
        arrays.ivf_of_row[ivf_rows, np.repeat(keys[:, 0], lens)] = np.arange(ivf_rows.size)
        arrays.dirty = np.zeros(shape, bool)
        arrays.path_key, arrays.path_ptr, arrays.path_ids = _path_csr(view.scan_paths())
        self._write(arrays, rows, rec, vec, self._stamp())
        arrays.rows = cap
        self.arrays = arrays  # swap by reference: readers of the old arrays are unaffected
        self._live_rows = None
        self.id_rows, self.row_ids = {}, {}
        self.full_loads += 1
        log.info("index mirror: full load of %d rows (%d posting slots) at version %d", rows.size, ivf_rows.size,
                 view.version)

    def _apply_changes(self, view) -> None:
        rows = view.changed_since(self.version)
        if rows.size == 0:
            return
        arrays = self.arrays
        assert arrays is not None
        need = int(rows.max()) + 1
        if need > arrays.vectors.shape[0]:
            arrays = self._grow(view, arrays, need)
        rec = view.records(rows)
        vec = view.vectors(rows, use_mirror=False)
        self._track_edits(view, arrays, rows, rec)
        self._write(arrays, rows, rec, vec, self._stamp())
        arrays.rows = max(arrays.rows, need)
        self.arrays = arrays
        self._live_rows = None
        self.delta_syncs += 1

    @staticmethod
    def _track_edits(view, arrays: MirrorArrays, rows: np.ndarray, rec: np.ndarray) -> None:
        """What the delta commits since the last sync did to posting lists and the path map, from the
        changed rows alone. The index writer edits a posting list only to move a row in or out of it
        (a row whose cluster changed, was deleted or arrived), and adds a path only when a row arrives
        on a path the map does not hold; everything else changes at a full pass, which reloads the
        mirror. So: mark both clusters of every moved row dirty (requests read those from LMDB), and
        read the new paths of changed rows into the path map."""
        facets = arrays.clusters.shape[1]
        old = np.where(arrays.live[rows, None], arrays.clusters[rows], -1)
        new = rec["clusters"].astype(np.int64).reshape(rows.size, -1)
        new[rec["deleted"] != 0] = -1
        moved = old != new
        for c in (old[moved], new[moved]):
            f = np.broadcast_to(np.arange(facets), moved.shape)[moved]
            keep = (c >= 0) & (c < arrays.dirty.shape[1])
            arrays.dirty[f[keep], c[keep]] = True
        live = rec["deleted"] == 0
        if not live.any():
            return
        codes = rec["codes"].astype(np.int64).reshape(rows.size, facets, -1)[live]
        keys = np.concatenate([(np.int64(f) << FACET_SHIFT) | path_keys(codes[:, f]) for f in range(facets)])
        keys = np.unique(keys)
        pos = np.searchsorted(arrays.path_key, keys)
        known = pos < arrays.path_key.size
        known[known] = arrays.path_key[pos[known]] == keys[known]
        if known.all():
            return
        added = [(int(k), v) for k, v in view.paths_of(keys[~known]) if v.size]
        if added:
            arrays.path_key, arrays.path_ptr, arrays.path_ids = _merge_paths(
                arrays.path_key, arrays.path_ptr, arrays.path_ids, added)

    @staticmethod
    def _empty(view, cap: int, ivf: int = 0) -> MirrorArrays:
        width = view.facets * view.dim
        return MirrorArrays(
            vectors=np.zeros((cap, view.facets, view.dim), dtype=view.vec_dtype.newbyteorder("=")),
            prior=np.zeros(cap, np.float32),
            clusters=np.full((cap, view.facets), -1, np.int64),
            live=np.zeros(cap, bool),
            codes=np.zeros((ivf + cap, width), np.int8),
            scale=np.ones(ivf + cap, np.float32),
            bias=np.zeros(ivf + cap, np.float32),
            row_slot=ivf,
            ivf_of_row=np.full((cap, view.facets), -1, np.int64),
            ivf_first=np.full((view.facets, 0), -1, np.int64),
            ivf_len=np.zeros((view.facets, 0), np.int64),
            ivf_rows=np.empty(0, np.int64),
            dirty=np.zeros((view.facets, 0), bool),
            path_key=np.empty(0, np.int64), path_ptr=np.zeros(1, np.int64), path_ids=np.empty(0, np.int64),
            rows=0, stamp=np.full(cap, -1, np.int64),
        )

    def _grow(self, view, arrays: MirrorArrays, need: int) -> MirrorArrays:
        bigger = self._empty(view, max(need, 2 * arrays.vectors.shape[0]), arrays.row_slot)
        n, end = arrays.rows, arrays.row_slot + arrays.rows
        bigger.vectors[:n], bigger.prior[:n] = arrays.vectors[:n], arrays.prior[:n]
        bigger.clusters[:n], bigger.live[:n], bigger.rows = arrays.clusters[:n], arrays.live[:n], n
        bigger.stamp[:n] = arrays.stamp[:n]
        bigger.codes[:end], bigger.scale[:end] = arrays.codes[:end], arrays.scale[:end]
        bigger.bias[:end] = arrays.bias[:end]
        bigger.ivf_of_row[:n] = arrays.ivf_of_row[:n]
        bigger.ivf_first, bigger.ivf_len, bigger.ivf_rows = arrays.ivf_first, arrays.ivf_len, arrays.ivf_rows
        bigger.dirty = arrays.dirty
        bigger.path_key, bigger.path_ptr, bigger.path_ids = arrays.path_key, arrays.path_ptr, arrays.path_ids
        return bigger

    def _stamp(self) -> int:
        self._generation += 1
        return self._generation

    @staticmethod
    def _write(arrays: MirrorArrays, rows: np.ndarray, rec: np.ndarray, vec: np.ndarray, stamp: int) -> None:
        if rows.size == 0:  # an index with no items yet (server started before the first delta)
            return
        live = rec["deleted"] == 0
        arrays.vectors[rows] = vec
        arrays.stamp[rows] = stamp  # after the vectors: a reader takes the stamp first (mfli.retrieval.inputs)
        arrays.prior[rows] = rec["prior"]
        clusters = rec["clusters"].astype(np.int64).reshape(rows.size, -1)
        clusters[~live] = -1
        arrays.clusters[rows] = clusters
        arrays.live[rows] = live
        codes, scale = quantize_rows(vec.reshape(rows.size, -1))
        prior = rec["prior"].astype(np.float32)
        slots = arrays.row_slot + rows
        arrays.codes[slots], arrays.scale[slots], arrays.bias[slots] = codes, scale, prior
        ivf = arrays.ivf_of_row[rows]  # the same rows in the cluster-ordered region, per facet
        for f in range(ivf.shape[1]):
            has = ivf[:, f] >= 0
            if has.any():
                at = ivf[has, f]
                arrays.codes[at], arrays.scale[at], arrays.bias[at] = codes[has], scale[has], prior[has]

    # --- reads ------------------------------------------------------------------------------------------
    def input_cache(self, model: QueryModel) -> InputCache:
        """The encoder-input cache over this mirror's rows (:mod:`mfli.retrieval.inputs`), for every weights
        version of ``model``'s shape (a model of another shape replaces it)."""
        cache = self._inputs
        if cache is None or cache.shape != (model.members, model.encoder_dim):
            arrays = self.arrays
            cache = InputCache(model.members, model.encoder_dim, arrays.vectors.shape[0] if arrays is not None else 0)
            self._inputs = cache
        return cache

    def live_rows(self) -> np.ndarray:
        cached = self._live_rows
        if cached is not None and cached[0] == self.version:
            return cached[1]
        arrays = self.arrays
        rows = np.flatnonzero(arrays.live[: arrays.rows]).astype(np.int64) if arrays else np.empty(0, np.int64)
        self._live_rows = (self.version, rows)
        return rows



def _path_csr(entries: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted combined keys, offsets and cluster ids from (combined key, clusters) pairs."""
    entries = sorted(entries, key=lambda e: e[0])
    keys = np.fromiter((k for k, _ in entries), np.int64, len(entries))
    sizes = np.fromiter((v.size for _, v in entries), np.int64, len(entries))
    ptr = np.zeros(len(entries) + 1, np.int64)
    np.cumsum(sizes, out=ptr[1:])
    ids = np.concatenate([v for _, v in entries]).astype(np.int64) if entries else np.empty(0, np.int64)
    return keys, ptr, ids


def _merge_paths(keys: np.ndarray, ptr: np.ndarray, ids: np.ndarray,
                 added: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The path map with new (combined key, clusters) entries merged in (vectorised: O(P) numpy)."""
    add_keys, add_ptr, add_ids = _path_csr(added)
    all_keys = np.concatenate([keys, add_keys])
    sizes = np.concatenate([np.diff(ptr), np.diff(add_ptr)])
    starts = np.concatenate([ptr[:-1], ids.size + add_ptr[:-1]])
    order = np.argsort(all_keys, kind="stable")
    new_ptr = np.zeros(all_keys.size + 1, np.int64)
    np.cumsum(sizes[order], out=new_ptr[1:])
    pool = np.concatenate([ids, add_ids])
    return all_keys[order], new_ptr, pool[concat_ranges(starts[order], sizes[order])]
