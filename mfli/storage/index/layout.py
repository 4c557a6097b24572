"""Byte layout of the index LMDB, shared by its single writer (:mod:`.writer`) and its readers (:mod:`.reader`).

One LMDB environment (a directory) with these named sub-databases. Integers in keys are big-endian so
LMDB's byte order is numeric order; integers and floats in values are little-endian so readers can
``np.frombuffer`` them without copying.

=========  ================================  =====================================================
sub-db     key                               value
=========  ================================  =====================================================
``rec``    row (u64 BE)                      :func:`record_dtype` struct: version, event_ts,
                                             update_ts (ms), prior (f32), deleted (u8), cluster
                                             per facet (i64[F]), codes (i32[F, L])
``vec``    row (u64 BE)                      float32[F, d] (or float16, ``meta:vec_dtype``)
``row2id`` row (u64 BE)                      external item id, UTF-8
``id2row`` item id, UTF-8                    row (u64 BE)
``post``   facet (u16 BE) + cluster (u64 BE) posting list: packed little-endian int64 rows, in
                                             descending prior as of the last full pass; members
                                             that arrive by delta are appended
``paths``  facet (u16 BE) + path key (i64 BE) int64 cluster ids the code path maps to (ascending)
``cent``   facet (u16 BE)                    float32[C, d] cluster centroids of that facet
``cb``     codebook version (u64 BE)         float32[F, L, M, d] codebooks (shape in ``meta:cb_shape``)
``chg``    index version (u64 BE)            change log: packed int64 rows whose ``rec``/``vec`` that
                                             commit changed (empty for a full pass, which bumps
                                             ``clusters_version`` instead); the last
                                             :data:`CHANGE_LOG_KEEP` versions are kept, so a reader
                                             caching item columns can catch up incrementally
``meta``   ascii name                        see below
=========  ================================  =====================================================

Meta keys: ``index_version`` (i64, bumps on every committed write), ``offsets`` (JSON
``{"topic:partition": next_offset}``, the source offsets this state reflects, written in the same
transaction as the state), ``shape`` (JSON ``{"facets", "dim", "levels", "codewords"}``),
``cb_latest`` / ``cb_in_use`` (i64 codebook versions: newest stored / used by the current clusters),
``clusters_version`` (i64, bumps per full pass), ``full_pass_ts`` (i64 ms), ``live`` (i64 count of
live items), ``trending`` (int64 rows of the highest-prior live items, descending), ``vec_dtype``,
``qm_version`` / ``qm`` (i64 version and wire bytes, :func:`mfli.deltas.encode_model`, of the newest
query encoder: the server computes request queries with it).

Path keys are the code path in radix 2^15 per level (:func:`mfli.retrieval.clusters.path_keys`),
independent of the codebook size, which the learner grows with the catalogue.
A full pass replaces ``post``, ``paths`` and ``cent`` and rewrites every ``rec`` inside ONE write
transaction: a reader's transaction sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

DB_NAMES = ("rec", "vec", "row2id", "id2row", "post", "paths", "cent", "cb", "chg", "meta")
#: index versions kept in the ``chg`` change log
CHANGE_LOG_KEEP = 2000
MAX_DBS = 16

_U64 = struct.Struct(">Q")
_FACET_CLUSTER = struct.Struct(">HQ")
_FACET_PATH = struct.Struct(">Hq")
_I64 = struct.Struct("<q")


@functools.lru_cache(maxsize=16)
def record_dtype(facets: int, levels: int) -> np.dtype:
    """Packed numpy struct of one ``rec`` value (77 bytes for F=3, L=2). Memoised: every server request
    opens a view that asks for it, and building a structured dtype was ~1 % of a request's CPU."""
    return np.dtype(
        [
            ("version", "<i8"),
            ("event_ts", "<i8"),
            ("update_ts", "<i8"),
            ("prior", "<f4"),
            ("deleted", "u1"),
            ("clusters", "<i8", (facets,)),
            ("codes", "<i4", (facets, levels)),
        ]
    )


def row_key(row: int) -> bytes:
    return _U64.pack(row)


def row_keys(rows: np.ndarray) -> list[bytes]:
    """Keys for many rows at once (one numpy conversion, then bytes slicing)."""
    buf = np.asarray(rows, dtype=">u8").tobytes()
    return [buf[i : i + 8] for i in range(0, len(buf), 8)]


def key_rows(keys: list[bytes] | bytes) -> np.ndarray:
    """Inverse of :func:`row_keys` (accepts the joined bytes too)."""
    buf = keys if isinstance(keys, bytes) else b"".join(keys)
    return np.frombuffer(buf, dtype=">u8").astype(np.int64)


def post_key(facet: int, cluster: int) -> bytes:
    return _FACET_CLUSTER.pack(facet, cluster)


def post_keys(facets: np.ndarray, clusters: np.ndarray) -> list[bytes]:
    """:func:`post_key` for many pairs at once (one numpy conversion, then bytes slicing)."""
    packed = np.empty(len(facets), dtype=[("f", ">u2"), ("c", ">u8")])
    packed["f"], packed["c"] = facets, clusters
    buf = packed.tobytes()
    return [buf[i : i + 10] for i in range(0, len(buf), 10)]


def post_key_parts(key: bytes) -> tuple[int, int]:
    facet, cluster = _FACET_CLUSTER.unpack(key)
    return int(facet), int(cluster)


def path_key_bytes(facet: int, key: int) -> bytes:
    return _FACET_PATH.pack(facet, key)


def path_key_parts(key: bytes) -> tuple[int, int]:
    facet, path = _FACET_PATH.unpack(key)
    return int(facet), int(path)


def facet_key(facet: int) -> bytes:
    return struct.pack(">H", facet)


def required(raw: bytes | None, what: str) -> bytes:
    """``raw``, a value the layout guarantees once its neighbours exist; KeyError naming ``what`` if not."""
    if raw is None:
        raise KeyError(f"index holds no {what}")
    return bytes(raw)


def pack_i64(value: int) -> bytes:
    return _I64.pack(value)


def unpack_i64(raw: bytes | None, default: int = 0) -> int:
    return default if raw is None else int(_I64.unpack(raw)[0])


def log_change(txn, chg_db, version: int, rows: np.ndarray) -> None:
    """Record in ``chg`` the rows a commit changed under its index version, then prune entries older
    than :data:`CHANGE_LOG_KEEP` versions (inside the committing write transaction)."""
    txn.put(row_key(version), np.asarray(rows, dtype="<i8").tobytes(), db=chg_db)
    horizon = version - CHANGE_LOG_KEEP
    if horizon <= 0:
        return
    with txn.cursor(db=chg_db) as cur:
        while cur.first() and key_rows(bytes(cur.key()))[0] <= horizon:
            cur.delete()
