"""What the server reads, behind one small interface: an index snapshot plus the users store.

The HTTP layer and the monitors only see :class:`StateSource` (open once per worker, after fork) and
:class:`ReadState` (one consistent snapshot for the duration of a request: the LMDB implementation holds
one read transaction, so a request never mixes two index versions, even during a full pass).

:class:`MemoryState` serves an :class:`~mfli.retrieval.snapshot.ItemSnapshot` from memory: benchmarks
use it for in-process numbers and tests use it where no LMDB is involved. The LMDB implementation lives in
:mod:`mfli.server.lmdb_state`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from mfli.retrieval.base import IndexView
from mfli.retrieval.snapshot import ItemSnapshot


class ReadState(Protocol):
    """One consistent view of the index and users store."""

    view: IndexView
    index_version: int
    codebook_version: int | None

    def rows_of(self, item_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """int64 rows of the known ids (in order) and the ids that are unknown or deleted."""

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """External ids of rows."""

    def item_info(self, row: int) -> dict:
        """``codes`` (F x L list), ``version`` and ``updated_ts`` of one item."""

    def history(self, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, ts) of the user's recent live items, oldest first; None for an unknown user."""

    def fresh(self, n: int) -> np.ndarray:
        """int64 rows of the n most recently added live items (the fallback's second source)."""

    def n_items(self) -> int:
        """Live items in the index."""


class StateSource(Protocol):
    """Opens the stores (in the worker, after fork) and hands out read snapshots."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def ready(self) -> tuple[bool, str]:
        """(True, "") when an index with a codebook is open, else (False, why)."""

    def read(self) -> contextmanager[ReadState]:  # type: ignore[valid-type]
        """Context manager yielding a :class:`ReadState`."""

    def users_version(self) -> int:
        """A number that changes whenever the users store changes (cheap change detection)."""


class _MemoryRead:
    def __init__(self, owner: MemoryState) -> None:
        self._o = owner
        self.view = owner.view
        self.index_version = owner.snapshot.version
        self.codebook_version = owner.snapshot.version

    def rows_of(self, item_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        rows, unknown = [], []
        live = self._o.snapshot.live
        for item in item_ids:
            row = self._o.row_of.get(item)
            if row is None or not live[row]:
                unknown.append(item)
            else:
                rows.append(row)
        return np.asarray(rows, dtype=np.int64), unknown

    def ids_of(self, rows: np.ndarray) -> list[str]:
        ids = self._o.snapshot.item_ids
        return [str(ids[r]) for r in rows.tolist()]

    def item_info(self, row: int) -> dict:
        snap = self._o.snapshot
        return {"codes": snap.codes[row].tolist(), "version": snap.version, "updated_ts": 0}

    def history(self, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        with self._o.lock:
            entries = self._o.users.get(user_id)
            if entries is None:
                return None
            entries = list(entries)
        rows, _ = self.rows_of([item for item, _ in entries])
        known = {item for item in self.ids_of(rows)}
        ts = np.asarray([t for item, t in entries if item in known], dtype=np.int64)
        return rows, ts

    def fresh(self, n: int) -> np.ndarray:
        return self._o.live_rows[-n:][::-1] if n > 0 else np.empty(0, np.int64)

    def n_items(self) -> int:
        return int(self._o.live_rows.size)


class MemoryState:
    """An in-memory :class:`StateSource`: one snapshot, a dict of user histories.

    Rows are assigned on first sight (docs/design.md §Wire formats, ids and rows), so the highest live
    rows are the freshest items.
    """

    def __init__(self, snapshot: ItemSnapshot, view: IndexView, users: dict[str, list[tuple[str, int]]] | None = None,
                 history: int = 50) -> None:
        self.snapshot = snapshot
        self.view = view
        self.users: dict[str, list[tuple[str, int]]] = dict(users or {})
        self.row_of = snapshot.row_of()
        self.live_rows = snapshot.live_rows()
        self.history_len = history
        self.lock = threading.Lock()
        self._users_version = 0

    def open(self) -> None:
        """Nothing to open: the state lives in memory (the LMDB state opens its environments here)."""

    def close(self) -> None:
        """Nothing to release (see :meth:`open`)."""

    def ready(self) -> tuple[bool, str]:
        return True, ""

    @contextmanager
    def read(self) -> Iterator[_MemoryRead]:
        yield _MemoryRead(self)

    def users_version(self) -> int:
        return self._users_version

    def add_event(self, user_id: str, item_id: str, ts: int) -> None:
        """Append to a user's history (what the learner does to the users store)."""
        with self.lock:
            entries = self.users.setdefault(user_id, [])
            entries.append((item_id, ts))
            del entries[: -self.history_len]
            self._users_version += 1
