"""Static (train, then test) scoring for ``mfli eval``: every method answers the same ``Query``.

The learned index, exact search and hnswlib run over one :class:`ItemSnapshot`; the popularity
baselines are counts over the training period (whole, or its last 5 % / 20 %).
"""

from __future__ import annotations

import logging

import numpy as np

from mfli.evaluation.protocol import KS, TestSet, build_test_set, recall_at
from mfli.learner.learner import MFLILearner
from mfli.retrieval.base import Query, Retriever
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
    for n, (h, e) in enumerate(zip(hist, excl, strict=True)):
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


def popularity_scores(learner: MFLILearner, data: Interactions, lo: int, hi: int) -> np.ndarray:
    rows = np.asarray([learner.items.ids.get(i) for i in data.items[lo:hi].tolist()], dtype=np.int64)
    return np.bincount(rows, minlength=len(learner.items)).astype(np.float64)
