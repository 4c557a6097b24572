"""Capturing every committed change of the index LMDB, for server replicas (the wire format is
:mod:`.changes`; the Kafka side lives in ``mfli.indexer.publish_changes``: this package has no Kafka).

How: :class:`RecordingEnv` stands in for the writer's LMDB environment. Every write transaction the
writer opens records *which keys* it put or deleted (a full pass's ``drop`` records every key the sub-db
held). Just before the real commit, inside the same transaction, the recorder reads those keys' final
values, builds the commit's records and writes an **outbox** entry (index version → the keys it
changed) into the sub-db ``outbox`` (outside the index layout, so readers and the checker never see it).
The outbox and the state therefore commit atomically.

Why an outbox: the Kafka send happens after the LMDB commit. A crash in between would leave replicas
without that change forever. Entries are deleted (in a later write transaction) only once Kafka
acknowledged every record of their commit; on start, whatever is left is republished as one *recovery*
commit (:meth:`Outbox.recovery`): the union of their keys with their current values, from the version
before the oldest entry to the current version. A replica that already has some of it skips by version.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import lmdb

from mfli.storage.index import changes as W
from mfli.storage.index import layout as L

log = logging.getLogger(__name__)

OUTBOX_DB = b"outbox"
_PARTS = b"parts/"  # outbox key prefix: part count last published for a wire key
_U32 = struct.Struct(">I")


def _pack_keys(keys: list[bytes]) -> bytes:
    return b"".join(_U32.pack(len(k)) + k for k in keys)


def _unpack_keys(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        n = _U32.unpack_from(raw, i)[0]
        out.append(bytes(raw[i + 4:i + 4 + n]))
        i += 4 + n
    return out


class _WriteSet:
    """Keys a write transaction touched, as wire keys (``item/<row>`` or ``db/<name>/<key>``)."""

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self.keys: set[bytes] = set()
        self.clusters_changed = False

    def touch(self, name: str, key: bytes, value: bytes | None = None) -> None:
        key = bytes(key)
        if name in ("rec", "vec", "row2id"):
            self.rows.add(int(L.key_rows(key)[0]))
        elif name == "id2row":
            if value is not None:
                self.rows.add(int(L.key_rows(bytes(value))[0]))
        else:
            if name == "meta" and key == b"clusters_version":
                self.clusters_changed = True
            self.keys.add(W.db_key(name, key))

    def wire_keys(self) -> list[bytes]:
        return sorted(self.keys | {W.item_key(r) for r in self.rows})

    def __bool__(self) -> bool:
        return bool(self.rows or self.keys)


class _RecordingCursor:
    """A cursor whose writes are recorded. Only the operations the writer uses are offered: a new kind
    of write fails loudly (AttributeError) instead of silently escaping replication."""

    _READS = ("first", "last", "next", "prev", "key", "value", "item", "get", "getmulti", "set_key",
              "set_range", "iternext", "iterprev", "count", "close")

    def __init__(self, cur: lmdb.Cursor, ws: _WriteSet, name: str) -> None:
        self._cur, self._ws, self._name = cur, ws, name

    def __getattr__(self, attr: str) -> Any:
        if attr in self._READS:
            return getattr(self._cur, attr)
        raise AttributeError(f"recording cursor does not support {attr!r} (add it to {__name__})")

    def __enter__(self) -> _RecordingCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cur.close()

    def putmulti(self, items, dupdata: bool = False, overwrite: bool = True, append: bool = False):
        items = list(items)
        if dupdata or not overwrite:
            raise NotImplementedError("recording cursor: putmulti without overwrite is not replicated")
        result = self._cur.putmulti(items, dupdata=dupdata, overwrite=overwrite, append=append)
        for key, value in items:
            self._ws.touch(self._name, key, value)
        return result

    def put(self, key: bytes, value: bytes, dupdata: bool = False, overwrite: bool = True, append: bool = False):
        if dupdata or not overwrite:
            raise NotImplementedError("recording cursor: put without overwrite is not replicated")
        self._ws.touch(self._name, key, value)
        return self._cur.put(key, value, dupdata=dupdata, overwrite=overwrite, append=append)

    def delete(self, dupdata: bool = False) -> bool:
        key = bytes(self._cur.key())
        done = self._cur.delete(dupdata=dupdata)
        if done:
            self._ws.touch(self._name, key)
        return done


class RecordingTxn:
    """A write transaction that records its keys and, at commit, writes the outbox entry and hands the
    commit's records to the publisher (see the module docstring)."""

    def __init__(self, env: RecordingEnv, txn: lmdb.Transaction) -> None:
        self._env, self._txn = env, txn
        self._ws = _WriteSet()

    # reads and writes ---------------------------------------------------------------------------------
    def get(self, key: bytes, default=None, db=None):
        return self._txn.get(key, default, db=db)

    def stat(self, db):
        return self._txn.stat(db)

    def id(self) -> int:
        return self._txn.id()

    def cursor(self, db=None) -> _RecordingCursor:
        return _RecordingCursor(self._txn.cursor(db=db), self._ws, self._env.name_of(db))

    def put(self, key: bytes, value: bytes, dupdata: bool = False, overwrite: bool = True, append: bool = False,
            db=None) -> bool:
        if dupdata or not overwrite:
            raise NotImplementedError("recording txn: put without overwrite is not replicated")
        self._ws.touch(self._env.name_of(db), key, value)
        return self._txn.put(key, value, dupdata=dupdata, overwrite=overwrite, append=append, db=db)

    def delete(self, key: bytes, value: bytes = b"", db=None) -> bool:
        done = self._txn.delete(key, value, db=db)
        if done:
            self._ws.touch(self._env.name_of(db), key)
        return done

    def drop(self, db, delete: bool = True) -> None:
        if delete:
            raise NotImplementedError("recording txn: dropping a whole sub-db is not replicated")
        name = self._env.name_of(db)
        with self._txn.cursor(db=db) as cur:
            for key in cur.iternext(keys=True, values=False):
                self._ws.touch(name, bytes(key))
        self._txn.drop(db, delete=False)

    # commit -------------------------------------------------------------------------------------------
    def commit(self) -> None:
        pending = self._env.prepare(self._txn, self._ws) if self._ws else None
        self._txn.commit()
        if pending is not None:
            self._env.committed(pending)

    def abort(self) -> None:
        self._txn.abort()

    def __enter__(self) -> RecordingTxn:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


class RecordingEnv:
    """Stands in for the writer's ``lmdb.Environment``: write transactions record, the rest passes through."""

    def __init__(self, env: lmdb.Environment, dbs: Mapping[str, Any], outbox: Outbox,
                 on_commit: Callable[[int, list[W.Message]], None], acked: Callable[[], int]) -> None:
        """``on_commit(version, records)`` runs right after each commit (in the writer's thread);
        ``acked()`` says up to which version the outbox may be pruned."""
        self._env = env
        self._names = {id(handle): name for name, handle in dbs.items()}
        self.dbs = dbs
        self.outbox = outbox
        self.on_commit, self._acked = on_commit, acked

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._env, attr)

    @property
    def real(self) -> lmdb.Environment:
        return self._env

    def name_of(self, db) -> str:
        name = self._names.get(id(db))
        if name is None:
            raise ValueError("a write to a sub-db outside the index layout would not be replicated")
        return name

    def begin(self, db=None, parent=None, write: bool = False, buffers: bool = False):
        txn = self._env.begin(db=db, parent=parent, write=write, buffers=buffers)  # type: ignore[call-overload]
        return RecordingTxn(self, txn) if write else txn

    def prepare(self, txn: Any, ws: _WriteSet) -> tuple[int, list[W.Message]]:
        """Inside the transaction, before the commit: the commit's records and its outbox entry."""
        version = L.unpack_i64(txn.get(b"index_version", db=self.dbs["meta"]))
        keys = ws.wire_keys()
        values = W.read_values(txn, self.dbs, keys)
        kind = "full_pass" if ws.clusters_changed else ("delta" if ws.rows else "meta")
        old_parts = self.outbox.part_counts(txn, values)
        msgs, parts = W.build_messages(version, version - 1, kind, values, int(time.time() * 1000),
                                       self.outbox.max_value, old_parts)
        self.outbox.record(txn, version, keys, parts)
        self.outbox.prune(txn, self._acked())
        return version, msgs

    def committed(self, pending: tuple[int, list[W.Message]]) -> None:
        self.on_commit(*pending)


class Outbox:
    """The sub-db ``outbox`` of the index environment: per index version, the wire keys it changed, until
    Kafka acknowledged them; and the part count last published for each chunked value."""

    def __init__(self, env: lmdb.Environment, index_dbs: Mapping[str, Any], max_value: int) -> None:
        self.env, self.index_dbs, self.max_value = env, index_dbs, max_value
        with env.begin(write=True) as txn:
            self.db = env.open_db(OUTBOX_DB, txn=txn)

    def part_counts(self, txn, values: dict[bytes, bytes | None]) -> dict[bytes, int]:
        out = {}
        for key in values:
            raw = txn.get(_PARTS + key, db=self.db)
            if raw is not None:
                out[key] = _U32.unpack(bytes(raw))[0]
        return out

    def record(self, txn, version: int, keys: list[bytes], parts: dict[bytes, int]) -> None:
        """The entry of one commit (inside it): its wire keys, and part counts that changed."""
        txn.put(L.row_key(version), _pack_keys(keys), db=self.db)
        for key, n in parts.items():
            if n:
                txn.put(_PARTS + key, _U32.pack(n), db=self.db)
            else:
                txn.delete(_PARTS + key, db=self.db)

    def prune(self, txn, acked: int) -> None:
        """Delete entries of versions up to ``acked`` (Kafka has them), inside the caller's transaction."""
        if acked < 0:
            return
        with txn.cursor(db=self.db) as cur:
            if not cur.first():
                return
            while True:
                key = bytes(cur.key())
                if key.startswith(_PARTS) or len(key) != 8 or int(L.key_rows(key)[0]) > acked:
                    break
                if not cur.delete():
                    break

    def pending_versions(self) -> list[int]:
        with self.env.begin() as txn, txn.cursor(db=self.db) as cur:
            return [int(L.key_rows(bytes(k))[0]) for k in cur.iternext(keys=True, values=False)
                    if len(k) == 8 and not bytes(k).startswith(_PARTS)]

    def recovery(self) -> tuple[int, list[W.Message]] | None:
        """One commit republishing every key of the unacknowledged outbox entries at its current value."""
        with self.env.begin() as txn:
            keys: set[bytes] = set()
            versions = []
            with txn.cursor(db=self.db) as cur:
                for k, v in cur.iternext(keys=True, values=True):
                    k = bytes(k)
                    if len(k) == 8 and not k.startswith(_PARTS):
                        versions.append(int(L.key_rows(k)[0]))
                        keys.update(_unpack_keys(bytes(v)))
            if not versions:
                return None
            version = L.unpack_i64(txn.get(b"index_version", db=self.index_dbs["meta"]))
            values = W.read_values(txn, self.index_dbs, sorted(keys))
            old_parts = self.part_counts(txn, values)
        # part counts only grow within a recovery (a shrink's tombstones were in the original commit,
        # and republishing the current count is harmless); they are stored again by the next commit
        msgs, _ = W.build_messages(version, min(versions) - 1, "recovery", values, int(time.time() * 1000),
                                   self.max_value, old_parts)
        log.info("republishing %d keys of unacknowledged index versions %d..%d as version %d", len(keys),
                 min(versions), max(versions), version)
        return version, msgs

