"""The static evaluation protocol (docs/design.md §Evaluation protocol) as small pure functions: the parts
a hand-made log can check.

Temporal split: the first 90 % of events (by time) train, the last 10 % test. Test users have at least
one training event and at least one test item they had not seen in training; truth = those items.
Recall@K = |top-K ∩ truth| / |truth|, training-seen items excluded from the top-K, averaged over test
users.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mfli.sources.movielens import Interactions

KS = (20, 50, 100)


def temporal_cut(n_events: int, train_fraction: float = 0.9) -> int:
    """Index of the first test event of a time-sorted log."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    return int(round(n_events * train_fraction))


def validation_slice(data: Interactions, events: int) -> tuple[Interactions, int, int]:
    """The tuning recipe's slice, cut from the training period only (never the test period): the log up
    to the slice's end, and the slice's bounds [lo, hi) — the ``events`` after the first 90 % of the
    training period (``tools/validation_slice.py``, ``tools/seed_ensemble_slice.py``)."""
    cut = temporal_cut(len(data))
    lo = temporal_cut(cut)
    hi = min(cut, lo + events)
    sub = Interactions(data.name, data.users[:hi], data.items[:hi], data.values[:hi], data.ts[:hi], data.item_tags,
                       data.item_titles)
    return sub, lo, hi


@dataclass
class TestSet:
    """Users to evaluate, what each saw in training (excluded from rankings) and their truth."""

    users: list[str]
    seen: dict[str, set[str]]
    truth: dict[str, set[str]]


def build_test_set(train_users: Sequence[str], train_items: Sequence[str], test_users: Sequence[str],
                   test_items: Sequence[str]) -> TestSet:
    seen: dict[str, set[str]] = defaultdict(set)
    for u, i in zip(train_users, train_items, strict=True):
        seen[u].add(i)
    truth: dict[str, set[str]] = defaultdict(set)
    for u, i in zip(test_users, test_items, strict=True):
        if u in seen and i not in seen[u]:
            truth[u].add(i)
    users = sorted(truth)
    return TestSet(users=users, seen={u: seen[u] for u in users}, truth=dict(truth))


def recall_at(ranked: Sequence[Sequence[str]], truth: Sequence[set[str]], ks: Sequence[int] = KS
              ) -> dict[str, float]:
    """Mean over users of |top-K ∩ truth| / |truth| (rankings must already exclude seen items)."""
    if len(ranked) != len(truth):
        raise ValueError(f"{len(ranked)} rankings for {len(truth)} truth sets")
    out: dict[str, float] = {}
    for k in ks:
        vals = [len(set(r[:k]) & t) / len(t) for r, t in zip(ranked, truth, strict=True) if t]
        out[f"recall@{k}"] = float(np.mean(vals)) if vals else 0.0
    return out


def rank_excluding(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best scores with ``exclude`` rows removed (scores is modified in place)."""
    scores[exclude] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = part[np.argsort(-scores[part], kind="stable")]
    return order[np.isfinite(scores[order])]
