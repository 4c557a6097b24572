"""A server replica's copy of the index: applying ``mfli.index-changes`` records (:mod:`.changes`) to
an LMDB environment with exactly the primary's layout, so the unchanged readers (and the server's dense
mirror) work on it. Kafka-free: the replica's consuming loop is ``mfli.server.replica``.

The topic offset after the last applied record and the applied index version live in the sub-db
``repl`` of the same environment and are written in the same transaction as the state; the transaction
commits only at a marker where :class:`~.changes.CommitTracker` proves the copy equals the primary at
that version (a full pass is therefore one transaction here too, and a kill resumes exactly there).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from pathlib import Path
from typing import cast

import lmdb
import numpy as np

from mfli import metrics
from mfli.config import Settings
from mfli.storage.index import changes as W
from mfli.storage.index import layout as L

log = logging.getLogger(__name__)

REPL_DB = b"repl"
FRESHNESS_SAMPLES = 256
_EVENT_TS = struct.Struct("<q")  # rec: version (i64), then event_ts (i64, ms)


def copy_position(path: str | Path) -> tuple[int, int]:
    """(next topic offset, applied index version) stored in a replica's copy; (-1, -1) if unreadable."""
    try:
        env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=L.MAX_DBS, subdir=True, create=False)
    except lmdb.Error:
        return -1, -1
    try:
        with env.begin() as txn:
            db = env.open_db(REPL_DB, txn=txn, create=False)
            return (L.unpack_i64(txn.get(b"offset", db=db), default=-1),
                    L.unpack_i64(txn.get(b"version", db=db), default=-1))
    except lmdb.Error:
        return -1, -1
    finally:
        env.close()


class IndexCopy:
    """The replica's index LMDB and the Kafka-free part of applying index-change records to it."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        s = settings.index
        self.env = lmdb.open(str(path), map_size=s.map_size, max_dbs=L.MAX_DBS, lock=True, readahead=False,
                             subdir=True, metasync=False, sync=s.sync_commits)
        with self.env.begin(write=True) as txn:
            self.db = {name: self.env.open_db(name.encode(), txn=txn) for name in L.DB_NAMES}
            self.repl = self.env.open_db(REPL_DB, txn=txn)
        with self.env.begin() as txn:
            self.offset = L.unpack_i64(txn.get(b"offset", db=self.repl), default=-1)  # next to read; -1 = start
            applied = L.unpack_i64(txn.get(b"version", db=self.repl))
            self.alive_at = L.unpack_i64(txn.get(b"alive_at", db=self.repl))
        self.tracker = W.CommitTracker(applied)
        self._txn: lmdb.Transaction | None = None
        self._records = 0  # records in the open transaction
        self._parts: dict[tuple[bytes, int], bytes] = {}
        self._ts_pending: list[int] = []  # event_ts of items since the last marker
        self._ts_commit: list[int] = []  # ... of delta commits in the open transaction
        self.oldest_unapplied_ts: int | None = None  # Kafka timestamp of the first record not yet committed
        self.last_applied_ts: int | None = None
        self.bad = 0

    @property
    def version(self) -> int:
        return self.tracker.applied

    @property
    def pending_records(self) -> int:
        """Records applied to the open transaction, not committed yet."""
        return self._records

    def _open(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self.env.begin(write=True)
        return self._txn

    def rebootstrap(self) -> None:
        """Forget the copy (inside a transaction committed at the first consistent marker) and read the
        topic from its start."""
        metrics.REPLICA_BOOTSTRAPS.inc()
        self.abort()
        txn = self._open()
        for name in L.DB_NAMES:
            txn.drop(self.db[name], delete=False)
        txn.drop(self.repl, delete=False)
        self.tracker.reset()
        self.offset = -1
        log.warning("replica index copy %s: rebuilding from the topic start", self.path)

    def abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
        self._txn, self._records, self._parts = None, 0, {}
        self._ts_pending, self._ts_commit = [], []
        self.oldest_unapplied_ts = None

    def feed(self, offset: int, key: bytes | None, value: bytes | None, headers, ts: int,
             at_end: bool = False) -> bool:
        """Apply one record to the open transaction. True when it is a marker at which the copy equals
        the primary (the caller may then :meth:`commit`); ``at_end``: it is the log's last record."""
        try:
            kind, what = W.parse_key(key or b"")
            if kind == "commit":
                marker = W.Marker.decode(value or b"")
                if marker.kind in ("delta", "recovery"):
                    self._ts_commit.extend(self._ts_pending)
                self._ts_pending = []
                return self.tracker.marker(marker, at_end)
            raw_version = W.header(headers, W.VERSION_HEADER)
            if raw_version is None or len(raw_version) != 8:
                raise W.WireError(f"record at offset {offset} has no version header")
            version = L.unpack_i64(raw_version)
            if not self.tracker.wants(version):
                return False
            wire_key = key or b""
            self.tracker.saw(version, wire_key)
            txn = self._open()
            self._records += 1
            if self.oldest_unapplied_ts is None:
                self.oldest_unapplied_ts = ts
            if kind == "part":
                self._parts[what] = value or b""  # type: ignore[index]
                return False
            parts = W.header(headers, W.PARTS_HEADER)
            if parts is not None and value is not None:
                value = self._assemble(wire_key, int(parts), value)
                if value is None:
                    return False  # a part was compacted away: a newer value of this key follows
            if kind == "item":
                self._put_item(txn, what, value)  # type: ignore[arg-type]
            else:
                name, raw = cast(tuple[str, bytes], what)
                if value is None:
                    txn.delete(raw, db=self.db[name])
                else:
                    txn.put(raw, value, db=self.db[name])
        except W.WireError as exc:
            self.bad += 1
            metrics.REPLICA_BAD_RECORDS.labels(topic="index").inc()
            log.error("index-change record at offset %d skipped: %s", offset, exc)
        finally:
            if self._txn is None:
                # nothing applied since the last commit: a republished commit the copy already has, or a
                # bad record; move past it (stored with the next commit; re-reading it is harmless)
                self.offset = max(self.offset, offset + 1)
        return False

    def _assemble(self, key: bytes, n: int, digest: bytes) -> bytes | None:
        chunks = [self._parts.pop((key, i), None) for i in range(n)]
        if any(c is None for c in chunks):
            return None
        value = b"".join(chunks)  # type: ignore[arg-type]
        if hashlib.sha256(value).hexdigest().encode() != digest:
            return None
        return value

    def _put_item(self, txn, row: int, value: bytes | None) -> None:
        rk = L.row_key(row)
        if value is None:
            txn.delete(rk, db=self.db["rec"])
            txn.delete(rk, db=self.db["vec"])
            return
        rec, vec, item_id = W.unpack_item(value)
        txn.put(rk, rec, db=self.db["rec"])
        if vec is None:
            txn.delete(rk, db=self.db["vec"])
        else:
            txn.put(rk, vec, db=self.db["vec"])
        txn.put(rk, item_id, db=self.db["row2id"])
        txn.put(item_id, rk, db=self.db["id2row"])
        if len(rec) >= 16:
            self._ts_pending.append(_EVENT_TS.unpack_from(rec, 8)[0])

    def commit(self, next_offset: int, record_ts: int, observe: bool) -> None:
        """Commit the open transaction at a consistent marker, with the topic offset after it."""
        txn = self._open()
        now_ms = int(time.time() * 1000)
        txn.put(b"offset", L.pack_i64(next_offset), db=self.repl)
        txn.put(b"version", L.pack_i64(self.tracker.applied), db=self.repl)
        txn.put(b"alive_at", L.pack_i64(now_ms), db=self.repl)
        try:
            txn.commit()
        except lmdb.MapFullError:
            metrics.LMDB_ERRORS.labels(kind="map_full").inc()
            raise
        finally:
            self._txn = None
        self.offset, self.alive_at, self.last_applied_ts = next_offset, now_ms, record_ts
        metrics.REPLICA_RECORDS.labels(topic="index").inc(self._records)
        metrics.REPLICA_INDEX_VERSION.set(self.tracker.applied)
        if observe and self._ts_commit:
            ts = np.asarray(self._ts_commit, np.int64)
            ts = ts[ts > 0]  # 0: a prior refresh no event caused (learner.process)
            ts = ts[:: max(1, ts.size // FRESHNESS_SAMPLES)]
            done = time.time() * 1000
            for lag in ((done - ts) / 1000.0).tolist():
                metrics.REPLICA_FRESHNESS_SECONDS.labels(kind="item").observe(max(lag, 0.0))
        self._records, self._parts, self._ts_commit = 0, {}, []
        self.oldest_unapplied_ts = None

    def touch_alive(self) -> None:
        """Record that this replica is running and current (its offline time decides a re-bootstrap)."""
        if self._txn is not None:
            return
        now_ms = int(time.time() * 1000)
        with self.env.begin(write=True) as txn:
            txn.put(b"alive_at", L.pack_i64(now_ms), db=self.repl)
        self.alive_at = now_ms

    def close(self) -> None:
        self.abort()
        self.env.close()
