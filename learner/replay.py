"""Experience replay: recent training examples learned again beside each micro-batch.

Why: a streaming learner sees every event once, while an offline model of the same shape sees the
training log for a dozen epochs (the SASRec anchor). Replaying a sample of the most recent examples
with each micro-batch gives the model that repetition without an offline step, and because the buffer
holds only the newest ``capacity`` examples it stays biased toward the present (drift). Each example
is stored as it was trained: the window of item rows before the event, its time-gap buckets, the
target row and whether it was a positive.
"""

from __future__ import annotations

import numpy as np


class ReplayBuffer:
    """Ring buffer of the newest ``capacity`` examples."""

    def __init__(self, capacity: int, horizon: int) -> None:
        self.capacity, self.horizon = capacity, horizon
        self.window = np.full((capacity, horizon), -1, dtype=np.int32)
        self.gaps = np.zeros((capacity, horizon), dtype=np.int8)
        self.target = np.zeros(capacity, dtype=np.int64)
        self.positive = np.zeros(capacity, dtype=bool)
        self.size = 0
        self.head = 0  # next slot to write

    def __len__(self) -> int:
        return self.size

    def add(self, window: np.ndarray, gaps: np.ndarray, target: np.ndarray, positive: np.ndarray) -> None:
        n = len(target)
        if self.capacity == 0 or n == 0:
            return
        if n > self.capacity:
            window, gaps, target, positive = window[-self.capacity:], gaps[-self.capacity:], \
                target[-self.capacity:], positive[-self.capacity:]
            n = self.capacity
        slots = (self.head + np.arange(n)) % self.capacity
        self.window[slots], self.gaps[slots] = window, gaps
        self.target[slots], self.positive[slots] = target, positive
        self.head = int((self.head + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``n`` examples drawn uniformly (with replacement) from the buffer."""
        slots = rng.integers(0, self.size, n) if self.size and n else np.empty(0, np.int64)
        return (self.window[slots].astype(np.int64), self.gaps[slots].astype(np.int64), self.target[slots],
                self.positive[slots])

    def state(self) -> dict:
        k = self.size
        order = (self.head - k + np.arange(k)) % max(self.capacity, 1)  # oldest first
        return {"capacity": self.capacity, "window": self.window[order].copy(), "gaps": self.gaps[order].copy(),
                "target": self.target[order].copy(), "positive": self.positive[order].copy()}

    def load_state(self, state: dict) -> None:
        self.__init__(self.capacity, self.horizon)
        window = np.asarray(state["window"])
        self.add(window[:, -self.horizon:], np.asarray(state["gaps"])[:, -self.horizon:],
                 np.asarray(state["target"]), np.asarray(state["positive"]))
