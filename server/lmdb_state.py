"""The server's state over the live stores: the index LMDB (indexer) and the users LMDB (learner).

Both are opened read-only inside the worker (after fork). One request = one :class:`LmdbIndexView`, i.e.
one LMDB read transaction: a request never mixes two index versions, even while a full pass swaps
every posting list (that swap is one write transaction). The users store is read in its own short
transaction; a user's history and the index may be from slightly different moments, which is harmless
(history items unknown to the index are dropped).

Either store may not exist yet when the server starts (the learner/indexer have not written anything):
``/readyz`` says so with 503 and routes needing the index answer 503; users are treated as unknown
(fallback) until the users store appears.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb
import numpy as np

from mfli.config import Settings
from mfli.storage.index.reader import LmdbIndex, LmdbIndexView
from mfli.storage.users_lmdb import UsersStore

log = logging.getLogger(__name__)

_MAX_KEY = 511  # LMDB's maximum key size (bytes)


class _LmdbRead:
    """:class:`~mfli.server.state.ReadState` over one index read transaction."""

    def __init__(self, view: LmdbIndexView, users: UsersStore | None) -> None:
        self.view = view
        self._users = users
        self.index_version = view.version
        self.codebook_version = view.codebook_version()

    def rows_of(self, item_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        # An id LMDB cannot hold as a key (empty, or > 511 bytes) is unknown by definition; asking the
        # cursor for it raises BadValsizeError (found by tests/test_fuzz_http.py: a 500 on POST triggers).
        keyable = [0 < len(i) and len(i.encode()) <= _MAX_KEY for i in item_ids]
        if not all(keyable):
            rows = np.full(len(item_ids), -1, np.int64)
            idx = [j for j, ok in enumerate(keyable) if ok]
            if idx:
                rows[idx] = self.view.rows_of([item_ids[j] for j in idx])
        else:
            rows = self.view.rows_of(item_ids)
        known = rows >= 0
        if known.any():
            idx = np.flatnonzero(known)
            alive = self.view.clusters_of(rows[idx])[:, 0] >= 0  # deleted items have no cluster
            known[idx[~alive]] = False
        return rows[known], [i for i, ok in zip(item_ids, known.tolist(), strict=True) if not ok]

    def ids_of(self, rows: np.ndarray) -> list[str]:
        return self.view.item_ids(rows) if rows.size else []

    def item_info(self, row: int) -> dict:
        rec = self.view.records(np.array([row]))[0]
        return {"codes": rec["codes"].tolist(), "version": int(rec["version"]), "updated_ts": int(rec["update_ts"])}

    def history(self, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        if self._users is None:
            return None
        items, ts, applied = self._users.history(user_id)
        if not applied:
            return None
        rows = self.view.rows_of(items)
        keep = rows >= 0
        return rows[keep], np.asarray(ts, dtype=np.int64)[keep]

    def fresh(self, n: int) -> np.ndarray:
        # Rows are assigned on first sight, so the highest live rows are the newest items.
        live = self.view.live_rows()
        return live[-n:][::-1] if n > 0 else np.empty(0, np.int64)

    def n_items(self) -> int:
        return self.view.n_live()


class LmdbState:
    """:class:`~mfli.server.state.StateSource` over the index and users LMDB environments."""

    def __init__(self, settings: Settings, index: LmdbIndex | None = None) -> None:
        """``index``: an already-open handle (a process that also writes the index must share the
        writer's environment: py-lmdb refuses to open one twice)."""
        self.settings = settings
        self.index = index or LmdbIndex(settings.index.path, map_size=settings.index.map_size, mirror=True)
        self._users: UsersStore | None = None
        self._ready_until = 0.0

    def open(self) -> None:
        """Try to open both stores now; a missing store is retried on later requests (not fatal)."""
        ok, reason = self.ready()
        if not ok:
            log.warning("index not ready yet: %s", reason)
        self._open_users()

    def _open_users(self) -> UsersStore | None:
        if self._users is None:
            path = self.settings.learner.users_path
            try:
                self._users = UsersStore(path, history=self.settings.model.history, readonly=True)
            except lmdb.Error as exc:
                log.debug("users store %s not available yet: %s", path, exc)
        return self._users

    def close(self) -> None:
        if self._users is not None:
            self._users.close()
            self._users = None
        self.index.close()

    def ready(self) -> tuple[bool, str]:
        """Index open, codebook present, live items. A positive answer is cached for a second: routes
        check it on every request and it costs a read transaction."""
        if time.monotonic() < self._ready_until:
            return True, ""
        try:
            with self.index.view() as view:
                view.codebooks()
                if view.n_live() <= 0:
                    return False, "index holds no live items"
        except (lmdb.Error, RuntimeError, KeyError, ValueError) as exc:
            # not ready, with the reason; never a crash loop
            return False, f"{type(exc).__name__}: {exc}"
        self._ready_until = time.monotonic() + 1.0
        return True, ""

    @contextmanager
    def read(self) -> Iterator[_LmdbRead]:
        with self.index.view() as view:
            yield _LmdbRead(view, self._open_users())

    def users_version(self) -> int:
        users = self._open_users()
        return users.version() if users is not None else -1
