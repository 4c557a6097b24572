"""Driving a learner over a time-sorted log (evaluation and benchmarks), and the HR-over-time plot.

The streaming evaluation itself (score each event, then learn it) is :mod:`mfli.evaluation.prequential`.
"""

from __future__ import annotations

import logging

import numpy as np

from mfli.learner.learner import MFLILearner
from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)


def stream(learner: MFLILearner, data: Interactions, lo: int, hi: int, batch: int) -> None:
    """Feed events ``[lo, hi)`` to the learner in micro-batches, in time order."""
    for start in range(lo, hi, batch):
        end = min(hi, start + batch)
        learner.learn_columns(data.users[start:end], data.items[start:end], data.values[start:end],
                              data.ts[start:end])


def train(learner: MFLILearner, data: Interactions, hi: int, passes: int, batch: int) -> None:
    """``passes`` passes over events ``[0, hi)``; histories and popularity restart with each pass so the
    last pass leaves exactly the state a single pass would (no query sees the future)."""
    for p in range(passes):
        if p:
            learner.reset_histories()
        stream(learner, data, 0, hi, batch)
        log.info("pass %d/%d done: %d items, %d users", p + 1, passes, len(learner.items), len(learner.users))


def plot_curve(curve: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = curve["window_start_event"]
    for name in curve:
        if name != "window_start_event":
            ax.plot(x, [np.nan if v is None else v for v in curve[name]], marker="o", label=name)
    ax.set_xlabel("event index (test period)")
    ax.set_ylabel("streaming HR@100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
