"""What the learner tells the indexer (topic ``mfli.item-updates``; docs/design.md §Wire formats).

The learner publishes, per flush interval, the item rows it changed (coalesced: one delta per item,
the newest), a codebook snapshot whenever the codebooks changed, and every few seconds the query
encoder's weights (the server computes each request's query with them). Deltas carry versions so that a
replayed delta is a no-op (the indexer ignores a delta whose version is not newer than the stored one).
The wire encoding lives next to these classes so producer and consumer cannot disagree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

from mfli.retrieval.query_model import QueryModel


@dataclass
class ItemDelta:
    """New state of one item (or its deletion)."""

    item_id: str
    row: int
    version: int  # learner step that produced this state; monotonic per item
    event_ts: int  # epoch ms of the newest event that changed the item (freshness is measured from it)
    vectors: np.ndarray  # float32[F, d], L2-normalised per facet
    codes: np.ndarray  # int32[F, L] greedy residual code path per facet
    prior: float  # popularity prior, beta * log1p(decayed count)
    deleted: bool = False
    tags: list[str] = field(default_factory=list)


@dataclass
class CodebookSnapshot:
    """The residual-quantisation codebooks at a version."""

    version: int
    codebooks: np.ndarray  # float32[F, L, M, d]


# --- wire encoding ------------------------------------------------------------------------------------
# Binary, not JSON: a delta carries F x d floats per item, and JSON floats would be ~4x larger and slow to
# parse. Every message starts with an 8-byte header (magic, format version, message type) so a consumer
# can reject foreign bytes and new message types can be added without breaking old readers.
#
#   header   : b"MFLI" | u8 format=1 | u8 type (1 = item deltas, 2 = codebook snapshot) | u16 reserved
#   deltas   : u32 n | u16 F | u16 d | u16 L | u16 0 | i64 row[n] | i64 version[n] | i64 event_ts[n]
#              | f32 prior[n] | u8 deleted[n] | f32 vectors[n, F, d] | i32 codes[n, F, L]
#              | u32 id_len[n] | UTF-8 ids | u32 tags_len | JSON tags (list per item)
#   codebook : i64 version | u32 F | u32 L | u32 M | u32 d | f32 codebooks[F, L, M, d]
#   model    : u32 json_len | JSON {version, facets, dim, heads, tau, members, pooling, params: [[name, shape], ...]}
#              | f32 parameters, in that order (the query encoder, mfli.retrieval.query_model)
# All integers and floats little-endian.

WIRE_MAGIC = b"MFLI"
WIRE_FORMAT = 1
MSG_DELTAS = 1
MSG_CODEBOOK = 2
MSG_MODEL = 3
_HEADER = struct.Struct("<4sBBH")
_DELTA_HEAD = struct.Struct("<IHHHH")
_CB_HEAD = struct.Struct("<qIIII")


@dataclass
class DeltaBatch:
    """Columnar form of many :class:`ItemDelta` (what the wire carries and the indexer applies)."""

    item_ids: list[str]
    rows: np.ndarray  # int64[n]
    versions: np.ndarray  # int64[n]
    event_ts: np.ndarray  # int64[n]
    vectors: np.ndarray  # float32[n, F, d]
    codes: np.ndarray  # int32[n, F, L]
    prior: np.ndarray  # float32[n]
    deleted: np.ndarray  # bool[n]
    tags: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_deltas(cls, deltas: list[ItemDelta]) -> DeltaBatch:
        if not deltas:
            raise ValueError("DeltaBatch.from_deltas needs at least one delta (shapes come from it)")
        return cls(
            item_ids=[d.item_id for d in deltas],
            rows=np.array([d.row for d in deltas], dtype=np.int64),
            versions=np.array([d.version for d in deltas], dtype=np.int64),
            event_ts=np.array([d.event_ts for d in deltas], dtype=np.int64),
            vectors=np.stack([np.asarray(d.vectors, dtype=np.float32) for d in deltas]),
            codes=np.stack([np.asarray(d.codes, dtype=np.int32) for d in deltas]),
            prior=np.array([d.prior for d in deltas], dtype=np.float32),
            deleted=np.array([d.deleted for d in deltas], dtype=bool),
            tags=[list(d.tags) for d in deltas],
        )

    @classmethod
    def concat(cls, batches: list[DeltaBatch]) -> DeltaBatch:
        """One batch from many, in order (the indexer applies a whole poll in one transaction)."""
        if len(batches) == 1:
            return batches[0]
        tags: list[list[str]] = []
        for b in batches:
            tags.extend(b.tags or [[] for _ in b.item_ids])
        return cls(
            item_ids=[i for b in batches for i in b.item_ids],
            rows=np.concatenate([b.rows for b in batches]),
            versions=np.concatenate([b.versions for b in batches]),
            event_ts=np.concatenate([b.event_ts for b in batches]),
            vectors=np.concatenate([b.vectors for b in batches]),
            codes=np.concatenate([b.codes for b in batches]),
            prior=np.concatenate([b.prior for b in batches]),
            deleted=np.concatenate([b.deleted for b in batches]),
            tags=tags,
        )

    def to_deltas(self) -> list[ItemDelta]:
        tags = self.tags or [[] for _ in self.item_ids]
        return [
            ItemDelta(self.item_ids[i], int(self.rows[i]), int(self.versions[i]), int(self.event_ts[i]),
                      self.vectors[i], self.codes[i], float(self.prior[i]), bool(self.deleted[i]), tags[i])
            for i in range(len(self.item_ids))
        ]


def encode_deltas(deltas: list[ItemDelta] | DeltaBatch) -> bytes:
    """One wire message holding a batch of item deltas."""
    batch = deltas if isinstance(deltas, DeltaBatch) else DeltaBatch.from_deltas(deltas)
    n = len(batch)
    _, f, d = batch.vectors.shape
    levels = batch.codes.shape[2]
    ids = [i.encode() for i in batch.item_ids]
    tags = orjson.dumps(batch.tags or [[] for _ in range(n)])
    return b"".join([
        _HEADER.pack(WIRE_MAGIC, WIRE_FORMAT, MSG_DELTAS, 0),
        _DELTA_HEAD.pack(n, f, d, levels, 0),
        batch.rows.astype("<i8").tobytes(), batch.versions.astype("<i8").tobytes(),
        batch.event_ts.astype("<i8").tobytes(), batch.prior.astype("<f4").tobytes(),
        batch.deleted.astype("u1").tobytes(), batch.vectors.astype("<f4").tobytes(),
        batch.codes.astype("<i4").tobytes(), np.array([len(i) for i in ids], dtype="<u4").tobytes(),
        *ids, struct.pack("<I", len(tags)), tags,
    ])


def encode_codebook(snapshot: CodebookSnapshot) -> bytes:
    """One wire message holding a codebook snapshot."""
    cb = np.ascontiguousarray(snapshot.codebooks, dtype="<f4")
    if cb.ndim != 4:
        raise ValueError(f"codebooks must be float32[F, L, M, d], got shape {cb.shape}")
    header = _HEADER.pack(WIRE_MAGIC, WIRE_FORMAT, MSG_CODEBOOK, 0)
    return header + _CB_HEAD.pack(snapshot.version, *cb.shape) + cb.tobytes()


def encode_model(model: QueryModel) -> bytes:
    """One wire message holding a version of the query encoder (what the server runs)."""
    names = sorted(model.weights)
    head = orjson.dumps({"version": model.version, "facets": model.facets, "dim": model.dim, "heads": model.heads,
                          "tau": model.tau, "members": model.members, "pooling": model.pooling,
                          "params": [[n, list(model.weights[n].shape)] for n in names]})
    return b"".join([_HEADER.pack(WIRE_MAGIC, WIRE_FORMAT, MSG_MODEL, 0), struct.pack("<I", len(head)), head,
                     *(np.ascontiguousarray(model.weights[n], dtype="<f4").tobytes() for n in names)])


def decode_model(payload: bytes, pos: int = _HEADER.size) -> QueryModel:
    (length,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    head = orjson.loads(payload[pos:pos + length])
    pos += length
    weights = {}
    for name, shape in head["params"]:
        count = int(np.prod(shape))
        weights[name] = np.frombuffer(payload, dtype="<f4", count=count, offset=pos).reshape(shape).astype(np.float32)
        pos += 4 * count
    return QueryModel(version=int(head["version"]), weights=weights, facets=int(head["facets"]), dim=int(head["dim"]),
                      heads=int(head["heads"]), tau=float(head["tau"]), members=int(head.get("members", 1)),
                      pooling=head.get("pooling", "mixture"))


def decode_message(payload: bytes) -> DeltaBatch | CodebookSnapshot | QueryModel:
    """Inverse of :func:`encode_deltas` / :func:`encode_codebook`; raises ValueError on foreign bytes."""
    if len(payload) < _HEADER.size:
        raise ValueError(f"message of {len(payload)} bytes is shorter than the header")
    magic, fmt, kind, _ = _HEADER.unpack_from(payload, 0)
    if magic != WIRE_MAGIC or fmt != WIRE_FORMAT:
        raise ValueError(f"not an mfli item-update message (magic {magic!r}, format {fmt})")
    pos = _HEADER.size
    if kind == MSG_MODEL:
        return decode_model(payload, pos)
    if kind == MSG_CODEBOOK:
        version, *shape = _CB_HEAD.unpack_from(payload, pos)
        pos += _CB_HEAD.size
        count = int(np.prod(shape))
        cb = np.frombuffer(payload, dtype="<f4", count=count, offset=pos).reshape(shape).astype(np.float32)
        return CodebookSnapshot(version=int(version), codebooks=cb)
    if kind != MSG_DELTAS:
        raise ValueError(f"unknown item-update message type {kind}")
    n, f, d, levels, _ = _DELTA_HEAD.unpack_from(payload, pos)
    pos += _DELTA_HEAD.size

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(payload, dtype=dtype, count=count, offset=pos)
        pos += arr.nbytes
        return arr

    rows, versions, event_ts = (take("<i8", n).astype(np.int64) for _ in range(3))
    prior = take("<f4", n).astype(np.float32)
    deleted = take("u1", n).astype(bool)
    vectors = take("<f4", n * f * d).reshape(n, f, d).astype(np.float32)
    codes = take("<i4", n * f * levels).reshape(n, f, levels).astype(np.int32)
    lengths = take("<u4", n)
    ids = []
    for length in lengths.tolist():
        ids.append(payload[pos : pos + length].decode())
        pos += length
    (tags_len,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    tags = orjson.loads(payload[pos : pos + tags_len])
    return DeltaBatch(ids, rows, versions, event_ts, vectors, codes, prior, deleted, tags)
