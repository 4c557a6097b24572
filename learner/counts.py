"""Exponentially decayed per-item counts with a half-life measured in events.

Used twice: the popularity prior ``beta * log1p(count)`` (docs/design.md §Model) and the item-frequency estimate
behind the log-Q correction of the sampled softmax. Decay is lazy: counts are stored scaled by
``2 ** (clock / half_life)`` so an increment is one ``np.add.at`` and nothing is touched per tick; the
scale is folded back in before it can overflow.
"""

from __future__ import annotations

import numpy as np


class DecayedCounts:
    """``count_j(now) = sum over events e of item j: 2 ** -((now - t_e) / half_life)``."""

    _RESCALE_EXPONENT = 400.0  # fold the scale back in before 2**x approaches float64 limits

    def __init__(self, half_life: float, capacity: int = 1024) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.half_life = float(half_life)
        self.clock = 0.0  # events seen so far
        self._origin = 0.0  # clock value at which stored values are unscaled
        self._scaled = np.zeros(capacity, dtype=np.float64)

    def _grow(self, size: int) -> None:
        if size > len(self._scaled):
            cap = max(size, 2 * len(self._scaled))
            grown = np.zeros(cap, dtype=np.float64)
            grown[: len(self._scaled)] = self._scaled
            self._scaled = grown

    def add(self, rows: np.ndarray) -> None:
        """Count one event per entry of ``rows`` (in order), advancing the clock by ``len(rows)``."""
        n = len(rows)
        if n == 0:
            return
        self._grow(int(rows.max()) + 1)
        ticks = self.clock + 1.0 + np.arange(n, dtype=np.float64)
        np.add.at(self._scaled, rows, np.exp2((ticks - self._origin) / self.half_life))
        self.clock += n
        if (self.clock - self._origin) / self.half_life > self._RESCALE_EXPONENT:
            self._scaled *= np.exp2(-(self.clock - self._origin) / self.half_life)
            self._origin = self.clock

    def values(self, size: int | None = None) -> np.ndarray:
        """Decayed counts at the current clock, float64[size]."""
        self._grow(size or 0)
        out = self._scaled * np.exp2(-(self.clock - self._origin) / self.half_life)
        return out if size is None else out[:size]

    def state(self) -> dict:
        return {"half_life": self.half_life, "clock": self.clock, "origin": self._origin,
                "scaled": self._scaled.copy()}

    @classmethod
    def from_state(cls, state: dict) -> DecayedCounts:
        c = cls(state["half_life"], capacity=max(1, len(state["scaled"])))
        c.clock, c._origin = float(state["clock"]), float(state["origin"])
        c._scaled = np.asarray(state["scaled"], dtype=np.float64).copy()
        return c


def decayed_counts(items: np.ndarray, n_items: int, half_life: float) -> np.ndarray:
    """Decayed counts at the end of a whole stream of item rows (vectorised; for tuning the prior)."""
    age = np.arange(len(items) - 1, -1, -1, dtype=np.float64)
    return np.bincount(items, weights=np.exp2(-age / half_life), minlength=n_items)
