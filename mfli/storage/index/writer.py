"""The single LMDB writer: applies learner deltas (and codebooks) to the index, Kafka-free.

:class:`IndexWriter` is the whole indexer minus the Kafka loop, so tests and benchmarks drive it
directly. Each :meth:`IndexWriter.apply` is ONE write transaction holding the item changes *and* the
source offsets they came from, so after a crash the stored offsets say exactly where to resume, and a
replayed delta (version not newer than the stored one) is a no-op.

The writer keeps small in-memory per-item columns (version, prior, cluster per facet, liveness;
:mod:`.columns`) loaded from LMDB at start: drift detection, replay filtering and the trending list then
cost numpy operations instead of LMDB reads. LMDB stays the truth; the columns are updated only after a
commit succeeds. The full pass (:mod:`.full_pass`) is handed the environment, the columns and the index
version explicitly and returns what it changed.

Durability: ``sync=True, metasync=False`` (default, ``index.sync_commits``) — one fsync per commit;
an OS crash may undo the last committed transaction but never breaks consistency (LMDB's documented
NOMETASYNC guarantee), and since the offsets live in the same transaction the indexer then simply
re-reads those deltas.

Drift: an item moves between posting lists only when its cluster in a facet changed. Members added
by delta are appended to the posting list (the prior order is restored by the next full pass); with
clusters bounded by B_upp <= N_k a request reads every member anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import lmdb
import numpy as np
import orjson

from mfli import metrics
from mfli.config import IndexSettings, Settings
from mfli.deltas import CodebookSnapshot, DeltaBatch, ItemDelta, encode_model
from mfli.retrieval.clusters import FacetClusters, path_keys
from mfli.retrieval.query_model import QueryModel
from mfli.storage.index import layout as L
from mfli.storage.index.columns import ItemColumns
from mfli.storage.index.full_pass import (
    FullPassReport,
    IndexFiles,
    PreparedPass,
    commit_full_pass,
    compute_full_pass,
    export_cluster_sizes,
)
from mfli.storage.index.postings import edit_postings
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.rows import assign_rows

log = logging.getLogger(__name__)

#: rows kept in ``meta:trending`` (the server's trending source reads a prefix of it)
TRENDING_STORED = 1000
#: at most this many freshness observations per batch (Histogram.observe per item would cost ~10%)
FRESHNESS_SAMPLES = 256


@dataclass
class ApplyResult:
    applied: int = 0
    skipped: int = 0  # not newer than the stored version (replays)
    deleted: int = 0
    moved: list[int] = field(default_factory=list)  # per facet: items whose cluster changed
    index_version: int = 0


def _settings(settings: IndexSettings | Settings | None) -> IndexSettings:
    if settings is None:
        return IndexSettings()
    return settings.index if isinstance(settings, Settings) else settings


class IndexWriter:
    """Owns the index LMDB environment for writing. One per index directory (LMDB allows one writer)."""

    def __init__(
        self, path: str | Path, settings: IndexSettings | Settings | None = None, auto_bootstrap: bool = True
    ) -> None:
        """``auto_bootstrap``: build clusters with a full pass as soon as items and a codebook are both
        present (benchmarks turn it off to time the full pass on its own)."""
        self.settings = _settings(settings)
        self.auto_bootstrap = auto_bootstrap
        self._last_sync = time.monotonic()
        self.full_pass_wanted = False  # set when a codebook of a new size arrives; the process loop obliges
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path), map_size=self.settings.map_size, max_dbs=L.MAX_DBS, lock=True, readahead=False,
            subdir=True, metasync=False, sync=self.settings.sync_commits,
        )
        with self.env.begin(write=True) as txn:
            self.db = {name: self.env.open_db(name.encode(), txn=txn) for name in L.DB_NAMES}
        self.shape: dict[str, int] | None = None
        self.vec_dtype = np.dtype("<f2") if self.settings.store_float16 else np.dtype("<f4")
        self.clusters: list[FacetClusters] | None = None
        self.columns: ItemColumns | None = None
        self.index_version = 0
        self.offsets: dict[str, int] = {}
        self._pending_clusters: dict[int, FacetClusters] = {}  # path maps grown in an open transaction
        self._active_levels: int | None = None  # codebook levels in use (a new one asks for a full pass)
        self._load()

    # --- start-up -------------------------------------------------------------------------------------
    def _load(self) -> None:
        with self.env.begin() as txn:  # bytes, not memoryviews: >10x faster for a full scan
            meta = self.db["meta"]
            raw = txn.get(b"shape", db=meta)
            self.index_version = L.unpack_i64(txn.get(b"index_version", db=meta))
            raw_offsets = txn.get(b"offsets", db=meta)
            self.offsets = orjson.loads(bytes(raw_offsets)) if raw_offsets is not None else {}
            vd = txn.get(b"vec_dtype", db=meta)
            if vd is not None:
                self.vec_dtype = np.dtype(bytes(vd).decode())
            if raw is None:
                return
            self.shape = orjson.loads(bytes(raw))
            self.columns = ItemColumns(self.shape["facets"])
            with txn.cursor(db=self.db["rec"]) as cur:
                pairs = list(cur.iternext(keys=True, values=True))
            if pairs:
                rows = L.key_rows(b"".join(k for k, _ in pairs))
                rec = np.frombuffer(b"".join(v for _, v in pairs), dtype=self._rec_dtype())
                m = self.columns
                m.ensure(int(rows.max()) + 1)
                m.version[rows], m.prior[rows] = rec["version"], rec["prior"]
                m.clusters[rows] = rec["clusters"]
                m.live[rows], m.exists[rows] = rec["deleted"] == 0, True
            if L.unpack_i64(txn.get(b"clusters_version", db=meta)) > 0:
                self.clusters = self._load_clusters(txn)
        log.info("index %s: version %d, %d live items, clusters %s", self.path, self.index_version,
                 self.n_live, "loaded" if self.clusters else "not built yet")

    def _load_clusters(self, txn) -> list[FacetClusters]:
        shape, columns = self.shape, self.columns
        assert shape is not None and columns is not None, "_load reads the shape and the columns first"
        facets, levels, m = shape["facets"], shape["levels"], shape["codewords"]
        keys: list[list[int]] = [[] for _ in range(facets)]
        ids: list[list[np.ndarray]] = [[] for _ in range(facets)]
        with txn.cursor(db=self.db["paths"]) as cur:
            for k, v in cur.iternext(keys=True, values=True):
                facet, path = L.path_key_parts(bytes(k))
                clusters = np.frombuffer(v, dtype="<i8").astype(np.int64)
                keys[facet].extend([path] * clusters.size)
                ids[facet].append(clusters)
        out = []
        for f in range(facets):
            cent = np.frombuffer(L.required(txn.get(L.facet_key(f), db=self.db["cent"]), "centroids"), dtype="<f4")
            cent = cent.reshape(-1, shape["dim"]).copy()
            rows = np.flatnonzero(columns.live)
            sizes = np.bincount(columns.clusters[rows, f][columns.clusters[rows, f] >= 0],
                                minlength=cent.shape[0])
            cl = np.concatenate(ids[f]) if ids[f] else np.empty(0, np.int64)
            out.append(FacetClusters.from_pairs(levels, m, cent, sizes, np.array(keys[f], np.int64), cl))
        return out

    def _rec_dtype(self) -> np.dtype:
        assert self.shape is not None
        return L.record_dtype(self.shape["facets"], self.shape["levels"])

    @property
    def n_live(self) -> int:
        return 0 if self.columns is None else int(self.columns.live.sum())

    # --- shape and codebooks ------------------------------------------------------------------------------
    def _ensure_shape(self, txn, facets: int, dim: int, levels: int, codewords: int = 0) -> None:
        if self.shape is None:
            self.shape = {"facets": facets, "dim": dim, "levels": levels, "codewords": codewords}
            self.columns = ItemColumns(facets)
            txn.put(b"vec_dtype", self.vec_dtype.str.encode(), db=self.db["meta"])
        elif (self.shape["facets"], self.shape["dim"], self.shape["levels"]) != (facets, dim, levels):
            raise ValueError(
                f"delta shape F={facets}, d={dim}, L={levels} does not match the index {self.shape}")
        if codewords and codewords != self.shape["codewords"]:
            # the learner grows M with the catalogue; path keys do not depend on M, and the clusters
            # move to the new codebook at the next full pass (requested now)
            if self.shape["codewords"]:
                log.info("codebook size changes from %d to %d codewords", self.shape["codewords"], codewords)
                self.full_pass_wanted = True
            self.shape["codewords"] = codewords
        txn.put(b"shape", orjson.dumps(self.shape), db=self.db["meta"])

    def _store_codebook(self, txn, snap: CodebookSnapshot) -> None:
        cb = np.ascontiguousarray(snap.codebooks, dtype="<f4")
        f, levels, m, d = cb.shape
        self._ensure_shape(txn, f, d, levels, m)
        meta = self.db["meta"]
        latest = L.unpack_i64(txn.get(b"cb_latest", db=meta), default=-1)
        if snap.version <= latest:
            return  # replayed or stale snapshot
        txn.put(L.row_key(snap.version), cb.tobytes(), db=self.db["cb"])
        txn.put(b"cb_shape", orjson.dumps(list(cb.shape)), db=meta)
        txn.put(b"cb_latest", L.pack_i64(snap.version), db=meta)
        in_use = L.unpack_i64(txn.get(b"cb_in_use", db=meta), default=-1)
        # The learner activates levels one by one (coarse before fine) and starts a level from all-zero
        # codewords; until a full pass the clusters ignore a newly active level, so ask for one now.
        active = int((np.abs(cb).reshape(f, levels, -1).max(axis=2) > 0).any(axis=0).sum())
        if self._active_levels is not None and active != self._active_levels:
            log.info("codebook has %d active levels (was %d): full pass requested", active, self._active_levels)
            self.full_pass_wanted = True
        self._active_levels = active
        # keep the codebook the clusters were built with and the newest; older ones serve nobody
        with txn.cursor(db=self.db["cb"]) as cur:
            stale = [bytes(k) for k in cur.iternext(keys=True, values=False)
                     if L.key_rows(bytes(k))[0] not in (snap.version, in_use)]
        for key in stale:
            txn.delete(key, db=self.db["cb"])

    def _store_model(self, txn, model: QueryModel) -> None:
        """Keep the newest query encoder (the server computes request queries with it)."""
        meta = self.db["meta"]
        if model.version <= L.unpack_i64(txn.get(b"qm_version", db=meta), default=-1):
            return  # replayed or stale
        txn.put(b"qm", encode_model(model), db=meta)
        txn.put(b"qm_version", L.pack_i64(model.version), db=meta)

    def latest_codebook(self) -> tuple[int, np.ndarray] | None:
        with self.env.begin() as txn:
            version = L.unpack_i64(txn.get(b"cb_latest", db=self.db["meta"]), default=-1)
            if version < 0:
                return None
            shape = orjson.loads(L.required(txn.get(b"cb_shape", db=self.db["meta"]), "codebook shape"))
            raw = L.required(txn.get(L.row_key(version), db=self.db["cb"]), "codebook")
            return version, np.frombuffer(raw, dtype="<f4").reshape(shape).copy()

    # --- deltas -----------------------------------------------------------------------------------------
    def apply(
        self,
        deltas: DeltaBatch | list[ItemDelta] | None,
        offsets: dict[str, int] | None = None,
        codebooks: list[CodebookSnapshot] | None = None,
        models: list[QueryModel] | None = None,
    ) -> ApplyResult:
        """Apply a batch in one write transaction together with the source ``offsets`` it reflects.

        ``offsets`` maps ``"topic:partition"`` to the next offset to read; stored offsets only move forward.
        """
        batch = DeltaBatch.from_deltas(deltas) if isinstance(deltas, list) and deltas else deltas
        if isinstance(batch, list):
            batch = None
        result = ApplyResult()
        now_ms = int(time.time() * 1000)
        pending = None
        try:
            with self.env.begin(write=True) as txn:
                for snap in codebooks or []:
                    self._store_codebook(txn, snap)
                for model in models or []:
                    self._store_model(txn, model)
                if batch is not None and len(batch):
                    pending = self._apply_batch(txn, batch, now_ms, result)
                new_offsets = dict(self.offsets)
                for key, value in (offsets or {}).items():
                    new_offsets[key] = max(int(value), new_offsets.get(key, 0))
                txn.put(b"offsets", orjson.dumps(new_offsets), db=self.db["meta"])
                txn.put(b"index_version", L.pack_i64(self.index_version + 1), db=self.db["meta"])
                changed = pending["rows"] if pending is not None else np.empty(0, np.int64)
                L.log_change(txn, self.db["chg"], self.index_version + 1, changed)
                if pending is not None:
                    txn.put(b"live", L.pack_i64(int(pending["live_count"])), db=self.db["meta"])
                    txn.put(b"trending", pending["trending"].astype("<i8").tobytes(), db=self.db["meta"])
        except Exception as exc:
            if isinstance(exc, lmdb.MapFullError):
                metrics.LMDB_ERRORS.labels(kind="map_full").inc()
            self._reload_after_abort()
            raise
        self.index_version += 1
        self.offsets = new_offsets
        if pending is not None:
            assert batch is not None, "pending edits come from a batch"
            self._commit_columns(pending, batch)
        self._export(result, batch, int(time.time() * 1000))
        codebook_known = bool(self.shape and self.shape["codewords"])
        if self.auto_bootstrap and self.clusters is None and self.n_live and codebook_known:
            self.full_pass()  # bootstrap: the first items and a codebook are here, build clusters
        result.index_version = self.index_version
        return result

    def load_snapshot(self, snapshot, chunk: int = 50_000) -> None:
        """Apply every live item of an :class:`~mfli.retrieval.snapshot.ItemSnapshot` plus its codebooks
        (evaluation and tooling: index a learner state without a broker), then run a full pass."""
        version = max(1, int(snapshot.version))
        live = snapshot.live_rows()
        models = [] if snapshot.query_model is None else [replace(snapshot.query_model, version=version)]
        self.apply(None, {}, [CodebookSnapshot(version, snapshot.codebooks)], models)
        bootstrap, self.auto_bootstrap = self.auto_bootstrap, False
        try:
            for start in range(0, live.size, chunk):
                rows = live[start : start + chunk]
                self.apply(DeltaBatch(
                    [str(i) for i in snapshot.item_ids[rows]], rows, np.full(rows.size, version, np.int64),
                    np.zeros(rows.size, np.int64), snapshot.vectors[rows], snapshot.codes[rows],
                    snapshot.prior[rows].astype(np.float32), np.zeros(rows.size, bool), [],
                ), {})
        finally:
            self.auto_bootstrap = bootstrap
        self.full_pass()

    def full_pass(self, seed: int = 0) -> FullPassReport | None:
        """Re-encode, rebuild split/merged clusters and swap atomically, in this thread (see
        :mod:`.full_pass`); None if there is nothing to index yet."""
        self.full_pass_wanted = False
        prep = self.prepare_full_pass(seed)
        return None if prep is None else self.commit_full_pass(prep)

    def prepare_full_pass(self, seed: int = 0, cancel: threading.Event | None = None) -> PreparedPass | None:
        """The expensive half of a full pass (read a snapshot, re-encode, build clusters): safe in a
        background thread while this writer keeps applying deltas; commit it with :meth:`commit_full_pass`."""
        files = self._files()
        return None if files is None else compute_full_pass(files, self.settings, seed, cancel)

    def commit_full_pass(self, prep: PreparedPass) -> FullPassReport:
        """Swap a prepared pass in (writer thread only), reconciling what changed since its snapshot."""
        files = self._files()
        assert files is not None and self.columns is not None, "a prepared pass implies a shaped index"
        report, self.clusters = commit_full_pass(files, self.columns, prep, self.index_version)
        self.index_version = report.index_version
        return report

    def _files(self) -> IndexFiles | None:
        shape = self.shape
        if shape is None:
            return None
        return IndexFiles(self.env, self.db, shape["facets"], shape["dim"], shape["levels"], self.vec_dtype)

    def _reload_after_abort(self) -> None:
        """The transaction aborted: drop in-memory state that may be ahead of LMDB, re-read the truth."""
        self.shape, self.clusters, self.columns = None, None, None
        self._pending_clusters = {}
        self._load()

    def _apply_batch(self, txn, batch: DeltaBatch, now_ms: int, result: ApplyResult) -> dict:
        n, facets, dim = batch.vectors.shape
        levels = batch.codes.shape[2]
        self._ensure_shape(txn, facets, dim, levels)
        m = self.columns
        assert m is not None
        batch_rows = self._index_rows(txn, batch, m)
        # coalesce: newest version per row wins (ties: the later delta in the batch)
        order = np.lexsort((np.arange(n), batch.versions, batch_rows))
        last = np.ones(n, bool)
        last[:-1] = batch_rows[order][1:] != batch_rows[order][:-1]
        idx = order[last]
        rows = batch_rows[idx]
        m.ensure(int(rows.max()) + 1)
        newer = batch.versions[idx] > m.version[rows]
        result.skipped = n - int(newer.sum())
        idx, rows = idx[newer], rows[newer]
        result.applied = int(idx.size)
        result.moved = [0] * facets
        if idx.size == 0:
            return {"rows": rows, "idx": idx, "new_c": np.empty((0, facets), np.int64),
                    "live_count": int(m.live.sum()), "trending": self._trending(m.prior, m.live),
                    "live": np.empty(0, bool)}
        deleted = batch.deleted[idx]
        live = ~deleted
        result.deleted = int(deleted.sum())
        vectors, codes = batch.vectors[idx], batch.codes[idx]
        old_c = np.where(m.live[rows, None], m.clusters[rows], -1)
        new_c = np.full((idx.size, facets), -1, np.int64)
        path_updates: list[tuple[int, np.ndarray, np.ndarray]] = []
        if self.clusters is not None and live.any():
            up = np.flatnonzero(live)
            for f in range(facets):
                fc = self.clusters[f]
                new_c[up, f] = fc.assign(codes[up, f], vectors[up, f])
                keys = path_keys(codes[up, f])
                pos = np.minimum(np.searchsorted(fc.path_key, keys), max(fc.path_key.size - 1, 0))
                unknown = (fc.path_key[pos] != keys) if fc.path_key.size else np.ones(keys.size, bool)
                if unknown.any():
                    path_updates.append((f, keys[unknown], new_c[up[unknown], f]))
        edits_add, edits_del = [], []
        for f in range(facets):
            moved = new_c[:, f] != old_c[:, f]
            gone = moved & (old_c[:, f] >= 0)
            came = moved & (new_c[:, f] >= 0)
            result.moved[f] = int((gone & came).sum())
            edits_del.append((f, old_c[gone, f], rows[gone]))
            edits_add.append((f, new_c[came, f], rows[came]))
        edit_postings(txn, self.db["post"], facets, edits_del, edits_add)
        for f, keys, clusters in path_updates:
            self._add_paths(txn, f, keys, clusters)
        # item records and vectors
        rec = np.zeros(idx.size, dtype=self._rec_dtype())
        rec["version"], rec["event_ts"], rec["update_ts"] = batch.versions[idx], batch.event_ts[idx], now_ms
        rec["prior"], rec["deleted"], rec["clusters"], rec["codes"] = batch.prior[idx], deleted, new_c, codes
        row_keys_ = L.row_keys(rows)
        size = rec.dtype.itemsize
        buf = rec.tobytes()
        with txn.cursor(db=self.db["rec"]) as cur:
            cur.putmulti([(k, buf[i * size : (i + 1) * size]) for i, k in enumerate(row_keys_)])
        up = np.flatnonzero(live)
        if up.size:
            vbuf = vectors[up].astype(self.vec_dtype).tobytes()
            vsize = facets * dim * self.vec_dtype.itemsize
            with txn.cursor(db=self.db["vec"]) as cur:
                cur.putmulti([(row_keys_[j], vbuf[i * vsize : (i + 1) * vsize])
                              for i, j in enumerate(up.tolist())])
        gone = np.flatnonzero(deleted)
        if gone.size:  # a deleted item keeps its record (version, for replays) but not its vectors
            for j in gone.tolist():
                txn.delete(row_keys_[j], db=self.db["vec"])
        fresh = np.flatnonzero(~m.exists[rows])
        if fresh.size:
            with txn.cursor(db=self.db["row2id"]) as cur:
                cur.putmulti([(row_keys_[j], batch.item_ids[idx[j]].encode()) for j in fresh.tolist()])
            with txn.cursor(db=self.db["id2row"]) as cur:
                cur.putmulti([(batch.item_ids[idx[j]].encode(), row_keys_[j]) for j in fresh.tolist()])
        prior = m.prior.copy()
        is_live = m.live.copy()
        prior[rows], is_live[rows] = batch.prior[idx], live
        return {"rows": rows, "idx": idx, "new_c": new_c, "live": live, "live_count": int(is_live.sum()),
                "trending": self._trending(prior, is_live)}

    def _index_rows(self, txn, batch: DeltaBatch, m) -> np.ndarray:
        """The index's row for every delta, by item id (:func:`mfli.storage.index.rows.assign_rows`)."""
        uniq = list(dict.fromkeys(i.encode() for i in batch.item_ids))
        with txn.cursor(db=self.db["id2row"]) as cur:
            known = {bytes(k).decode(): int(L.key_rows(bytes(v))[0]) for k, v in cur.getmulti(uniq)}
        return assign_rows(batch.item_ids, batch.rows, known, m.exists)

    @staticmethod
    def _trending(prior: np.ndarray, live: np.ndarray) -> np.ndarray:
        cand = np.flatnonzero(live)
        if cand.size > TRENDING_STORED:
            cand = cand[np.argpartition(-prior[cand], TRENDING_STORED)[:TRENDING_STORED]]
        return cand[np.lexsort((cand, -prior[cand]))]

    def _add_paths(self, txn, facet: int, keys: np.ndarray, clusters: np.ndarray) -> None:
        """New code paths seen in deltas join the path map (so path lookups find their items)."""
        assert self.clusters is not None, "paths are added only once clusters exist"
        fc = self.clusters[facet]
        per_path = np.repeat(fc.path_key, np.diff(fc.path_ptr))
        merged = FacetClusters.from_pairs(
            fc.levels, fc.codewords, fc.centroids, fc.sizes,
            np.concatenate([per_path, keys]), np.concatenate([fc.path_ids, clusters]),
        )
        for key in np.unique(keys).tolist():
            i = int(np.searchsorted(merged.path_key, key))
            ids = merged.path_ids[merged.path_ptr[i] : merged.path_ptr[i + 1]]
            txn.put(L.path_key_bytes(facet, key), ids.astype("<i8").tobytes(), db=self.db["paths"])
        self._pending_clusters[facet] = merged

    def _commit_columns(self, pending: dict, batch: DeltaBatch) -> None:
        """After a successful commit: bring the item columns, path maps and cluster sizes up to date."""
        m = self.columns
        assert m is not None, "a committed batch implies a shaped index"
        rows, idx, new_c = pending["rows"], pending["idx"], pending["new_c"]
        for f, merged in self._pending_clusters.items():
            assert self.clusters is not None
            self.clusters[f] = merged
        self._pending_clusters = {}
        if idx.size:
            old = np.where(m.live[rows, None], m.clusters[rows], -1)
            if self.clusters is not None:
                for f, fc in enumerate(self.clusters):
                    moved = old[:, f] != new_c[:, f]
                    np.subtract.at(fc.sizes, old[moved & (old[:, f] >= 0), f], 1)
                    np.add.at(fc.sizes, new_c[moved & (new_c[:, f] >= 0), f], 1)
            m.version[rows], m.prior[rows] = batch.versions[idx], batch.prior[idx]
            m.clusters[rows], m.live[rows], m.exists[rows] = new_c, pending["live"], True

    def _export(self, result: ApplyResult, batch: DeltaBatch | None, now_ms: int) -> None:
        metrics.DELTAS_APPLIED.inc(result.applied)
        for f, count in enumerate(result.moved):
            if count:
                metrics.REASSIGNMENTS.labels(facet=str(f)).inc(count)
        metrics.INDEX_VERSION.set(self.index_version)
        metrics.INDEX_ITEMS.set(self.n_live)
        for key, value in self.offsets.items():
            metrics.INDEX_APPLIED_OFFSET.labels(partition=key).set(value)
        if self.clusters is not None and (any(result.moved) or result.deleted):
            export_cluster_sizes(self.clusters)
        if batch is not None and result.applied:
            # event_ts <= 0 marks a prior refresh no event caused (learner.process): not freshness
            ts = batch.event_ts[batch.event_ts > 0]
            ts = ts[:: max(1, len(ts) // FRESHNESS_SAMPLES)]
            for lag in ((now_ms - ts) / 1000.0).tolist():
                metrics.FRESHNESS_SECONDS.observe(max(lag, 0.0))

    def reader(self) -> LmdbIndex:
        """An :class:`~mfli.storage.index.reader.LmdbIndex` sharing this process's environment."""
        return LmdbIndex(self.path, self.settings.map_size, env=self.env)

    def maybe_sync(self, every_s: float = 1.0) -> None:
        """With ``sync_commits`` off, flush to disk at most every ``every_s`` (the process loop calls it)."""
        if self.settings.sync_commits:
            return
        now = time.monotonic()
        if now - self._last_sync >= every_s:
            self.env.sync(True)
            self._last_sync = now

    def close(self) -> None:
        if not self.settings.sync_commits:
            self.env.sync(True)
        self.env.close()
