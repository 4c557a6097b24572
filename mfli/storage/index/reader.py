"""Read side of the index LMDB: :class:`LmdbIndex` (the environment) and :class:`LmdbIndexView`.

The byte layout is documented in :mod:`mfli.storage.index.layout`. A view wraps ONE read transaction, so a
request sees a consistent snapshot even while the indexer commits deltas or swaps in a full pass;
LMDB readers never block the single writer. The environment is opened lazily and re-opened in a
forked child (LMDB handles must not cross ``fork``), read-only, with ``readahead`` off (random access
over a file larger than the page cache would otherwise thrash).

Hot-path reads (``vectors``, ``prior``, ``clusters_of``) fetch all keys with one ``Cursor.getmulti``
call and decode the joined bytes with ``np.frombuffer``: no per-item Python objects beyond the keys.
Whole-catalogue reads (``live_rows``, :meth:`LmdbIndex.all_vectors` for exact search) are cached per
``index_version``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lmdb
import numpy as np
import orjson

from mfli.deltas import decode_model
from mfli.retrieval.base import DenseColumns
from mfli.retrieval.clusters import FACET_SHIFT, PATH_BITS, path_keys
from mfli.retrieval.query_model import QueryModel
from mfli.storage.index import layout as L
from mfli.storage.index.mirror import IndexMirror

if TYPE_CHECKING:
    from lmdb import _Database

    from mfli.retrieval.router import ClusterRouter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemInfo:
    """What ``/v1/items/{id}`` shows about one indexed item."""

    item_id: str
    row: int
    version: int
    event_ts: int
    update_ts: int
    prior: float
    deleted: bool
    clusters: list[int]  # per facet, -1 if not indexed
    codes: list[list[int]]  # per facet, per level


class LmdbIndex:
    """A read-only handle on the index environment, safe to create before ``fork``."""

    def __init__(
        self, path: str | Path, map_size: int = 8 << 30, env: lmdb.Environment | None = None,
        mirror: bool = False,
    ) -> None:
        """``env``: share an environment already open in this process (py-lmdb refuses to open one
        twice, so an in-process reader of the writer's index passes ``writer.env``).
        ``mirror``: keep a dense numpy copy of vectors/priors/clusters (:mod:`mfli.storage.index.mirror`) so
        views gather candidates without per-key reads; the server turns it on."""
        self.path = Path(path)
        self.mirror: IndexMirror | None = IndexMirror() if mirror else None
        self.map_size = map_size
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._dbs: dict[str, _Database] = {}
        if env is not None:
            self._dbs = {name: env.open_db(name.encode(), create=False) for name in L.DB_NAMES}
            self._env, self._pid = env, os.getpid()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int, object]] = {}
        self._shape_memo: tuple[bytes, dict] | None = None

    def env(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            with self._lock:
                if self._env is None or self._pid != os.getpid():
                    self._open()
        assert self._env is not None
        return self._env

    def _open(self) -> None:
        env = lmdb.open(
            str(self.path), map_size=self.map_size, max_dbs=L.MAX_DBS, readonly=True, lock=True,
            readahead=False, subdir=True, create=False,
        )
        # no explicit txn: handles opened in a read-only txn are only valid if py-lmdb commits it itself
        self._dbs = {name: env.open_db(name.encode(), create=False) for name in L.DB_NAMES}
        self._env, self._pid = env, os.getpid()

    def db(self, name: str) -> _Database:
        self.env()
        return self._dbs[name]

    def view(self, buffers: bool = True) -> LmdbIndexView:
        """A view over a fresh read transaction; use as a context manager (or call ``close()``).

        ``buffers=True`` (requests) returns zero-copy memoryviews: fastest for random ``getmulti``.
        ``buffers=False`` (whole-index scans: checker, caches) was measured >10x faster for cursor
        scans over 10^6 keys (py-lmdb's per-item memoryview creation dominates those)."""
        return LmdbIndexView(self, buffers=buffers)

    def cached(self, name: str, version: int, build):
        """Per-index-version memo shared by views (exact-search vectors, live rows, codebooks)."""
        hit = self._cache.get(name)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = build()
        self._cache[name] = (version, value)
        return value

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None


class LmdbIndexView:
    """:class:`~mfli.retrieval.base.IndexView` over one LMDB read transaction (a consistent snapshot)."""

    def __init__(self, index: LmdbIndex, buffers: bool = True) -> None:
        self._index = index
        env = index.env()
        self._txn = env.begin(buffers=True) if buffers else env.begin()
        shape = self._shape()
        if shape is None:
            self._txn.abort()
            raise RuntimeError(f"index at {index.path} is empty (no shape written yet)")
        self.facets, self.dim = int(shape["facets"]), int(shape["dim"])
        self.levels, self.codewords = int(shape["levels"]), int(shape["codewords"])
        self.version = L.unpack_i64(self._get("meta", b"index_version"))
        vec_dtype = self._get("meta", b"vec_dtype")
        #: dtype of the stored vectors (little-endian float32, or float16 with ``index.store_float16``)
        self.vec_dtype = np.dtype(bytes(vec_dtype).decode()) if vec_dtype is not None else np.dtype("<f4")
        self._rec_dtype = L.record_dtype(self.facets, self.levels)
        self._m = None  # mirror arrays at exactly this view's version, if the index keeps a mirror
        mirror = index.mirror
        if mirror is not None and mirror.sync(self) and mirror.version == self.version:
            self._m = mirror.arrays
        #: the index's mirror when this view reads through it (it is at exactly this view's version)
        self._mirror: IndexMirror | None = mirror if self._m is not None else None
        m = self._m  # built once per view: a request asks for it several times
        self._dense = None if m is None or m.vectors.dtype != np.float32 else DenseColumns(
            m.vectors.reshape(m.vectors.shape[0], -1), m.prior, m.codes, m.scale, m.bias, m.row_slot)

    # --- plumbing ---------------------------------------------------------------------------------------
    def __enter__(self) -> LmdbIndexView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._txn.abort()

    def _get(self, db: str, key: bytes):
        return self._txn.get(key, db=self._index.db(db))

    def _meta_json(self, key: bytes):
        raw = self._get("meta", key)
        return None if raw is None else orjson.loads(bytes(raw))

    def _shape(self) -> dict | None:
        """``meta:shape``, parsed once per distinct value (every request's view reads it)."""
        raw = self._get("meta", b"shape")
        if raw is None:
            return None
        raw = bytes(raw)
        memo = self._index._shape_memo
        if memo is None or memo[0] != raw:
            memo = self._index._shape_memo = (raw, orjson.loads(raw))
        return memo[1]

    def _multi(self, db: str, rows: np.ndarray) -> bytes:
        """Joined values of ``rows`` in ``db``, in order (getmulti skips missing keys: that raises)."""
        keys = L.row_keys(rows)
        with self._txn.cursor(db=self._index.db(db)) as cur:
            found = cur.getmulti(keys)
        if len(found) != len(keys):
            missing = set(keys) - {bytes(k) for k, _ in found}
            raise KeyError(f"rows not in the index: {sorted(L.key_rows(list(missing)).tolist())[:10]}")
        return b"".join(v for _, v in found)

    def records(self, rows: np.ndarray) -> np.ndarray:
        """Structured ``rec`` array (:func:`~mfli.storage.index.layout.record_dtype`) of the given rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty(0, dtype=self._rec_dtype)
        return np.frombuffer(self._multi("rec", rows), dtype=self._rec_dtype)

    # --- IndexView --------------------------------------------------------------------------------------
    def vectors(self, rows: np.ndarray, use_mirror: bool = True) -> np.ndarray:
        """float32[n, F, d]; deleted items have no stored vectors and come back as zeros."""
        rows = np.asarray(rows, dtype=np.int64)
        if use_mirror and self._m is not None:
            return self._m.vectors[rows].astype(np.float32, copy=False)
        if rows.size == 0:
            return np.empty((0, self.facets, self.dim), dtype=np.float32)
        keys = L.row_keys(rows)
        with self._txn.cursor(db=self._index.db("vec")) as cur:
            found = cur.getmulti(keys)
        if len(found) == len(keys):
            raw = np.frombuffer(b"".join(v for _, v in found), dtype=self.vec_dtype)
            return raw.reshape(rows.size, self.facets, self.dim).astype(np.float32, copy=False)
        out = np.zeros((rows.size, self.facets, self.dim), dtype=np.float32)
        values = {bytes(k): v for k, v in found}
        for i, k in enumerate(keys):
            if k in values:
                out[i] = np.frombuffer(values[k], dtype=self.vec_dtype).reshape(self.facets, self.dim)
        return out

    def prior(self, rows: np.ndarray) -> np.ndarray:
        if self._m is not None:
            return self._m.prior[np.asarray(rows, dtype=np.int64)]
        return self.records(rows)["prior"].astype(np.float32)

    def clusters_of(self, rows: np.ndarray) -> np.ndarray:
        if self._m is not None:
            return self._m.clusters[np.asarray(rows, dtype=np.int64)]
        rec = self.records(rows)
        out = rec["clusters"].astype(np.int64).reshape(-1, self.facets)
        out[rec["deleted"] != 0] = -1
        return out

    def members(self, facet: int, cluster: int, limit: int) -> np.ndarray:
        if cluster < 0:
            return np.empty(0, np.int64)
        raw = self._get("post", L.post_key(facet, cluster))
        if raw is None:
            return np.empty(0, np.int64)
        return np.frombuffer(raw, dtype="<i8", count=min(limit, len(raw) // 8)).copy()

    def members_many(
        self, facets: np.ndarray, clusters: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Batched :meth:`members`: rows of all pairs concatenated, count per pair, and with a mirror each
        row's code slot. With a mirror, a posting list not edited since the mirror's load comes from its
        cluster-ordered copy (no LMDB read; the slots are sequential); only edited ones are read (one
        ``getmulti``), their codes from each row's own slot."""
        m = self._m
        if m is None:
            rows, counts = self._read_postings(facets, clusters, limit)
            return rows, counts, None
        from mfli.retrieval.kernels import assemble_members  # numba: only the server (mirror) needs it

        inside = clusters < m.dirty.shape[1]
        firsts = np.full(clusters.size, -1, np.int64)
        sizes = np.zeros(clusters.size, np.int64)
        firsts[inside] = m.ivf_first[facets[inside], clusters[inside]]
        sizes[inside] = np.minimum(m.ivf_len[facets[inside], clusters[inside]], limit)
        stale = ~inside
        stale[inside] = m.dirty[facets[inside], clusters[inside]]
        read = np.empty(0, np.int64)
        if stale.any():
            read, sizes[stale] = self._read_postings(facets[stale], clusters[stale], limit)
        rows, slots = assemble_members(m.ivf_rows, firsts, sizes, stale, read, m.row_slot)
        return rows, sizes, slots

    def _read_postings(self, facets: np.ndarray, clusters: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Posting lists from LMDB (one ``getmulti``): rows of all pairs concatenated, count per pair."""
        keys = L.post_keys(facets, clusters)
        with self._txn.cursor(db=self._index.db("post")) as cur:
            found = cur.getmulti(keys)
        values = [v for _, v in found]
        cut = limit * 8
        parts = [v if len(v) <= cut else v[:cut] for v in values]
        sizes = np.fromiter(map(len, parts), np.int64, len(parts)) >> 3
        if len(found) == len(keys):  # the usual case: every chosen cluster has a posting list
            counts = sizes
        else:
            have = {bytes(k) for k, _ in found}
            counts = np.zeros(len(keys), np.int64)
            counts[np.array([k in have for k in keys], bool)] = sizes
        rows = np.frombuffer(b"".join(parts), dtype="<i8").copy() if parts else np.empty(0, np.int64)
        return rows, counts

    def paths_clusters(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`path_clusters` for paths ``[F, p, L]`` of every facet (one ``getmulti``, or the
        mirror's path map, which follows every path the writer adds)."""
        paths = np.asarray(paths, dtype=np.int64)
        m = self._m
        if m is not None:
            from mfli.retrieval.kernels import lookup_paths

            return lookup_paths(m.path_key, m.path_ptr, m.path_ids, np.ascontiguousarray(paths), PATH_BITS)
        valid = paths[:, :, 0] >= 0
        facet_of = np.broadcast_to(np.arange(paths.shape[0])[:, None], valid.shape)[valid]
        keys = [L.path_key_bytes(f, k)
                for f, k in zip(facet_of.tolist(), path_keys(paths[valid]).tolist(), strict=True)]
        with self._txn.cursor(db=self._index.db("paths")) as cur:
            found = cur.getmulti(keys)
        if not found:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        clusters = np.frombuffer(b"".join(v for _, v in found), dtype="<i8").copy()
        facets = np.repeat([L.path_key_parts(bytes(k))[0] for k, _ in found], [len(v) // 8 for _, v in found])
        return facets.astype(np.int64), clusters

    def codebook_version(self) -> int:
        """Version of the codebook the clusters were built with (-1 before the first full pass)."""
        return L.unpack_i64(self._get("meta", b"cb_in_use"), default=-1)

    def clusters_version(self) -> int:
        """Bumped by every full pass (0 before the first): a reader caching clusters reloads when it moves."""
        return L.unpack_i64(self._get("meta", b"clusters_version"))

    def codebooks(self) -> np.ndarray:
        version = self.codebook_version()
        if version < 0:
            version = L.unpack_i64(self._get("meta", b"cb_latest"), default=-1)
        if version < 0:
            raise RuntimeError("index holds no codebook yet")

        def load() -> np.ndarray:
            # Not ``meta:cb_shape``: that is the *latest* codebook's shape, and the one in use is older
            # (a different M) between a codebook that grew and the full pass that adopts it; found by
            # ``mfli chaos`` as a server that could not start in that window.
            raw = self._get("cb", L.row_key(version))
            return np.frombuffer(bytes(raw), dtype="<f4").reshape(self.facets, self.levels, -1, self.dim)

        return self._index.cached("codebooks", version, load)

    def router(self) -> ClusterRouter | None:
        """The cluster router (:mod:`mfli.retrieval.router`) over the ``cent`` sub-db, built once per
        cluster version (centroids change only at a full pass) and shared by every view of the index."""
        from mfli.retrieval.router import ClusterRouter

        version = L.unpack_i64(self._get("meta", b"clusters_version"), default=-1)
        if version < 0:
            return None

        def load() -> ClusterRouter:
            cents = []
            for f in range(self.facets):
                raw = self._get("cent", L.facet_key(f))
                cents.append(np.empty((0, self.dim), np.float32) if raw is None else
                             np.frombuffer(bytes(raw), dtype="<f4").reshape(-1, self.dim))
            return ClusterRouter.build(cents)

        return self._index.cached("router", version, load)

    def query_model(self) -> QueryModel | None:
        """The newest published query encoder (None before the learner published one)."""
        version = L.unpack_i64(self._get("meta", b"qm_version"), default=-1)
        if version < 0:
            return None
        return self._index.cached("query_model", version, lambda: decode_model(bytes(self._get("meta", b"qm"))))

    def path_clusters(self, facet: int, path: tuple[int, ...]) -> np.ndarray:
        key = int(path_keys(np.asarray(path, dtype=np.int64))[0])
        raw = self._get("paths", L.path_key_bytes(facet, key))
        return np.empty(0, np.int64) if raw is None else np.frombuffer(raw, dtype="<i8").copy()

    def trending(self, n: int) -> np.ndarray:
        raw = self._get("meta", b"trending")
        stored = np.empty(0, np.int64) if raw is None else np.frombuffer(raw, dtype="<i8")
        if n <= stored.size or stored.size >= self.n_live():
            return stored[:n].copy()
        live = self.live_rows()
        prior = self.prior(live)
        return live[np.argsort(-prior, kind="stable")[:n]]

    def live_rows(self) -> np.ndarray:
        mirror = self._mirror
        if mirror is not None and mirror.version == self.version:
            return mirror.live_rows()
        return self._index.cached("live_rows", self.version, self._scan_live)

    def dense(self) -> DenseColumns | None:
        """The mirror's columns at this view's version (float32 storage only), else None."""
        return self._dense

    def encoder_inputs(self, model: QueryModel, rows: np.ndarray) -> np.ndarray | None:
        """``model``'s normalised encoder inputs ``[K, n, d]`` of ``rows``, from the mirror's per-item
        cache (:mod:`mfli.retrieval.inputs`); None without a mirror at this version."""
        m, mirror = self._m, self._mirror
        if m is None or mirror is None:
            return None
        return mirror.input_cache(model).inputs(model, rows, m.stamp,
                                                lambda todo: m.vectors[todo].reshape(todo.size, -1))

    # --- beyond the protocol ----------------------------------------------------------------------------
    def n_live(self) -> int:
        return L.unpack_i64(self._get("meta", b"live"))

    def offsets(self) -> dict[str, int]:
        return self._meta_json(b"offsets") or {}

    def row_of(self, item_id: str) -> int | None:
        raw = self._get("id2row", item_id.encode())
        return None if raw is None else int(L.key_rows(bytes(raw))[0])

    def rows_of(self, item_ids: list[str]) -> np.ndarray:
        """Rows of external ids, -1 for unknown ones (with a mirror, known ids are cached: an id never
        changes rows)."""
        mirror = self._mirror
        cache = mirror.id_rows if mirror is not None else None
        if cache is not None:
            hit = [cache.get(i, -1) for i in item_ids]
            if -1 not in hit:
                return np.array(hit, dtype=np.int64)
        keys = [i.encode() for i in item_ids]
        with self._txn.cursor(db=self._index.db("id2row")) as cur:
            found = cur.getmulti(keys)
            if len(found) == len(keys):  # the common case: one call, one decode
                rows = np.frombuffer(b"".join(v for _, v in found), dtype=">u8").astype(np.int64)
            else:
                rows = np.array([-1 if (v := cur.get(k)) is None else L.key_rows(bytes(v))[0] for k in keys],
                                dtype=np.int64)
        if mirror is not None and cache is not None:
            if len(cache) > mirror.cache_limit:
                cache.clear()
            cache.update((i, r) for i, r in zip(item_ids, rows.tolist(), strict=True) if r >= 0)
        return rows

    def item_ids(self, rows: np.ndarray) -> list[str]:
        mirror = self._mirror
        row_cache = mirror.row_ids if mirror is not None else None
        if row_cache is not None:
            hit = [row_cache.get(r) for r in rows.tolist()]
            if None not in hit:
                return cast(list[str], hit)
        with self._txn.cursor(db=self._index.db("row2id")) as cur:
            ids = [bytes(v).decode() for _, v in cur.getmulti(L.row_keys(rows))]
        if mirror is not None and row_cache is not None and len(ids) == rows.size:
            if len(row_cache) > mirror.cache_limit:
                row_cache.clear()
            row_cache.update(zip(rows.tolist(), ids, strict=True))
        return ids

    def item(self, item_id: str) -> ItemInfo | None:
        """The server's ``/v1/items/{id}``: codes, clusters, version and last update of one item."""
        row = self.row_of(item_id)
        if row is None:
            return None
        rec = self.records(np.array([row]))[0]
        clusters = [-1] * self.facets if rec["deleted"] else [int(c) for c in rec["clusters"]]
        return ItemInfo(
            item_id=item_id, row=row, version=int(rec["version"]), event_ts=int(rec["event_ts"]),
            update_ts=int(rec["update_ts"]), prior=float(rec["prior"]), deleted=bool(rec["deleted"]),
            clusters=clusters, codes=rec["codes"].tolist(),
        )

    def oldest_change(self) -> int | None:
        """Oldest index version still in the ``chg`` change log (None if the log is empty)."""
        with self._txn.cursor(db=self._index.db("chg")) as cur:
            return int(L.key_rows(bytes(cur.key()))[0]) if cur.first() else None

    def changed_since(self, version: int) -> np.ndarray:
        """Unique rows changed by commits after ``version`` up to this view's version (from ``chg``)."""
        parts = []
        with self._txn.cursor(db=self._index.db("chg")) as cur:
            if cur.set_range(L.row_key(version + 1)):
                for key, value in cur.iternext(keys=True, values=True):
                    if L.key_rows(bytes(key))[0] > self.version:
                        break
                    parts.append(np.frombuffer(value, dtype="<i8"))
        return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)

    def scan_records(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows ascending, records) of every stored item, deleted ones included, in one cursor pass.
        Records are the structured ``rec`` array (fields ``version``, ``event_ts``, ``update_ts``,
        ``prior``, ``deleted``, ``clusters[F]``, ``codes[F, L]``; see the layout)."""
        with self._txn.cursor(db=self._index.db("rec")) as cur:
            pairs: list[tuple[bytes | memoryview, bytes | memoryview]] = list(cur.iternext())
        if not pairs:
            return np.empty(0, np.int64), np.empty(0, dtype=self._rec_dtype)
        rows = L.key_rows(b"".join(k for k, _ in pairs))
        return rows, np.frombuffer(b"".join(v for _, v in pairs), dtype=self._rec_dtype)

    def scan_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, records, float32 vectors; zeros for deleted rows) of every stored item, one cursor pass
        per sub-db: what a reader-side cache loads in full."""
        rows, rec = self.scan_records()
        if rows.size == 0:
            return rows, rec, np.empty((0, self.facets, self.dim), np.float32)
        return rows, rec, self.vectors(rows)

    def postings(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Every posting list as (facet, cluster, int64 rows), in (facet, cluster) order."""
        with self._txn.cursor(db=self._index.db("post")) as cur:
            for key, value in cur.iternext(keys=True, values=True):
                facet, cluster = L.post_key_parts(bytes(key))
                yield facet, cluster, np.frombuffer(value, dtype="<i8").astype(np.int64)

    def path_map(self, facet: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``paths`` map of one facet as pairs: (path key, cluster) for every cluster each stored
        code path maps to (path keys as :func:`mfli.retrieval.clusters.path_keys` computes them)."""
        keys, ids = [], []
        prefix = L.facet_key(facet)
        with self._txn.cursor(db=self._index.db("paths")) as cur:
            if cur.set_range(prefix):
                for k, value in cur.iternext(keys=True, values=True):
                    if bytes(k[:2]) != prefix:
                        break
                    clusters = np.frombuffer(value, dtype="<i8").astype(np.int64)
                    keys.append(np.full(clusters.size, L.path_key_parts(bytes(k))[1], np.int64))
                    ids.append(clusters)
        if not keys:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(keys), np.concatenate(ids)

    def scan_paths(self) -> list[tuple[int, np.ndarray]]:
        """Every (``facet << FACET_SHIFT | path key``, clusters) of the path map: the mirror's full load."""
        with self._txn.cursor(db=self._index.db("paths")) as cur:
            pairs = list(cur.iternext(keys=True, values=True))
        return [((f << FACET_SHIFT) | k, np.frombuffer(bytes(v), dtype="<i8").astype(np.int64))
                for (f, k), (_, v) in zip((L.path_key_parts(bytes(k)) for k, _ in pairs), pairs, strict=True)]

    def paths_of(self, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(combined key, clusters) of the given ``facet << FACET_SHIFT | path key`` keys found."""
        mask = (1 << FACET_SHIFT) - 1
        wanted = [L.path_key_bytes(k >> FACET_SHIFT, k & mask) for k in np.asarray(keys, np.int64).tolist()]
        with self._txn.cursor(db=self._index.db("paths")) as cur:
            found = cur.getmulti(wanted)
        out = []
        for k, v in found:
            f, path = L.path_key_parts(bytes(k))
            out.append(((f << FACET_SHIFT) | path, np.frombuffer(bytes(v), dtype="<i8").astype(np.int64)))
        return out

    def scan_postings(self) -> list[tuple[bytes, bytes]]:
        """Every (posting key, posting list bytes), in key order (facet, cluster): the mirror's full load."""
        with self._txn.cursor(db=self._index.db("post")) as cur:
            return [(bytes(k), bytes(v)) for k, v in cur.iternext(keys=True, values=True)]

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(live rows, float32[n, F, d]) for exact search, cached per index version."""

        def build() -> tuple[np.ndarray, np.ndarray]:
            rows = self.live_rows()
            return rows, self.vectors(rows)

        return self._index.cached("all_vectors", self.version, build)

    def _scan_live(self) -> np.ndarray:
        rows, rec = self.scan_records()
        return rows[rec["deleted"] == 0]
