"""The full pass: re-encode every live item with the newest codebook, rebuild balanced clusters, swap.

Why a full pass at all: deltas only move items between *existing* clusters, so codebook changes and
cluster growth accumulate; every few minutes (and on demand) the indexer re-encodes everything and
rebuilds split/merged clusters (:func:`mfli.retrieval.clusters.build_facet_clusters`).

Atomicity: the new ``post``, ``paths`` and ``cent`` contents and every changed ``rec`` are written in a
single LMDB write transaction, so a reader's transaction sees either the old index or the new one. The
computation itself runs outside that transaction from a read snapshot; the writer is single-threaded,
so nothing changes between reading and swapping.

Cluster construction uses ``seed + facet`` and orders posting lists by (cluster, descending prior,
ascending row), exactly like :class:`mfli.retrieval.memory.MemoryIndexView`, so the LMDB index and the
in-memory index agree on the same state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mfli import metrics
from mfli.retrieval.clusters import FacetClusters, build_facet_clusters
from mfli.storage import layout as L

if TYPE_CHECKING:
    from mfli.indexer.writer import IndexWriter

log = logging.getLogger(__name__)

_READ_CHUNK = 65_536


@dataclass
class FullPassReport:
    items: int = 0
    clusters: list[int] = field(default_factory=list)
    codes_changed: list[int] = field(default_factory=list)  # per facet: items whose code path changed
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # read / encode / cluster / swap seconds
    codebook_version: int = -1
    index_version: int = 0


def encode(vectors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Greedy residual argmin: int32[n, L] codes of ``float32[n, d]`` under ``float32[L, M, d]``."""
    n = vectors.shape[0]
    codes = np.empty((n, codebook.shape[0]), dtype=np.int32)
    for start in range(0, n, _READ_CHUNK):
        residual = vectors[start : start + _READ_CHUNK].astype(np.float32, copy=True)
        for level in range(codebook.shape[0]):
            words = codebook[level]
            dist = np.einsum("md,md->m", words, words)[None, :] - 2.0 * (residual @ words.T)
            best = np.argmin(dist, axis=1)
            codes[start : start + _READ_CHUNK, level] = best
            residual -= words[best]
    return codes


def _read_live(writer: "IndexWriter", rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(records, float32[n, F, d] vectors) of ``rows`` from one read snapshot."""
    shape = writer.shape
    recs, vecs = [], []
    with writer.env.begin(buffers=True) as txn:
        for start in range(0, rows.size, _READ_CHUNK):
            keys = L.row_keys(rows[start : start + _READ_CHUNK])
            with txn.cursor(db=writer.db["rec"]) as cur:
                recs.append(b"".join(v for _, v in cur.getmulti(keys)))
            with txn.cursor(db=writer.db["vec"]) as cur:
                vecs.append(b"".join(v for _, v in cur.getmulti(keys)))
    rec = np.frombuffer(b"".join(recs), dtype=writer._rec_dtype()).copy()
    vectors = np.frombuffer(b"".join(vecs), dtype=writer.vec_dtype)
    vectors = vectors.reshape(rows.size, shape["facets"], shape["dim"]).astype(np.float32)
    return rec, vectors


def run_full_pass(writer: "IndexWriter", seed: int = 0) -> FullPassReport | None:
    """Rebuild the whole index from the live items and the newest codebook; None if nothing to do."""
    started = time.perf_counter()
    writer.full_pass_wanted = False
    cb = writer.latest_codebook()
    if cb is None or writer.mirror is None or writer.n_live == 0:
        log.info("full pass skipped: %s", "no codebook yet" if cb is None else "no live items")
        return None
    cb_version, codebooks = cb
    s = writer.settings
    rows = np.flatnonzero(writer.mirror.live).astype(np.int64)
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    rec, vectors = _read_live(writer, rows)
    phases["read"], mark = time.perf_counter() - mark, time.perf_counter()
    facets = writer.shape["facets"]
    report = FullPassReport(items=int(rows.size), codebook_version=cb_version)
    built = []
    for f in range(facets):
        codes = encode(vectors[:, f], codebooks[f])
        phases["encode"], mark = phases.get("encode", 0.0) + time.perf_counter() - mark, time.perf_counter()
        report.codes_changed.append(int(np.any(codes != rec["codes"][:, f], axis=1).sum()))
        rec["codes"][:, f] = codes
        fc, assign = build_facet_clusters(
            codes, vectors[:, f], codebooks[f], target=s.target_cluster_size, b_low=s.b_low, b_upp=s.b_upp,
            split_merge=s.split_merge, seed=seed + f,
        )
        rec["clusters"][:, f] = assign
        phases["cluster"], mark = phases.get("cluster", 0.0) + time.perf_counter() - mark, time.perf_counter()
        built.append(fc)
        report.clusters.append(fc.n_clusters)
    _swap(writer, rows, rec, built, cb_version)
    phases["swap"] = time.perf_counter() - mark
    report.phases = {k: round(v, 3) for k, v in phases.items()}
    writer.clusters = built
    writer.mirror.clusters[rows] = rec["clusters"]
    report.seconds = time.perf_counter() - started
    report.index_version = writer.index_version
    _export(built, report)
    log.info("full pass: %d items, clusters per facet %s, %.2f s (%s)", rows.size, report.clusters,
             report.seconds, report.phases)
    return report


def _swap(writer: "IndexWriter", rows: np.ndarray, rec: np.ndarray, built, cb_version: int) -> None:
    db, meta = writer.db, writer.db["meta"]
    prior = rec["prior"]
    with writer.env.begin(write=True) as txn:
        for name in ("post", "paths", "cent"):
            txn.drop(db[name], delete=False)
        for f, fc in enumerate(built):
            assign = rec["clusters"][:, f]
            order = np.lexsort((rows, -prior, assign))
            sorted_rows = rows[order].astype("<i8")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=fc.n_clusters))]) * 8
            buf = sorted_rows.tobytes()
            with txn.cursor(db=db["post"]) as cur:
                cur.putmulti([(L.post_key(f, c), buf[bounds[c] : bounds[c + 1]])
                              for c in range(fc.n_clusters) if bounds[c + 1] > bounds[c]])
            ids = fc.path_ids.astype("<i8").tobytes()
            ptr = fc.path_ptr * 8
            with txn.cursor(db=db["paths"]) as cur:
                cur.putmulti([(L.path_key_bytes(f, int(k)), ids[ptr[i] : ptr[i + 1]])
                              for i, k in enumerate(fc.path_key.tolist())])
            txn.put(L.facet_key(f), fc.centroids.astype("<f4").tobytes(), db=db["cent"])
        size = rec.dtype.itemsize
        buf = rec.tobytes()
        with txn.cursor(db=db["rec"]) as cur:
            cur.putmulti([(k, buf[i * size : (i + 1) * size]) for i, k in enumerate(L.row_keys(rows))])
        clusters_version = L.unpack_i64(txn.get(b"clusters_version", db=meta)) + 1
        txn.put(b"clusters_version", L.pack_i64(clusters_version), db=meta)
        txn.put(b"cb_in_use", L.pack_i64(cb_version), db=meta)
        txn.put(b"full_pass_ts", L.pack_i64(int(time.time() * 1000)), db=meta)
        txn.put(b"index_version", L.pack_i64(writer.index_version + 1), db=meta)
        writer.log_change(txn, writer.index_version + 1, np.empty(0, np.int64))
    writer.index_version += 1


def export_cluster_sizes(clusters: list[FacetClusters]) -> None:
    """Clusters per facet and their size distribution (empty clusters after deletes excluded)."""
    for f, fc in enumerate(clusters):
        sizes = fc.sizes[fc.sizes > 0]
        label = str(f)
        metrics.INDEX_CLUSTERS.labels(facet=label).set(int(sizes.size))
        if sizes.size:
            for stat, value in (("min", sizes.min()), ("max", sizes.max()), ("p50", np.median(sizes)),
                                ("p90", np.quantile(sizes, 0.9)), ("mean", sizes.mean())):
                metrics.CLUSTER_SIZE.labels(facet=label, stat=stat).set(float(value))


def _export(built, report: FullPassReport) -> None:
    metrics.FULL_PASS_SECONDS.observe(report.seconds)
    metrics.INDEX_VERSION.set(report.index_version)
    export_cluster_sizes(built)
    for f, fc in enumerate(built):
        label = str(f)
        multi_path = int((np.diff(fc.path_ptr) > 1).sum())  # paths split into several clusters
        paths_per_cluster = np.bincount(fc.path_ids, minlength=fc.n_clusters)
        metrics.SPLITS.labels(facet=label).inc(multi_path)
        metrics.MERGES.labels(facet=label).inc(int((paths_per_cluster > 1).sum()))
