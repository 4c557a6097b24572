"""The users store: each user's recent engaged items, written by the learner, read by the server.

The server builds a user's query vector from this history with numpy (docs/design.md §Serving: no
torch at serve time), so a user's answers change as soon as the learner writes their new event here,
before any training touches the embeddings.

Layout (one LMDB environment, single writer = the learner process, any number of readers)
-----------------------------------------------------------------------------------------
``users``  user_id (utf-8) → orjson ``{"i": [item ids], "t": [ts ms], "e": [event ids], "v": n}``,
           the user's last ``keep`` events sorted by time (oldest first: the seen items answers leave
           out, ``model.seen_items``); ``e`` holds the event ids of the newest H only (the query window,
           and the de-duplication window below), so a long record stays cheap to parse on every
           request; ``v`` counts events applied to the user.
``meta``   ``b"version"`` → int64 bumped per write transaction;
           ``b"offsets"`` → orjson ``{"topic:partition": next offset}`` the store reflects.

Idempotency: applying an event whose ``event_id`` is already in the user's H-event window is a no-op,
and an event older than a full window is dropped, so replaying the uncommitted
tail after a crash leaves the store exactly as it was (docs/design.md §Delivery: at-least-once in, exactly-once state).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lmdb
import orjson

from mfli.events import InteractionEvent

#: topic configs of ``mfli.user-state`` (server replicas' copy of this store) when mfli creates it:
#: compacted per user (deploy/ creates it the same way)
USER_STATE_TOPIC_CONFIGS = {"cleanup.policy": "compact", "delete.retention.ms": "86400000",
                            "segment.ms": "3600000"}
_VERSION = b"version"
_I64 = struct.Struct("<q")
_OFFSETS = b"offsets"


class UsersStore:
    """Recent history per user in LMDB. Open with ``readonly=True`` in the server."""

    def __init__(self, path: str | Path, history: int = 50, map_size: int = 4 << 30, readonly: bool = False,
                 keep: int = 0) -> None:
        self.path = Path(path)
        self.window = history
        self.keep = max(history, keep)  # events kept per user: the window plus older seen items
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path), map_size=map_size, max_dbs=4, readonly=readonly, lock=True, readahead=False,
            subdir=True, create=not readonly,
        )
        self._users = self.env.open_db(b"users", create=not readonly)
        self._meta = self.env.open_db(b"meta", create=not readonly)

    # --- writer -----------------------------------------------------------------------------------
    def apply(self, events: Iterable[InteractionEvent], offsets: Mapping[str, int] | None = None) -> int:
        """Append events to their users' windows in ONE transaction, with the offsets they reflect.

        Returns how many events changed a history (replays and stale events change nothing).
        """
        by_user: dict[str, list[InteractionEvent]] = {}
        for ev in events:
            by_user.setdefault(ev.user_id, []).append(ev)
        changed = 0
        with self.env.begin(write=True) as txn:
            for user, evs in by_user.items():
                key = user.encode()
                raw = txn.get(key, db=self._users)
                rec: dict[str, Any] = orjson.loads(raw) if raw else {"i": [], "t": [], "e": [], "v": 0}
                before = rec["v"]
                self._merge(rec, evs)
                if rec["v"] != before:
                    txn.put(key, orjson.dumps(rec), db=self._users)
                    changed += rec["v"] - before
            if offsets:
                stored = self._offsets(txn)
                stored.update({k: int(v) for k, v in offsets.items()})
                txn.put(_OFFSETS, orjson.dumps(stored), db=self._meta)
            txn.put(_VERSION, _I64.pack(self._version(txn) + 1), db=self._meta)
        return changed

    def _merge(self, rec: dict, events: list[InteractionEvent]) -> None:
        known = set(rec["e"])
        n_win = len(rec["e"])  # the newest n_win entries carry their event ids
        older_t, older_i = rec["t"][: len(rec["t"]) - n_win], rec["i"][: len(rec["i"]) - n_win]
        entries = list(zip(rec["t"][len(older_t):], rec["i"][len(older_i):], rec["e"], strict=True))
        full = len(entries) >= self.window
        oldest = entries[0][0] if entries else None
        for ev in events:
            if ev.event_id in known or (full and oldest is not None and ev.ts < oldest):
                continue
            known.add(ev.event_id)
            entries.append((ev.ts, ev.item_id, ev.event_id))
            rec["v"] += 1
        entries.sort(key=lambda e: e[0])  # stable: equal timestamps keep arrival order
        evicted, entries = entries[: -self.window], entries[-self.window :]
        older = self.keep - len(entries)  # room for items older than the window
        t = (older_t + [e[0] for e in evicted])[-older:] if older > 0 else []
        i = (older_i + [e[1] for e in evicted])[-older:] if older > 0 else []
        rec["t"] = t + [e[0] for e in entries]
        rec["i"] = i + [e[1] for e in entries]
        rec["e"] = [e[2] for e in entries]

    def put_records(self, records: Mapping[bytes, bytes | None], offsets: Mapping[str, int] | None = None) -> int:
        """Store whole user records as they are (a server replica copying the learner's store from
        ``mfli.user-state``), with the offsets they reflect, in ONE transaction; None deletes a user."""
        with self.env.begin(write=True) as txn:
            for key, raw in records.items():
                if raw is None:
                    txn.delete(key, db=self._users)
                else:
                    txn.put(key, raw, db=self._users)
            if offsets:
                stored = self._offsets(txn)
                stored.update({k: int(v) for k, v in offsets.items()})
                txn.put(_OFFSETS, orjson.dumps(stored), db=self._meta)
            txn.put(_VERSION, _I64.pack(self._version(txn) + 1), db=self._meta)
        return len(records)

    def records(self, user_ids: Iterable[str]) -> dict[str, bytes]:
        """The stored record bytes of these users (absent ones left out): what the learner publishes."""
        keys = sorted({u.encode() for u in user_ids})
        with self.env.begin() as txn, txn.cursor(db=self._users) as cur:
            return {bytes(k).decode(): bytes(v) for k, v in cur.getmulti(keys)}

    def event_ids(self, user_id: str) -> list[str]:
        """Event ids in the user's H-event window (the chaos run compares stores by them)."""
        with self.env.begin() as txn:
            raw = txn.get(user_id.encode(), db=self._users)
        return [] if raw is None else list(orjson.loads(raw)["e"])

    # --- readers ----------------------------------------------------------------------------------
    def history(self, user_id: str) -> tuple[list[str], list[int], int]:
        """(every kept item id oldest first, their ts in ms, events applied) — empty for an unknown user.
        Queries read the newest H of them; answers leave them all out."""
        with self.env.begin() as txn:
            raw = txn.get(user_id.encode(), db=self._users)
        if raw is None:
            return [], [], 0
        rec = orjson.loads(raw)
        return rec["i"], rec["t"], rec["v"]

    def version(self) -> int:
        with self.env.begin() as txn:
            return self._version(txn)

    def _version(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_VERSION, db=self._meta)
        return 0 if raw is None else _I64.unpack(raw)[0]

    def offsets(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return self._offsets(txn)

    def _offsets(self, txn: lmdb.Transaction) -> dict[str, int]:
        raw = txn.get(_OFFSETS, db=self._meta)
        return orjson.loads(raw) if raw else {}

    def users(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self._users)["entries"]

    def user_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` user ids, in key order (tests and tools that audit the store)."""
        out: list[str] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._users)
            for key in cursor.iternext(keys=True, values=False):
                out.append(bytes(key).decode())
                if len(out) >= limit:
                    break
        return out

    def close(self) -> None:
        self.env.close()
