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
        """The filled slots as laid out (slots ``[0, size)`` are the filled ones, oldest at ``head`` once
        full), so a restored buffer samples exactly what this one would."""
        k = self.size
        return {"head": self.head, "window": self.window[:k].copy(), "gaps": self.gaps[:k].copy(),
                "target": self.target[:k].copy(), "positive": self.positive[:k].copy()}

    def load_state(self, state: dict) -> None:
        k = min(len(state["target"]), self.capacity)
        self.__init__(self.capacity, self.horizon)
        self.window[:k], self.gaps[:k] = state["window"][:k], state["gaps"][:k]
        self.target[:k], self.positive[:k] = state["target"][:k], state["positive"][:k]
        self.size, self.head = k, int(state["head"]) % max(self.capacity, 1)
