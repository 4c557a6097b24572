"""Rank metrics per event, and a paired user-level bootstrap to compare two methods on the same events.

Why user-level: events of one user are strongly correlated (the same tastes, the same history), so
resampling events would pretend we have far more independent evidence than we do and give intervals
that are too narrow. We resample *users* with replacement and keep all their events, and the
statistic stays event-weighted (sum of the chosen users' metric sums / sum of their event counts),
i.e. the same mean that is reported. Pairing (both methods on the same resample) cancels the
between-user variance that both methods share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def hits_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per event: 1.0 if the target's 0-based rank is below ``k``."""
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per event NDCG@k with one relevant item: 1 / log2(rank + 2) inside the top ``k``, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = (20, 50, 100), ndcg_k: int = 20) -> dict[str, float]:
    """HR@K for each K and NDCG@``ndcg_k`` from 0-based ranks (rank = number of candidate items
    scored strictly above the target), plus the number of events ``n``."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {f"HR@{k}": float(hits_at(ranks, k).mean()) if ranks.size else 0.0 for k in ks}
    out[f"NDCG@{ndcg_k}"] = float(ndcg_at(ranks, ndcg_k).mean()) if ranks.size else 0.0
    out["n"] = int(ranks.size)
    return out


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Event-weighted mean of A minus B and A / B, with percentile intervals over user resamples.

    ``hits_a`` and ``hits_b`` are per-event metric values (0/1 hits or NDCG gains) of two methods on
    the same events; ``groups`` gives each event's user. Each resample draws as many users as there
    are, with replacement; a user drawn ``c`` times contributes its events ``c`` times. Vectorised as
    per-user sums (bincount) times a (n_boot, n_users) multinomial count matrix.
    """
    a = np.asarray(hits_a, dtype=np.float64)
    b = np.asarray(hits_b, dtype=np.float64)
    g = np.asarray(groups)
    if not (a.shape == b.shape == g.shape) or a.ndim != 1:
        raise ValueError(f"need three equal 1-d arrays, got {a.shape}, {b.shape}, {g.shape}")
    if a.size == 0:
        raise ValueError("no events to bootstrap")
    _, inv = np.unique(g, return_inverse=True)
    n_users = int(inv.max()) + 1
    sum_a = np.bincount(inv, weights=a, minlength=n_users)
    sum_b = np.bincount(inv, weights=b, minlength=n_users)
    count = np.bincount(inv, minlength=n_users).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)
    events = weights @ count
    mean_a = weights @ sum_a / events
    mean_b = weights @ sum_b / events
    diffs = mean_a - mean_b
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = mean_a / mean_b
        ratio = float(a.mean() / b.mean()) if b.mean() != 0 else float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(diffs, [tail, 100.0 - tail])
    finite = ratios[np.isfinite(ratios)]
    r_lo, r_hi = np.percentile(finite, [tail, 100.0 - tail]) if finite.size else (np.nan, np.nan)
    if finite.size < ratios.size:
        log.warning("%d of %d resamples had a zero mean for B: ratio interval over the rest",
                    ratios.size - finite.size, ratios.size)
    return {"diff": float(a.mean() - b.mean()), "lo": float(lo), "hi": float(hi), "ratio": ratio,
            "ratio_lo": float(r_lo), "ratio_hi": float(r_hi), "n_events": int(a.size), "n_users": n_users}
