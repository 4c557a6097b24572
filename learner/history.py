"""Per-user recent history: the query side of the model, with no per-user parameters.

A user's queries are the query encoder (``learner/encoder.py``) over their last H engaged items and
those events' times. The learner keeps these histories so that every training event is scored against
the query *before* the event, exactly what the server computes from the users store.
Histories are plain Python lists: appending one event is cheaper than any numpy ring-buffer update.
"""

from __future__ import annotations

import numpy as np

from mfli.learner.ids import IdMap


class UserHistories:
    """Last ``keep`` (item row, ts) per user, oldest first; queries read the last ``horizon`` (H) of them.

    Why keep more than H: the items a user engaged with are left out of their answers (the server
    excludes what the users store holds, ``model.seen_items``), so each training event leaves the same
    items out of its softmax negatives; a window of H would push down items seen earlier than that,
    which no answer shows anyway."""

    def __init__(self, horizon: int, keep: int = 0) -> None:
        self.horizon = horizon
        self.keep = max(horizon, keep)
        self.users = IdMap()
        self._items: list[list[int]] = []
        self._ts: list[list[int]] = []

    def __len__(self) -> int:
        return len(self._items)

    def rows_for(self, user_ids: list[str]) -> np.ndarray:
        rows, new = self.users.add(user_ids)
        for _ in range(len(new)):
            self._items.append([])
            self._ts.append([])
        return rows

    def advance_windows(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, commit: bool = True,
                        with_seen: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """Append the events to their users' histories, returning what each event is scored with: its
        last-H history as a left-padded ``[n, H]`` window of item rows (-1 = padding, newest last), the
        matching ``[n, H]`` event times (ms), ``has_history``, and with ``with_seen`` every kept item
        before each event as (event index, item row) pairs (else None). Events of one call see the
        earlier ones of the same user."""
        horizon, keep = self.horizon, self.keep
        rows = np.full((len(users), horizon), -1, dtype=np.int64)
        times = np.zeros((len(users), horizon), dtype=np.int64)
        has = np.zeros(len(users), dtype=bool)
        store_items, store_ts = self._items, self._ts
        if not commit:
            touched = set(users.tolist())
            store_items = {u: list(self._items[u]) for u in touched}
            store_ts = {u: list(self._ts[u]) for u in touched}
        lengths: list[int] = []
        flat: list[int] = []
        for i, (u, item, t) in enumerate(zip(users.tolist(), items.tolist(), ts.tolist(), strict=True)):
            hist, hts = store_items[u], store_ts[u]
            if hist:
                has[i] = True
                w = min(len(hist), horizon)
                rows[i, horizon - w:] = hist[-w:]
                times[i, horizon - w:] = hts[-w:]
            if with_seen:
                lengths.append(len(hist))
                flat.extend(hist)
            hist.append(item)
            hts.append(t)
            if len(hist) > keep:
                del hist[0]
                del hts[0]
        if not with_seen:
            return rows, times, has, None
        seen = (np.repeat(np.arange(len(lengths), dtype=np.int64), lengths), np.asarray(flat, dtype=np.int64))
        return rows, times, has, seen

    def windows_now(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The users' current windows (what their next event will be scored with): rows, times, has."""
        horizon = self.horizon
        rows = np.full((len(user_rows), horizon), -1, dtype=np.int64)
        times = np.zeros((len(user_rows), horizon), dtype=np.int64)
        for i, u in enumerate(user_rows.tolist()):
            hist = self._items[u]
            if hist:
                w = min(len(hist), horizon)
                rows[i, horizon - w:] = hist[-w:]
                times[i, horizon - w:] = self._ts[u][-w:]
        return rows, times, (rows[:, -1] >= 0)

    @staticmethod
    def keep_only(rows: np.ndarray, times: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows with the entries where ``keep`` is False removed and the rest re-left-padded, in order
        (deleted items leave histories: the server no longer holds their vectors)."""
        keep = keep & (rows >= 0)
        order = np.argsort(keep, axis=1, kind="stable")
        rows, times, keep = (np.take_along_axis(a, order, axis=1) for a in (rows, times, keep))
        return np.where(keep, rows, -1), np.where(keep, times, 0)

    def items_of(self, user_row: int) -> tuple[list[int], list[int]]:
        """The user's window: the last H item rows and their times, oldest first."""
        return self._items[user_row][-self.horizon:], self._ts[user_row][-self.horizon:]

    def seen_of(self, user_row: int) -> tuple[list[int], list[int]]:
        """Every kept item row (the last ``keep``) and their times, oldest first: what answers exclude."""
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
