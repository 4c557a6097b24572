"""The learned index's peers in ``mfli bench serve``, each at its best, all on the same score and queries.

Every peer searches the learned index's own score. With one facet that is ``q . e + prior``, an inner
product once the prior is appended to the item (``[e, prior]``) and a 1 to the query (``[q, 1]``); with
several facets the peers search the gate-weighted linearisation of the mixture (as
:class:`mfli.retrieval.hnsw.HnswRetriever` does) and every returned candidate is rescored exactly.
The answer of every peer is post-processed by one function (:meth:`PeerRetriever.finish`): exact rescore,
excluded rows dropped, top k. Exclusions are handled by over-fetching ``k + |exclude|`` (the usual way;
FAISS's ID selectors and hnswlib's filter were not used: they cost per candidate).

Peers, as their authors recommend them for MIPS at this scale:

* ``hnswlib`` HNSW M=32, ef_construction=200, MIPS->L2 reduction (an extra coordinate
  ``sqrt(R^2 - |x|^2)``; graph search in raw inner-product space degrades with uneven norms);
  searched ``ef`` bisected.
* ``faiss-hnsw`` ``IndexHNSWFlat`` M=32, efConstruction=200, the same reduction; ``efSearch`` bisected.
* ``faiss-ivf-flat`` ``IndexIVFFlat`` (inner product, ``nlist ~ 4 sqrt(n)``); ``nprobe`` bisected.
* ``faiss-ivfpq-fs`` ``IndexIVFPQFastScan`` (4-bit PQ, two dimensions per sub-quantiser, inner product,
  by residual) then an exact refine of ``refine x want`` candidates from the float vectors (what
  ``IndexRefineFlat`` does; done here so churn can edit the float copy); ``nprobe`` bisected per refine
  factor, the fastest kept.
* ``scann`` tree (``~2 sqrt(n)`` leaves) + asymmetric hashing (2 dims per block, anisotropic threshold
  0.2) + exact reorder; ``leaves_to_search`` bisected per reorder depth, the fastest kept.

All run one thread (FAISS's OpenMP pinned to 1, ScaNN searched one query per call, hnswlib's threads 1).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mfli.retrieval.base import TRENDING_FACET, Query, Recommendation, score
from mfli.retrieval.learned import empty_recommendation

log = logging.getLogger(__name__)


@dataclass
class Catalogue:
    """What every peer indexes: item rows, their flattened vectors and prior, and the score's shape."""

    rows: np.ndarray  # int64[n] live rows (label i of a peer = rows[i])
    flat: np.ndarray  # float32[n, F * d]
    prior: np.ndarray  # float32[n]
    facets: int
    tau: float

    @property
    def base(self) -> np.ndarray:
        """float32[n, F * d + 1]: ``[e, prior]``, the inner-product form of the score."""
        return np.ascontiguousarray(np.concatenate([self.flat, self.prior[:, None]], axis=1), np.float32)


def linear_query(q: np.ndarray, log_gates: np.ndarray) -> np.ndarray:
    """``[q_lin, 1]``: the query of the inner-product form (facets weighted by their gates)."""
    if q.shape[0] > 1:
        w = np.exp(log_gates - log_gates.max())
        q = q * (w / w.sum())[:, None]
    return np.append(q.reshape(-1), np.float32(1.0)).astype(np.float32)


def mips_to_l2(base: np.ndarray, radius: float | None = None) -> tuple[np.ndarray, float]:
    """Items ``[x, sqrt(R^2 - |x|^2)]`` (R the largest norm, or ``radius``): nearest neighbours in L2 of
    ``[q, 0]`` are then exactly the largest inner products."""
    sq = np.einsum("nd,nd->n", base, base)
    r2 = float(sq.max(initial=0.0)) if radius is None else radius**2
    return np.ascontiguousarray(np.concatenate([base, np.sqrt(np.maximum(r2 - sq, 0.0))[:, None]], 1), np.float32), \
        math.sqrt(r2)


class Peer(ABC):
    """One ANN library configured for MIPS; subclasses fill in build/search/churn."""

    name = "peer"
    param = "param"  # the bisected search parameter
    secondary_name = ""  # a second search parameter tried from a short list (the fastest is kept)
    secondary: tuple = (None,)

    @abstractmethod
    def build(self, cat: Catalogue) -> None:
        ...

    @abstractmethod
    def set_params(self, primary: int, secondary=None) -> None:
        ...

    @abstractmethod
    def grid(self, want: int) -> list[int]:
        ...

    @abstractmethod
    def search(self, x: np.ndarray, want: int) -> np.ndarray:
        """Labels (indices into the catalogue) of up to ``want`` candidates for one query ``x``."""
        ...

    @abstractmethod
    def nbytes(self) -> int:
        ...

    @abstractmethod
    def churn(self, cat: Catalogue, changed: np.ndarray, deleted: np.ndarray, added: np.ndarray) -> tuple[float, str]:
        """Absorb a churn batch into the built index: ``cat`` is the catalogue after it (labels of
        ``changed`` rows keep their label, ``deleted`` labels leave, ``added`` labels are new, at the end).
        Returns (seconds, how)."""
        ...


class HnswlibPeer(Peer):
    name, param = "hnswlib HNSW32 efC200", "ef"

    def __init__(self, m: int = 32, ef_construction: int = 200) -> None:
        self.m, self.ef_construction = m, ef_construction

    def build(self, cat: Catalogue) -> None:
        import hnswlib

        data, self.radius = mips_to_l2(cat.base)
        self.index = hnswlib.Index(space="l2", dim=data.shape[1])
        self.index.init_index(max_elements=int(data.shape[0] * 1.02) + 16, ef_construction=self.ef_construction,
                              M=self.m, random_seed=0, allow_replace_deleted=False)
        self.index.set_num_threads(1)
        self.index.add_items(data, np.arange(data.shape[0]))

    def grid(self, want: int) -> list[int]:
        return [want, 2 * want, 4 * want, 8 * want, 16 * want, 32 * want]

    def set_params(self, primary: int, secondary=None) -> None:
        self.ef = primary
        self.index.set_ef(primary)

    def search(self, x: np.ndarray, want: int) -> np.ndarray:
        labels, _ = self.index.knn_query(np.append(x, np.float32(0.0))[None, :], k=want)
        return labels[0].astype(np.int64)

    def nbytes(self) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index.bin")
            self.index.save_index(path)
            return os.path.getsize(path)

    def churn(self, cat, changed, deleted, added):
        # hnswlib updates a label's vector in place (add_items on an existing label) and marks deletions;
        # the MIPS reduction keeps the build's radius (a new item with a larger norm would need a rebuild).
        data, _ = mips_to_l2(cat.base, self.radius)
        t0 = time.perf_counter()
        self.index.add_items(data[changed], changed)
        for label in deleted.tolist():
            self.index.mark_deleted(label)
        self.index.add_items(data[added], added)
        return time.perf_counter() - t0, "update + mark_deleted + add"


def _faiss():
    import faiss

    faiss.omp_set_num_threads(1)
    return faiss


class FaissHnswPeer(Peer):
    name, param = "FAISS HNSW32", "efSearch"

    def build(self, cat: Catalogue) -> None:
        faiss = _faiss()
        data, self.radius = mips_to_l2(cat.base)
        self.index = faiss.IndexHNSWFlat(data.shape[1], 32)
        self.index.hnsw.efConstruction = 200
        t0 = time.perf_counter()
        self.index.add(data)
        self.build_s = time.perf_counter() - t0

    def grid(self, want: int) -> list[int]:
        return [want, 2 * want, 4 * want, 8 * want, 16 * want, 32 * want]

    def set_params(self, primary: int, secondary=None) -> None:
        self.index.hnsw.efSearch = max(primary, 1)

    def search(self, x: np.ndarray, want: int) -> np.ndarray:
        _, labels = self.index.search(np.append(x, np.float32(0.0))[None, :], want)
        return labels[0]

    def nbytes(self) -> int:
        return int(_faiss().serialize_index(self.index).nbytes)

    def churn(self, cat, changed, deleted, added):
        # IndexHNSWFlat cannot remove or update a vector: absorbing churn is a rebuild over a catalogue of
        # the same size, i.e. the build just timed (not repeated: minutes at 10^6 items on this box).
        return self.build_s, "rebuild (IndexHNSW cannot delete or update; = build time)"


class _FaissIvf(Peer):
    param = "nprobe"

    def nlist_for(self, n: int) -> int:
        return int(max(16, 2 ** round(math.log2(4 * math.sqrt(n)))))

    def grid(self, want: int) -> list[int]:
        g, p = [], 1
        while p < self.nlist:
            g.append(p)
            p *= 2
        return g + [self.nlist]

    def set_params(self, primary: int, secondary=None) -> None:
        self.index.nprobe = primary

    def _train_add(self, index, base: np.ndarray) -> None:
        rng = np.random.default_rng(0)
        # 40 points per list (FAISS warns below 39); more buys little and costs minutes at 10^6 items
        sample = base[rng.choice(base.shape[0], size=min(base.shape[0], 40 * self.nlist), replace=False)]
        index.train(sample)
        index.add_with_ids(base, np.arange(base.shape[0], dtype=np.int64))

    def nbytes(self) -> int:
        return int(_faiss().serialize_index(self.index).nbytes)

    def churn(self, cat, changed, deleted, added):
        faiss = _faiss()
        base = self._prepare(cat.base)
        t0 = time.perf_counter()
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(np.concatenate([changed, deleted]).astype(np.int64)))
            how = "remove_ids + add_with_ids"
        except RuntimeError:  # a layout without removal: rebuild the lists (the quantisers stay trained)
            self.index.reset()
            keep = np.setdiff1d(np.arange(base.shape[0]), np.concatenate([deleted]))
            self.index.add_with_ids(base[keep], keep.astype(np.int64))
            how = "reset + re-add all (no remove_ids)"
            changed, added = np.empty(0, np.int64), np.empty(0, np.int64)
        ids = np.concatenate([changed, added]).astype(np.int64)
        self.index.add_with_ids(base[ids], ids)
        self._churned(cat, base)
        return time.perf_counter() - t0, how

    def _prepare(self, base: np.ndarray) -> np.ndarray:
        return base

    def _churned(self, cat, base) -> None:
        """Hook after a churn batch is added (the fast-scan peer re-reads its refine vectors); none here."""


class FaissIvfFlatPeer(_FaissIvf):
    name = "FAISS IVF-Flat"

    def build(self, cat: Catalogue) -> None:
        faiss = _faiss()
        base = cat.base
        self.nlist = self.nlist_for(base.shape[0])
        self.quantizer = faiss.IndexFlatIP(base.shape[1])
        self.index = faiss.IndexIVFFlat(self.quantizer, base.shape[1], self.nlist, faiss.METRIC_INNER_PRODUCT)
        self._train_add(self.index, base)

    def search(self, x: np.ndarray, want: int) -> np.ndarray:
        _, labels = self.index.search(x[None, :], want)
        return labels[0]


class FaissIvfPqFastScanPeer(_FaissIvf):
    name = "FAISS IVF-PQ fast-scan + refine"
    secondary_name = "refine factor"
    secondary = (2, 4, 8)

    def build(self, cat: Catalogue) -> None:
        faiss = _faiss()
        base = self._prepare(cat.base)
        self.nlist = self.nlist_for(base.shape[0])
        self.quantizer = faiss.IndexFlatIP(base.shape[1])
        self.index = faiss.IndexIVFPQFastScan(self.quantizer, base.shape[1], self.nlist, base.shape[1] // 2, 4,
                                              faiss.METRIC_INNER_PRODUCT)
        self._train_add(self.index, base)
        self.refine_data = base
        self.factor = 4

    def _prepare(self, base: np.ndarray) -> np.ndarray:
        pad = (-base.shape[1]) % 4  # sub-quantisers of 2 dims, an even count of them
        return np.ascontiguousarray(np.pad(base, ((0, 0), (0, pad))), np.float32) if pad else base

    def _churned(self, cat, base) -> None:
        self.refine_data = base

    def set_params(self, primary: int, secondary=None) -> None:
        self.index.nprobe = primary
        if secondary is not None:
            self.factor = secondary

    def _refine(self, x: np.ndarray, labels: np.ndarray, want: int) -> np.ndarray:
        labels = labels[labels >= 0]
        if labels.size <= want:
            return labels
        s = self.refine_data[labels, : x.size] @ x
        top = np.argpartition(-s, want - 1)[:want]
        return labels[top]

    def search(self, x: np.ndarray, want: int) -> np.ndarray:
        xp = np.pad(x, (0, self.refine_data.shape[1] - x.size))
        _, labels = self.index.search(xp[None, :], want * self.factor)
        return self._refine(x, labels[0], want)

    def nbytes(self) -> int:
        return int(_faiss().serialize_index(self.index).nbytes) + int(self.refine_data.nbytes)


class ScannPeer(Peer):
    name, param = "ScaNN tree+AH+reorder", "leaves_to_search"
    secondary_name = "reorder factor"
    secondary = (2, 4, 8)

    def build(self, cat: Catalogue) -> None:
        base = cat.base
        self.leaves = int(max(16, round(2 * math.sqrt(base.shape[0]))))
        self.searcher = self._builder(base).build()
        self.leaves_to_search, self.factor = 32, 4

    def grid(self, want: int) -> list[int]:
        g, p = [], 1
        while p < self.leaves:
            g.append(p)
            p *= 2
        return g + [self.leaves]

    def set_params(self, primary: int, secondary=None) -> None:
        self.leaves_to_search = primary
        if secondary is not None:
            self.factor = secondary

    def search(self, x: np.ndarray, want: int) -> np.ndarray:
        labels, _ = self.searcher.search(x, final_num_neighbors=want, pre_reorder_num_neighbors=want * self.factor,
                                         leaves_to_search=self.leaves_to_search)
        return labels.astype(np.int64)

    def nbytes(self) -> int:
        tmp = tempfile.mkdtemp(prefix="mfli-scann-")
        try:
            self.searcher.serialize(tmp)
            return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _builder(self, base: np.ndarray):
        import scann

        n = base.shape[0]
        return (scann.scann_ops_pybind.builder(base, 10, "dot_product")
                .tree(num_leaves=self.leaves, num_leaves_to_search=min(self.leaves, 32),
                      training_sample_size=min(n, 100_000))
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(100)
                .set_n_training_threads(1))

    def churn(self, cat, changed, deleted, added):
        # ScaNN updates in place only in a searcher built with docids (whose search answers strings, a
        # per-query conversion the timed searcher above does not pay): one is built untimed, then timed.
        n_before = cat.rows.size - added.size
        updatable = self._builder(cat.base[:n_before]).build(docids=[str(i) for i in range(n_before)])
        ids = np.concatenate([changed, added])
        t0 = time.perf_counter()
        updatable.upsert([str(i) for i in ids.tolist()], np.ascontiguousarray(cat.base[ids]), batch_size=ids.size)
        updatable.delete([str(i) for i in deleted.tolist()])
        return time.perf_counter() - t0, "upsert + delete (docid searcher)"


PEERS: dict[str, Callable[[], Peer]] = {
    "hnswlib": HnswlibPeer, "faiss-hnsw": FaissHnswPeer, "faiss-ivf-flat": FaissIvfFlatPeer,
    "faiss-ivfpq-fs": FaissIvfPqFastScanPeer, "scann": ScannPeer,
}


def available(names: list[str]) -> tuple[list[str], list[str]]:
    """(peers whose library imports, notes for those that do not)."""
    modules = {"hnswlib": "hnswlib", "faiss-hnsw": "faiss", "faiss-ivf-flat": "faiss", "faiss-ivfpq-fs": "faiss",
               "scann": "scann"}
    ok, notes = [], []
    for name in names:
        try:
            __import__(modules[name])
            ok.append(name)
        except ImportError:
            notes.append(f"peer {name} skipped: {modules[name]} not installed (pip install 'mfli[bench]')")
    return ok, notes


class PeerRetriever:
    """A :class:`~mfli.retrieval.base.Retriever` over a peer: the query's ready-made vector, the peer's
    candidates, then the exact score (the learned index's), exclusions and top k."""

    def __init__(self, peer: Peer, cat: Catalogue) -> None:
        self.peer, self.cat, self.name = peer, cat, peer.name

    def want(self, query: Query) -> int:
        return min(self.cat.rows.size, query.k + int(np.asarray(query.exclude).size))

    def recommend(self, query: Query) -> Recommendation:
        if query.vector is None:
            raise ValueError("peers answer queries that carry their vector (benchmarks.workloads)")
        if self.cat.rows.size == 0:
            return empty_recommendation()
        x = linear_query(query.vector, query.log_gates)
        want = self.want(query)
        return self.finish(query, self.peer.search(x, want))

    def finish(self, query: Query, labels: np.ndarray) -> Recommendation:
        labels = labels[labels >= 0]
        rows = self.cat.rows[labels]
        f = self.cat.facets
        vecs = self.cat.flat[labels].reshape(labels.size, f, -1)
        gates = query.log_gates
        s = score(query.vector, vecs, self.cat.prior[labels], gates, self.cat.tau)
        exclude = np.asarray(query.exclude, dtype=np.int64)
        if exclude.size:
            keep = ~np.isin(rows, exclude)
            rows, s = rows[keep], s[keep]
        order = np.lexsort((rows, -s))[: query.k]
        return Recommendation(rows=rows[order], scores=s[order], facets=np.full(order.size, TRENDING_FACET, np.int16),
                              clusters=np.full(order.size, -1, np.int64), candidates=int(labels.size))
