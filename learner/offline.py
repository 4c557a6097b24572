"""Static (train, then test) scoring for ``mfli eval``: every method answers the same ``Query``.

The learned index, exact search and hnswlib run over one :class:`ItemSnapshot`; the popularity
baselines are counts over the training period (whole, or its last 5 % / 20 %). The prior's beta and
half-life are tuned here on a validation slice cut from the *training* period (DESIGN §3).
"""

from __future__ import annotations

import logging

import numpy as np

from mfli.learner.counts import decayed_counts
from mfli.learner.learner import MFLILearner
from mfli.learner.protocol import KS, TestSet, build_test_set, rank_excluding, recall_at
from mfli.retrieval.base import Query, Retriever
from mfli.retrieval.snapshot import ItemSnapshot
from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)


def test_set(data: Interactions, lo: int, cut: int, hi: int) -> TestSet:
    return build_test_set(data.users[lo:cut].tolist(), data.items[lo:cut].tolist(),
                          data.users[cut:hi].tolist(), data.items[cut:hi].tolist())


def user_rows(learner: MFLILearner, ts: TestSet) -> tuple[list[np.ndarray], list[np.ndarray], list[set[int]]]:
    """Per test user: history rows (oldest first), excluded (seen) rows and truth rows (unknown ids
    get -1-based placeholders so they count as misses)."""
    row_of = learner.items.ids.get
    hist, excl, truth = [], [], []
    for u in ts.users:
        urow = learner.users.users.get(u)
        hist.append(np.asarray(learner.users.items_of(urow)[0] if urow is not None else [], dtype=np.int64))
        excl.append(np.asarray([row_of(i) for i in ts.seen[u] if row_of(i) is not None], dtype=np.int64))
        truth.append({row_of(i) if row_of(i) is not None else -1 - n for n, i in enumerate(ts.truth[u])})
    return hist, excl, truth


def evaluate_retriever(retriever: Retriever, hist, excl, truth, cold: list[set[int]] | None = None,
                       queries: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Recall@20/50/100 of a retriever over the test users (and over their cold truth items).
    ``queries``: per user (vectors ``[n, F, d]``, log gates ``[n, F]``) from the learner's encoder."""
    ranked = []
    for n, (h, e) in enumerate(zip(hist, excl)):
        vec = None if queries is None else queries[0][n]
        gates = None if queries is None else queries[1][n]
        rec = retriever.recommend(Query(history=h, k=max(KS), exclude=e, vector=vec, log_gates=gates)) \
            if len(h) or retriever.name.startswith(("pop", "recent")) else None
        ranked.append([] if rec is None else rec.rows.tolist())
    out = recall_at(ranked, truth)
    if cold is not None:
        keep = [i for i, c in enumerate(cold) if c]
        out.update({f"cold_{k}": v for k, v in
                    recall_at([ranked[i] for i in keep], [cold[i] for i in keep]).items()})
    return out


def exact_recall_fast(snap: ItemSnapshot, prior: np.ndarray, hist, excl, truth, decay: float,
                      horizon: int) -> dict[str, float]:
    """Vectorised exact search (for the prior grid search): same ranking as ExactRetriever."""
    n = snap.n_items
    flat = snap.vectors.reshape(n, -1)
    users = [i for i, h in enumerate(hist) if len(h)]
    q = np.zeros((len(users), flat.shape[1]), dtype=np.float32)
    for j, i in enumerate(users):
        h = hist[i][-horizon:]
        w = decay ** np.arange(len(h) - 1, -1, -1, dtype=np.float32)
        pooled = np.einsum("h,hfd->fd", w, snap.vectors[h])
        q[j] = (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).reshape(-1)
    scores = q @ flat.T + prior[None, :]
    scores[:, ~snap.live] = -np.inf
    ranked: list[list[int]] = [[] for _ in hist]
    for j, i in enumerate(users):
        ranked[i] = rank_excluding(scores[j], excl[i], max(KS)).tolist()
    return recall_at(ranked, truth)


def tune_prior(snap: ItemSnapshot, train_item_rows: np.ndarray, hist, excl, truth, decay: float,
               horizon: int, betas: list[float], half_lives: list[float]) -> tuple[float, float, list[dict]]:
    """Grid search of (beta, half-life) by mean recall@20/50/100 on the validation users."""
    table = []
    for hl in half_lives:
        counts = decayed_counts(train_item_rows, snap.n_items, hl)
        for beta in betas:
            r = exact_recall_fast(snap, (beta * np.log1p(counts)).astype(np.float32), hist, excl, truth,
                                  decay, horizon)
            table.append({"beta": beta, "half_life": hl, **r})
    best = max(table, key=lambda row: np.mean([row[f"recall@{k}"] for k in KS]))
    return best["beta"], best["half_life"], table


def popularity_scores(learner: MFLILearner, data: Interactions, lo: int, hi: int) -> np.ndarray:
    rows = np.asarray([learner.items.ids.get(i) for i in data.items[lo:hi].tolist()], dtype=np.int64)
    return np.bincount(rows, minlength=len(learner.items)).astype(np.float64)
