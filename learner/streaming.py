"""Driving a learner over a time-sorted log, and the prequential (test-then-train) evaluation.

Prequential recall: through the test period the learner keeps learning; every event is first scored
with the model and the user's history exactly as they are before that event (the server's view), then
learned. Hit@K means the event's item was in the top K of live items the user had not engaged with
yet. Online decayed popularity, updated per batch, is scored the same way beside it (DESIGN §7).
"""

from __future__ import annotations

import logging

import numpy as np

from mfli.learner.learner import MFLILearner
from mfli.learner.protocol import KS
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


def _ranks(scores: np.ndarray, target: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
    """Rank of each target among its row's unseen items (0 = best)."""
    t = scores[np.arange(len(target)), target]
    above = (scores > t[:, None]).sum(axis=1)
    for i, rows in enumerate(seen):
        if len(rows):
            above[i] -= int((scores[i, rows] > t[i]).sum())
    return above


def prequential(learner: MFLILearner, data: Interactions, lo: int, hi: int, batch: int,
                windows: int = 20) -> dict:
    """Test-then-train over ``[lo, hi)``. Returns recall@K for MFLI (exact) and online popularity,
    plus a per-window curve of recall@100 for the plot."""
    seen: dict[int, set[int]] = {}
    for u, i in zip(learner.users.users.add(data.users[:lo].tolist())[0].tolist(),
                    learner.items.rows_for(data.items[:lo].tolist(), learner.gen)[0].tolist()):
        seen.setdefault(u, set()).add(i)
    hits = {"mfli": {k: [] for k in KS}, "online_popularity": {k: [] for k in KS}}
    positions: list[int] = []
    for start in range(lo, hi, batch):
        end = min(hi, start + batch)
        users = learner.users.rows_for(data.users[start:end].tolist())
        items, _ = learner.items.rows_for(data.items[start:end].tolist(), learner.gen)
        flat, offsets, weights, has = learner.users.advance(users, items, data.ts[start:end], commit=False)
        n = len(learner.items)
        vec = learner.items.vectors().numpy()
        idx = np.flatnonzero(has)
        if len(idx):
            pooled = np.add.reduceat(vec[flat] * weights[:, None, None], offsets[:-1][idx], axis=0)
            q = pooled / np.maximum(np.linalg.norm(pooled, axis=2, keepdims=True), 1e-12)
            dead = ~learner.items.live[:n]
            prior = learner.prior()[:n]
            model = q.reshape(len(idx), -1) @ vec.reshape(n, -1).T + prior[None, :]
            pop = np.broadcast_to(learner.popularity.values(n)[None, :], model.shape).copy()
            model[:, dead] = -np.inf
            pop[:, dead] = -np.inf
            tgt = items[idx]
            # the user's earlier events in this batch count as seen too (the server would have them)
            user_seen = _seen_before(users, items, idx, seen)
            for name, sc in (("mfli", model), ("online_popularity", pop)):
                r = _ranks(sc, tgt, user_seen)
                for k in KS:
                    hits[name][k].extend((r < k).tolist())
            positions.extend((start + idx).tolist())
        for u, i in zip(users.tolist(), items.tolist()):
            seen.setdefault(u, set()).add(i)
        learner.learn_columns(data.users[start:end], data.items[start:end], data.values[start:end],
                              data.ts[start:end])
    out: dict = {name: {f"recall@{k}": float(np.mean(h[k])) if h[k] else 0.0 for k in KS}
                 for name, h in hits.items()}
    out["events_scored"] = len(positions)
    edges = np.linspace(lo, hi, windows + 1)
    pos = np.asarray(positions)
    curve = {"window_start_event": edges[:-1].astype(int).tolist()}
    for name in hits:
        h = np.asarray(hits[name][100], dtype=float)
        curve[name] = [float(h[(pos >= a) & (pos < b)].mean()) if ((pos >= a) & (pos < b)).any() else None
                       for a, b in zip(edges[:-1], edges[1:])]
    out["curve"] = curve
    return out


def _seen_before(users: np.ndarray, items: np.ndarray, idx: np.ndarray, seen: dict[int, set[int]]
                 ) -> list[np.ndarray]:
    """Per scored event: rows its user engaged with before it (earlier batches and earlier in this one)."""
    running: dict[int, set[int]] = {}
    out: list[np.ndarray] = []
    want = set(idx.tolist())
    for i, (u, item) in enumerate(zip(users.tolist(), items.tolist())):
        if i in want:
            rows = seen.get(u, set()) | running.get(u, set())
            rows.discard(item)
            out.append(np.fromiter(rows, dtype=np.int64, count=len(rows)))
        running.setdefault(u, set()).add(item)
    return out


def plot_curve(curve: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = curve["window_start_event"]
    for name in ("mfli", "online_popularity"):
        ax.plot(x, [np.nan if v is None else v for v in curve[name]], marker="o", label=name)
    ax.set_xlabel("event index (test period)")
    ax.set_ylabel("prequential recall@100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
