"""The static protocol (docs/design.md §Evaluation protocol): train on the first 90 % of the log, then
rank once per test user.

Recall@K of the test users' unseen test items, training-seen items excluded. mfli answers through the
learned index, exact search and hnswlib over one snapshot, each from the query the learner's encoder
gives the user's training history; the anchors (popularity over the whole training period and its
last 20 % / 5 %, EASE and ALS) are computed here on the same users.
"""

from __future__ import annotations

import time

import numpy as np

from mfli.config import Settings
from mfli.evaluation.offline import evaluate_retriever, popularity_scores, test_set, user_rows
from mfli.evaluation.protocol import KS, rank_excluding, recall_at
from mfli.evaluation.static_baselines import ALS, EASE
from mfli.learner.learner import MFLILearner
from mfli.retrieval.exact import ExactRetriever
from mfli.retrieval.hnsw import HnswRetriever
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.popularity import PopularityRetriever
from mfli.sources.movielens import Interactions


def static_eval(learner: MFLILearner, settings: Settings, data: Interactions, cut: int,
                baselines: bool = True) -> dict:
    model = learner.settings
    snap = learner.snapshot()
    ts = test_set(data, 0, cut, len(data))
    hist, excl, truth = user_rows(learner, ts)
    urows = np.asarray([learner.users.users.get(u) for u in ts.users], dtype=np.int64)
    q, g, _ = learner.user_queries(urows)
    first: dict[str, int] = {}
    for n, i in enumerate(data.items.tolist()):
        first.setdefault(i, n)
    cold = [{learner.items.ids.get(i) for i in ts.truth[u] if first[i] >= cut and i in learner.items.ids}
            for u in ts.users]
    view = MemoryIndexView.from_settings(snap, settings.index, seed=model.seed)
    retrievers = [
        LearnedIndexRetriever(view, LearnedIndexParams.from_settings(settings.serve, model)),
        ExactRetriever(view, model.history, model.recency_decay),
    ]
    if baselines:
        # one build thread: hnswlib's parallel insertion order makes the graph (and recall) vary per run
        retrievers.append(HnswRetriever(view, history=model.history, recency_decay=model.recency_decay,
                                        seed=model.seed, threads=1))
        for name, lo in (("popularity", 0), ("recent_popularity_20pct", cut - cut // 5),
                         ("recent_popularity_5pct", cut - cut // 20)):
            retrievers.append(PopularityRetriever(popularity_scores(learner, data, lo, cut), name, snap.live))
    out: dict = {"test_users": len(ts.users), "cold_users": sum(1 for c in cold if c)}
    for r in retrievers:
        t = time.perf_counter()
        out[r.name] = evaluate_retriever(r, hist, excl, truth, cold, queries=(q, g))
        out[r.name]["seconds"] = round(time.perf_counter() - t, 2)
    if baselines:
        out.update(_matrix_anchors(learner, data, cut, ts.users, excl, truth))
    out["index_over_exact@100"] = out["index"]["recall@100"] / max(out["exact"]["recall@100"], 1e-12)
    out["_table"] = _table(f"{data.name}: static protocol, {out['test_users']} test users", out)
    return out


def _matrix_anchors(learner: MFLILearner, data: Interactions, cut: int, test_ids: list[str], excl, truth) -> dict:
    """EASE (lambda 500) and ALS (64 factors) fitted on the training period, in the learner's row space."""
    users, u_rows = np.unique(data.users[:cut], return_inverse=True)
    i_rows = np.asarray([learner.items.ids.get(i) for i in data.items[:cut].tolist()], np.int64)
    n_items = len(learner.items)
    # the test users' whole training histories (``hist`` holds only the learner's last H items)
    full: dict[int, list[int]] = {}
    for u, i in zip(u_rows.tolist(), i_rows.tolist(), strict=True):
        full.setdefault(u, []).append(i)
    test_users = np.searchsorted(users, np.asarray(test_ids, dtype=users.dtype))
    histories = [np.asarray(full.get(int(u), []), np.int64) for u in test_users]
    out = {}
    for name, model in (("ease", EASE(500.0)), ("als", ALS(factors=64))):
        t = time.perf_counter()
        model.fit(u_rows, i_rows, len(users), n_items)
        ranked = []
        for start in range(0, len(histories), 512):
            chunk = histories[start:start + 512]
            scores = model.scores_histories(chunk, n_items)
            for j, sc in enumerate(scores):
                sc = sc.astype(np.float64)
                sc[~learner.items.live[:n_items]] = -np.inf
                ranked.append(rank_excluding(sc, excl[start + j], max(KS)).tolist() if len(chunk[j]) else [])
        out[name] = recall_at(ranked, truth) | {"seconds": round(time.perf_counter() - t, 2)}
    return out


def _table(title: str, rows: dict) -> str:
    lines = [f"\n{title}\n", f"{'method':<28}" + "".join(f"{'R@' + str(k):>9}" for k in KS) + "\n"]
    for name, r in rows.items():
        if isinstance(r, dict) and "recall@20" in r:
            lines.append(f"{name:<28}" + "".join(f"{r[f'recall@{k}']:>9.4f}" for k in KS) + "\n")
    return "".join(lines)
