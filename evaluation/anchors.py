"""Online anchors that keep learning through the test period: a first-order Markov chain and popularity.

Why these two: on time-ordered MovieLens a user's next rating is best predicted by what they rated
last and by what is popular right now, so a model that does not beat an *online* Markov chain and an
*online* popularity count is not learning anything a counter could not. Both are updated by
``observe`` in stream order and score with ``scores`` for the users' current state, the same
test-then-observe loop our model runs (``mfli.evaluation.streaming_anchors.score_stream``).

SASRec (the frozen neural anchor) lives in :mod:`mfli.evaluation.sasrec` and is re-exported here.
"""

from __future__ import annotations

import logging

import numpy as np

from mfli.evaluation.sasrec import SASRecAnchor, SASRecSettings

__all__ = ["OnlineMarkov", "OnlinePopularity", "SASRecAnchor", "SASRecSettings"]

log = logging.getLogger(__name__)

POPULARITY_EPSILON = 1e-6  # popularity only breaks ties between equal transition counts


def _grow(arr: np.ndarray, size: int, fill: int | float) -> np.ndarray:
    """Amortised growth (doubling) so streams that reveal new rows one by one stay linear."""
    if size <= arr.size:
        return arr
    out = np.full(max(size, 2 * arr.size), fill, dtype=arr.dtype)
    out[: arr.size] = arr
    return out


class _WindowCounts:
    """Item counts over the latest ``window`` events, as a ring buffer (O(events) per update)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 event, got {window}")
        self.window = int(window)
        self.buffer = np.zeros(self.window, dtype=np.int64)
        self.size = 0  # filled slots
        self.pos = 0  # next slot to write
        self.counts = np.zeros(16, dtype=np.int64)

    def add(self, items: np.ndarray) -> None:
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0:
            return
        self.counts = _grow(self.counts, int(items.max()) + 1, 0)
        if items.size >= self.window:  # the whole window is replaced
            self.buffer[:] = items[-self.window:]
            self.counts[:] = 0
            np.add.at(self.counts, self.buffer, 1)
            self.size, self.pos = self.window, 0
            return
        slots = (self.pos + np.arange(items.size)) % self.window
        # while filling, pos == size, so a slot holds an old event exactly when it is below size
        filled = slots[slots < self.size]
        np.subtract.at(self.counts, self.buffer[filled], 1)
        self.buffer[slots] = items
        np.add.at(self.counts, items, 1)
        self.size = min(self.window, self.size + items.size)
        self.pos = int((self.pos + items.size) % self.window)

    def values(self, n_items: int) -> np.ndarray:
        out = np.zeros(n_items, dtype=np.float64)
        k = min(n_items, self.counts.size)
        out[:k] = self.counts[:k]
        return out


class OnlineMarkov:
    """Online first-order Markov chain: score(u, j) = count[last(u)][j] + 1e-6 * popularity(j).

    ``count[a][b]`` counts, over every user stream seen so far, events of item ``b`` whose user's
    previous event was item ``a``. Popularity counts the latest ``window`` events (the caller passes
    5 % of the training events) and keeps sliding through the test period, so it only orders items
    the chain leaves tied. Transition rows are stored sparsely (a dict per source item) because a
    dense ``n_items**2`` table does not fit for 10k items; each row's arrays are cached until it
    changes, so scoring a hot row repeatedly costs one gather.
    """

    def __init__(self, window: int) -> None:
        self.popularity = _WindowCounts(window)
        self._rows: dict[int, dict[int, int]] = {}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._last = np.full(16, -1, dtype=np.int64)
        self.events = 0

    def observe(self, users: np.ndarray, items: np.ndarray) -> None:
        """Learn events in stream order; a user appearing twice in one call chains through both."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape:
            raise ValueError(f"{users.shape} users for {items.shape} items")
        if users.size == 0:
            return
        self._last = _grow(self._last, int(users.max()) + 1, -1)
        last, rows, cache = self._last, self._rows, self._cache
        for u, i in zip(users.tolist(), items.tolist(), strict=True):
            prev = int(last[u])
            if prev >= 0:
                row = rows.get(prev)
                if row is None:
                    rows[prev] = row = {}
                row[i] = row.get(i, 0) + 1
                cache.pop(prev, None)
            last[u] = i
        self.popularity.add(items)
        self.events += int(users.size)

    def last_item(self, users: np.ndarray) -> np.ndarray:
        """Each user's latest observed item, -1 if the user has none."""
        users = np.asarray(users, dtype=np.int64)
        out = np.full(users.size, -1, dtype=np.int64)
        known = (users >= 0) & (users < self._last.size)
        out[known] = self._last[users[known]]
        return out

    def transitions(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(next items, counts) observed after ``item``; cached until the row changes."""
        hit = self._cache.get(item)
        if hit is None:
            row = self._rows.get(item, {})
            hit = (np.fromiter(row.keys(), dtype=np.int64, count=len(row)),
                   np.fromiter(row.values(), dtype=np.float64, count=len(row)))
            self._cache[item] = hit
        return hit

    def scores(self, users: np.ndarray, n_items: int, dtype: type = np.float32) -> np.ndarray:
        """Scores for ``n_items`` rows from each user's current last item (popularity only if none).

        float32 (the default) rounds the 1e-6 tie-break away once counts reach the tens, making
        extra ties; pass ``dtype=np.float64`` where exact tie-breaking matters.
        """
        pop = POPULARITY_EPSILON * self.popularity.values(n_items)
        out = np.empty((len(users), n_items), dtype=np.float64)
        out[:] = pop
        for r, prev in enumerate(self.last_item(users).tolist()):
            if prev >= 0:
                cols, counts = self.transitions(prev)
                keep = cols < n_items
                out[r, cols[keep]] += counts[keep]
        return out.astype(dtype, copy=False)


class OnlinePopularity:
    """Exponentially decayed item counts: an event ``half_life`` events old weighs one half.

    Counts are stored inflated by ``2 ** (t / half_life)`` so an update touches only the new items;
    they are renormalised before the exponent could overflow float64.
    """

    _RESCALE_AT = 512.0  # exponent (in half-lives) past which the stored counts are renormalised

    def __init__(self, half_life: float) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 events, got {half_life}")
        self.half_life = float(half_life)
        self._counts = np.zeros(16, dtype=np.float64)
        self._t = 0.0  # events seen since the last renormalisation
        self.events = 0

    def observe(self, users: np.ndarray, items: np.ndarray) -> None:
        """Learn events in stream order (``users`` is accepted for API symmetry and ignored)."""
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0:
            return
        self._counts = _grow(self._counts, int(items.max()) + 1, 0.0)
        step = max(1, int(self.half_life * self._RESCALE_AT / 2))  # a chunk never overflows the exponent
        for lo in range(0, items.size, step):
            chunk = items[lo:lo + step]
            if (self._t + chunk.size) / self.half_life > self._RESCALE_AT:
                self._counts *= 2.0 ** (-self._t / self.half_life)
                self._t = 0.0
            w = 2.0 ** ((self._t + 1 + np.arange(chunk.size)) / self.half_life)
            np.add.at(self._counts, chunk, w)
            self._t += chunk.size
        self.events += int(items.size)

    def values(self, n_items: int) -> np.ndarray:
        """Decayed counts as of the latest event (the latest event weighs 1)."""
        out = np.zeros(n_items, dtype=np.float64)
        k = min(n_items, self._counts.size)
        out[:k] = self._counts[:k] * 2.0 ** (-self._t / self.half_life)
        return out

    def scores(self, users: np.ndarray, n_items: int, dtype: type = np.float32) -> np.ndarray:
        """The same popularity row for every user."""
        row = self.values(n_items).astype(dtype)
        return np.broadcast_to(row, (len(users), n_items)).copy()
