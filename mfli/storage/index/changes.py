"""Wire format of the index-change topic (``mfli.index-changes``): how the indexer's committed LMDB
changes travel to server replicas, which apply them to their own copy of the index.

Why a physical format (LMDB keys and values, not learner deltas): a replica must reach the primary's
*exact* state (byte-identical answers, a checker that compares bytes) and must never re-cluster on its
own, so it applies the indexer's decisions, not its inputs. The topic has ONE partition (a total order,
so one commit is a contiguous run of records) and is log-compacted: a key's newest record is its state,
and a new replica bootstraps by reading the topic from the start.

Records (Kafka key → value; every data record carries header ``v`` = the index version that wrote it):

==========================  ====================================================================
``item/`` + row (u64 BE)    one item: ``u32 len`` + ``rec`` value + ``u32 len`` + ``vec`` value (empty
                            for a deleted item) + external id (UTF-8). Groups the four per-item
                            sub-dbs (``rec``, ``vec``, ``row2id``, ``id2row``): one message per item
``db/<name>/`` + LMDB key   any other sub-db (``post``, ``paths``, ``cent``, ``cb``, ``chg``, ``meta``):
                            the raw value; a tombstone (null value) deletes the key
``part/`` + u16 len + key   a slice of a value larger than ``replication.max_value_bytes`` (centroids
+ u32 index                 at 10^5+ items); the main record then has an empty value and header
                            ``parts`` = count, and its parts precede it
``commit``                  the commit marker, JSON ``{"version", "base", "keys", "kind", "ts"}``:
                            the records since the previous marker turn the index at ``base`` into
                            the index at ``version``; ``keys`` = distinct data keys it wrote
==========================  ====================================================================

Consistency under compaction (:class:`CommitTracker`): a replica commits its LMDB transaction only at
a marker where its state is exactly the primary's. Compaction may have removed records of old commits
(superseded by later ones), and keeps at most ONE ``commit`` marker in the cleaned part of the log (all
markers share a key). So a marker is a consistent point when the commit is complete (all ``keys``
present) and chained (``base`` <= the previous marker's version), and — after anything torn — it is
not the first marker read: a second marker read lies in the never-compacted part, and everything before
it reads as the primary's state at that marker. The last record of the log, when it is a marker, is a
consistent point too (every record compaction removed was superseded by one already read).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import orjson

from mfli.storage.index import layout as L

ITEM_DBS = ("rec", "vec", "row2id", "id2row")
OTHER_DBS = tuple(name for name in L.DB_NAMES if name not in ITEM_DBS)
MARKER_KEY = b"commit"
ITEM_PREFIX = b"item/"
DB_PREFIX = b"db/"
PART_PREFIX = b"part/"
VERSION_HEADER = "v"
PARTS_HEADER = "parts"
KINDS = ("delta", "full_pass", "meta", "recovery")

#: topic configs of ``mfli.index-changes`` when mfli creates it (deploy/ creates it the same way):
#: compacted; recent records kept uncompacted for an hour; tombstones kept a day, longer than a replica
#: may be offline before it rebuilds (``replication.max_offline_s``); hourly segments so compaction can
#: start (the active segment is never compacted, and a full pass rewrites every item)
INDEX_CHANGES_TOPIC_CONFIGS = {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000",
                               "delete.retention.ms": "86400000", "segment.ms": "3600000"}

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class WireError(ValueError):
    """A record on the index-change topic that this version cannot decode (bad input: skipped, logged)."""


@dataclass(frozen=True)
class Message:
    """One Kafka record to produce."""

    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Marker:
    version: int
    base: int
    keys: int
    kind: str
    ts: int

    def encode(self) -> bytes:
        return orjson.dumps({"version": self.version, "base": self.base, "keys": self.keys, "kind": self.kind,
                             "ts": self.ts})

    @classmethod
    def decode(cls, raw: bytes) -> Marker:
        try:
            d = orjson.loads(raw)
            marker = cls(int(d["version"]), int(d["base"]), int(d["keys"]), str(d["kind"]), int(d["ts"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise WireError(f"bad commit marker {raw[:80]!r}: {exc}") from None
        if marker.kind not in KINDS or marker.base >= marker.version or marker.keys < 0:
            raise WireError(f"bad commit marker {d}")
        return marker


# --- keys -------------------------------------------------------------------------------------------------
def item_key(row: int) -> bytes:
    return ITEM_PREFIX + L.row_key(row)


def db_key(name: str, key: bytes) -> bytes:
    return DB_PREFIX + name.encode() + b"/" + bytes(key)


def part_key(main: bytes, index: int) -> bytes:
    return PART_PREFIX + _U16.pack(len(main)) + main + _U32.pack(index)


def parse_key(key: bytes) -> tuple[str, object]:
    """``("item", row)``, ``("db", (name, lmdb key))``, ``("part", (main key, index))`` or ``("commit", None)``."""
    if key == MARKER_KEY:
        return "commit", None
    if key.startswith(ITEM_PREFIX) and len(key) == len(ITEM_PREFIX) + 8:
        return "item", int(L.key_rows(key[len(ITEM_PREFIX):])[0])
    if key.startswith(DB_PREFIX):
        name, sep, raw = key[len(DB_PREFIX):].partition(b"/")
        if sep and name.decode(errors="replace") in OTHER_DBS:
            return "db", (name.decode(), raw)
    if key.startswith(PART_PREFIX) and len(key) >= len(PART_PREFIX) + 6:
        n = _U16.unpack(key[len(PART_PREFIX):len(PART_PREFIX) + 2])[0]
        main = key[len(PART_PREFIX) + 2:len(PART_PREFIX) + 2 + n]
        rest = key[len(PART_PREFIX) + 2 + n:]
        if len(main) == n and len(rest) == 4:
            return "part", (main, _U32.unpack(rest)[0])
    raise WireError(f"unknown index-change key {key[:60]!r}")


# --- item values ------------------------------------------------------------------------------------------
def pack_item(rec: bytes, vec: bytes | None, item_id: bytes) -> bytes:
    vec = vec or b""
    return b"".join((_U32.pack(len(rec)), rec, _U32.pack(len(vec)), vec, item_id))


def unpack_item(value: bytes) -> tuple[bytes, bytes | None, bytes]:
    try:
        n = _U32.unpack_from(value, 0)[0]
        rec = value[4:4 + n]
        m = _U32.unpack_from(value, 4 + n)[0]
        vec = value[8 + n:8 + n + m]
        item_id = value[8 + n + m:]
    except struct.error as exc:
        raise WireError(f"truncated item value ({len(value)} bytes)") from exc
    if len(rec) != n or len(vec) != m or not item_id:
        raise WireError(f"malformed item value ({len(value)} bytes)")
    return rec, (vec or None), item_id


# --- reading values out of an index transaction --------------------------------------------------------
def read_values(txn: Any, dbs: Mapping[str, Any], keys: list[bytes]) -> dict[bytes, bytes | None]:
    """The current wire value of each wire key (``item/…`` or ``db/…``) in ``txn`` (None = deleted):
    what the publisher sends after a commit, and after a crash for keys it may not have sent."""
    out: dict[bytes, bytes | None] = {}
    rows: list[int] = []
    for key in keys:
        kind, what = parse_key(key)
        if kind == "item":
            rows.append(what)  # type: ignore[arg-type]
        elif kind == "db":
            name, raw = cast(tuple[str, bytes], what)
            value = txn.get(raw, db=dbs[name])
            out[key] = None if value is None else bytes(value)
        else:
            raise WireError(f"{key[:60]!r} is not a state key")
    if rows:
        rkeys = L.row_keys(np.asarray(sorted(set(rows)), np.int64))
        found = {}
        for name in ("rec", "vec", "row2id"):
            with txn.cursor(db=dbs[name]) as cur:
                found[name] = {bytes(k): bytes(v) for k, v in cur.getmulti(rkeys)}
        for rk in rkeys:
            rec = found["rec"].get(rk)
            item_id = found["row2id"].get(rk)
            wire = ITEM_PREFIX + rk
            out[wire] = None if rec is None or item_id is None else pack_item(rec, found["vec"].get(rk), item_id)
    return out


def build_messages(version: int, base: int, kind: str, values: dict[bytes, bytes | None], ts: int,
                   max_value: int, old_parts: dict[bytes, int]) -> tuple[list[Message], dict[bytes, int]]:
    """Records of one commit (parts, data, marker last) and the new part count of every key whose count
    changed (``old_parts``: part counts last published; a shrinking value tombstones its extra parts)."""
    vh = (VERSION_HEADER, L.pack_i64(version))
    msgs: list[Message] = []
    parts_now: dict[bytes, int] = {}
    for key in sorted(values):
        value = values[key]
        big = value if value is not None and len(value) > max_value else None
        n = 0 if big is None else -(-len(big) // max_value)
        for i in range(n):
            msgs.append(Message(part_key(key, i), big[i * max_value:(i + 1) * max_value], [vh]))  # type: ignore[index]
        for i in range(n, old_parts.get(key, 0)):
            msgs.append(Message(part_key(key, i), None, [vh]))
        if n != old_parts.get(key, 0):
            parts_now[key] = n
        if big is not None:
            digest = hashlib.sha256(big).hexdigest().encode()
            msgs.append(Message(key, digest, [vh, (PARTS_HEADER, str(n).encode())]))
        else:
            msgs.append(Message(key, value, [vh]))
    distinct = len({m.key for m in msgs})
    msgs.append(Message(MARKER_KEY, Marker(version, base, distinct, kind, ts).encode(), [vh]))
    return msgs, parts_now


def header(headers, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return value
    return None


# --- the consumer side's consistency rule ----------------------------------------------------------------
class CommitTracker:
    """Decides, record by record, when a replica's state equals the primary's (see the module docstring).

    ``applied`` is the last consistent version (stored with the replica's offset). Data records of versions
    not above it are skipped (a republished commit); the caller applies the others to its open LMDB
    transaction and commits it only when :meth:`marker` returns True."""

    def __init__(self, applied: int) -> None:
        self.applied = applied
        self.chain = applied  # version of the last marker read (or the stored one)
        self.torn = False
        self.markers_read = 0
        self._seen: dict[int, set[bytes]] = {}

    def wants(self, version: int) -> bool:
        return version > self.applied

    def saw(self, version: int, key: bytes) -> None:
        self._seen.setdefault(version, set()).add(key)

    def marker(self, m: Marker, at_end: bool = False) -> bool:
        """True if the state after this marker is the primary's state at ``m.version``. ``at_end``: the
        marker is the last record of the log (the fetch that returned it says so): everything compaction
        removed was superseded by a record already read, so the state is the primary's whatever was torn."""
        seen = self._seen.pop(m.version, set())
        for v in [v for v in self._seen if v < m.version]:
            del self._seen[v]  # records of commits whose markers compaction removed: torn (counted below)
            self.torn = True
        first = self.markers_read == 0
        self.markers_read += 1
        if m.version <= self.applied:
            self.chain = max(self.chain, m.version)
            return False
        complete = len(seen) == m.keys
        chained = m.base <= self.chain
        self.chain = m.version
        if at_end:
            self.torn = False
            self.applied = m.version
            return True
        if not (complete and chained):
            self.torn = True
            return False
        if self.torn and first:
            return False  # possibly the one marker in the compacted part: wait for the next one
        self.torn = False
        self.applied = m.version
        return True

    def reset(self) -> None:
        """Start over from an empty index (a re-bootstrap from the topic start)."""
        self.__init__(0)  # type: ignore[misc]
