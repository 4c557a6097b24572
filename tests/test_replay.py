"""The replay buffer keeps the newest examples, samples only stored ones, and survives a checkpoint."""

from __future__ import annotations

import numpy as np

from mfli.learner.replay import ReplayBuffer


def _examples(start: int, n: int, horizon: int = 3):
    target = np.arange(start, start + n, dtype=np.int64)
    window = np.repeat(target[:, None], horizon, axis=1) - np.arange(horizon, 0, -1)
    return window, np.zeros_like(window), target, target % 2 == 0


def test_ring_keeps_the_newest_capacity_examples_in_order():
    buf = ReplayBuffer(capacity=5, horizon=3)
    buf.add(*_examples(0, 3))
    buf.add(*_examples(3, 4))
    assert len(buf) == 5
    assert sorted(buf.state()["target"].tolist()) == [2, 3, 4, 5, 6]  # the two oldest overwritten
    buf.add(*_examples(100, 12))  # more than the capacity at once: only its newest 5 stay
    assert sorted(buf.state()["target"].tolist()) == [107, 108, 109, 110, 111]


def test_samples_come_from_stored_examples_and_restore_is_exact():
    buf = ReplayBuffer(capacity=8, horizon=3)
    buf.add(*_examples(0, 5))
    buf.add(*_examples(10, 6))  # wraps around: restore must keep the slot layout
    window, gaps, target, positive = buf.sample(200, np.random.default_rng(0))
    assert set(target.tolist()) == {3, 4} | set(range(10, 16))
    np.testing.assert_array_equal(window[:, -1], target - 1)
    np.testing.assert_array_equal(positive, target % 2 == 0)
    again = ReplayBuffer(capacity=8, horizon=3)
    again.load_state(buf.state())
    for a, b in zip(again.sample(50, np.random.default_rng(1)), buf.sample(50, np.random.default_rng(1)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ReplayBuffer(0, 3).sample(5, np.random.default_rng(0))[2].size == 0
