"""Per-user recent history: the query side of the model, with no per-user parameters.

A user's query in facet f is the recency-weighted pool of the embeddings of their last H engaged items
(``mfli.retrieval.base.pool_query``). The learner keeps these histories so that every training event is
scored against the query *before* the event, exactly what the server will compute from the users store.
Histories are plain Python lists: appending one event is cheaper than any numpy ring-buffer update.
"""

from __future__ import annotations

import numpy as np

from mfli.learner.ids import IdMap


class UserHistories:
    """Last ``H`` (item row, ts) per user, oldest first."""

    def __init__(self, horizon: int, decay: float) -> None:
        self.horizon = horizon
        self.decay = decay
        self.users = IdMap()
        self._items: list[list[int]] = []
        self._ts: list[list[int]] = []
        # weights for a history of length h are _pow[h-1::-1]: newest weight 1, older decay**k
        self._pow = (decay ** np.arange(horizon, dtype=np.float64)).astype(np.float32)

    def __len__(self) -> int:
        return len(self._items)

    def rows_for(self, user_ids: list[str]) -> np.ndarray:
        rows, new = self.users.add(user_ids)
        for _ in range(len(new)):
            self._items.append([])
            self._ts.append([])
        return rows

    def advance(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, commit: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Append a batch of events in order, returning each event's history *before* it.

        Returns ``(flat_items, offsets, weights, has_history)``: event i's history is
        ``flat_items[offsets[i]:offsets[i+1]]`` (oldest first) with the matching pooling ``weights``;
        events of users with no history yet get an empty slice and ``has_history[i] = False``.
        ``commit=False`` only looks (prequential scoring: the query each event will be trained with).
        """
        flat: list[int] = []
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        lengths = np.zeros(len(users), dtype=np.int64)
        horizon = self.horizon
        store_items, store_ts = self._items, self._ts
        if not commit:
            touched = set(users.tolist())
            store_items = {u: list(self._items[u]) for u in touched}
            store_ts = {u: list(self._ts[u]) for u in touched}
        for i, (u, item, t) in enumerate(zip(users.tolist(), items.tolist(), ts.tolist())):
            hist = store_items[u]
            flat.extend(hist)
            lengths[i] = len(hist)
            hist.append(item)
            hts = store_ts[u]
            hts.append(t)
            if len(hist) > horizon:
                del hist[0]
                del hts[0]
        np.cumsum(lengths, out=offsets[1:])
        pw = self._pow
        weights = np.concatenate([pw[n - 1::-1] for n in lengths.tolist() if n]) if flat else \
            np.empty(0, dtype=np.float32)
        return np.asarray(flat, dtype=np.int64), offsets, weights.astype(np.float32), lengths > 0

    def advance_windows(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, commit: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`advance`, for the sequence encoder: each event's last-H history as a left-padded
        ``[n, H]`` window of item rows (-1 = padding, newest last), the matching ``[n, H]`` event times
        (ms) and ``has_history``."""
        horizon = self.horizon
        rows = np.full((len(users), horizon), -1, dtype=np.int64)
        times = np.zeros((len(users), horizon), dtype=np.int64)
        has = np.zeros(len(users), dtype=bool)
        store_items, store_ts = self._items, self._ts
        if not commit:
            touched = set(users.tolist())
            store_items = {u: list(self._items[u]) for u in touched}
            store_ts = {u: list(self._ts[u]) for u in touched}
        for i, (u, item, t) in enumerate(zip(users.tolist(), items.tolist(), ts.tolist())):
            hist, hts = store_items[u], store_ts[u]
            if hist:
                has[i] = True
                rows[i, horizon - len(hist):] = hist
                times[i, horizon - len(hist):] = hts
            hist.append(item)
            hts.append(t)
            if len(hist) > horizon:
                del hist[0]
                del hts[0]
        return rows, times, has

    def windows_now(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The users' current windows (what their next event will be scored with): rows, times, has."""
        horizon = self.horizon
        rows = np.full((len(user_rows), horizon), -1, dtype=np.int64)
        times = np.zeros((len(user_rows), horizon), dtype=np.int64)
        for i, u in enumerate(user_rows.tolist()):
            hist = self._items[u]
            if hist:
                rows[i, horizon - len(hist):] = hist
                times[i, horizon - len(hist):] = self._ts[u]
        return rows, times, (rows[:, -1] >= 0)

    @staticmethod
    def keep_only(rows: np.ndarray, times: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows with the entries where ``keep`` is False removed and the rest re-left-padded, in order
        (deleted items leave histories: the server no longer holds their vectors)."""
        keep = keep & (rows >= 0)
        order = np.argsort(keep, axis=1, kind="stable")
        rows, times, keep = (np.take_along_axis(a, order, axis=1) for a in (rows, times, keep))
        return np.where(keep, rows, -1), np.where(keep, times, 0)

    def current(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories now (for scoring without learning): flat items, offsets, weights."""
        lengths = np.asarray([len(self._items[u]) for u in user_rows.tolist()], dtype=np.int64)
        offsets = np.zeros(len(user_rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = [r for u in user_rows.tolist() for r in self._items[u]]
        pw = self._pow
        weights = np.concatenate([pw[n - 1::-1] for n in lengths.tolist() if n]) if flat else \
            np.empty(0, dtype=np.float32)
        return np.asarray(flat, dtype=np.int64), offsets, weights.astype(np.float32)

    def items_of(self, user_row: int) -> tuple[list[int], list[int]]:
        return list(self._items[user_row]), list(self._ts[user_row])

    def reset(self) -> None:
        """Forget every history (start of another training pass) but keep the user rows."""
        self._items = [[] for _ in self._items]
        self._ts = [[] for _ in self._ts]

    def state(self) -> dict:
        return {"users": self.users.state(), "items": [list(h) for h in self._items],
                "ts": [list(h) for h in self._ts]}

    def load_state(self, state: dict) -> None:
        self.users = IdMap.from_state(state["users"])
        self._items = [list(h) for h in state["items"]]
        self._ts = [list(h) for h in state["ts"]]
