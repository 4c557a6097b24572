"""The streaming (test-then-observe) protocol for anchors, so every anchor is scored on the same events.

Why one harness: the figures are only comparable if every method ranks the same events, against the
same candidates, with the same exclusions. Protocol: the events ``[0, cut)`` are the training period
(given to ``observe`` first, in one call); then every test event whose user has an earlier event
(training or test) is scored *before* it is observed, with the user's history as it is just before
that event. Candidates are all ``n_items`` rows minus the items the user engaged with before (the
target itself stays a candidate); rank = number of candidates scored strictly above the target.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mfli.evaluation.bootstrap import rank_metrics
from mfli.retrieval.base import target_ranks

log = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]
ObserveFn = Callable[[np.ndarray, np.ndarray], None]


@dataclass
class StreamResult:
    """Per scored event: its index in the stream, its user, its 0-based rank (candidates strictly
    above the target) and how many candidates tie with the target."""

    positions: np.ndarray
    users: np.ndarray
    ranks: np.ndarray
    ties: np.ndarray
    seconds: float

    def metrics(self, ks: Sequence[int] = (20, 50, 100), pessimistic: bool = False) -> dict[str, float]:
        """HR@K and NDCG@20; ties count for the target unless ``pessimistic`` (then against it).
        Count-based scorers (Markov, popularity) tie a lot, so the two can differ by a point."""
        return rank_metrics(self.ranks + self.ties if pessimistic else self.ranks, ks)


def score_stream(score: ScoreFn, users: np.ndarray, items: np.ndarray, cut: int, n_items: int,
                 observe: ObserveFn | None = None, batch: int = 1, log_every: int = 10_000) -> StreamResult:
    """Run the protocol over a time-ordered stream of integer ``users`` and item rows.

    ``score(users, histories)`` returns (len(users), n_items) scores, ``histories[i]`` being user i's
    items before the event (oldest first). ``observe(users, items)`` (optional) learns events: it gets
    the training period once, then each test chunk after the chunk is scored. Chunks hold ``batch``
    events; with ``observe`` they also end before a user's second event, so a scorer's per-user state
    is always current. Histories and exclusions are exact per event. State shared across users (e.g.
    a popularity window) is refreshed only between chunks, so ``batch=1`` is the exact protocol for
    an observing scorer; a frozen scorer (no ``observe``) can use large chunks.

    Ties count for the target (``StreamResult.ties`` keeps them): a scorer that gives a user a
    constant row (e.g. a user unknown to a static model) would hit everything, so such a scorer must
    read ``histories`` (EASE/ALS ``scores_histories``) rather than user rows.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.shape != items.shape or not 0 <= cut <= users.size:
        raise ValueError(f"bad stream: {users.shape} users, {items.shape} items, cut {cut}")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"item rows must be in [0, {n_items})")
    history: dict[int, list[int]] = {}
    for u, i in zip(users[:cut].tolist(), items[:cut].tolist(), strict=True):
        history.setdefault(u, []).append(i)
    if observe is not None:
        observe(users[:cut], items[:cut])
    positions: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    ties: list[np.ndarray] = []
    t0 = time.perf_counter()
    next_log = cut + log_every
    lo = cut
    while lo < users.size:
        hi = _chunk_end(users, lo, batch) if observe is not None else min(users.size, lo + batch)
        pos, hists, excl = [], [], []
        for p, u, i in zip(range(lo, hi), users[lo:hi].tolist(), items[lo:hi].tolist(), strict=True):
            h = history.setdefault(u, [])
            if h:
                arr = np.asarray(h, dtype=np.int64)
                pos.append(p)
                hists.append(arr)
                seen = np.unique(arr)
                excl.append(seen[seen != i])
            h.append(i)
        if pos:
            idx = np.asarray(pos, dtype=np.int64)
            sc = score(users[idx], hists)
            if sc.shape != (idx.size, n_items):
                raise ValueError(f"scorer returned {sc.shape}, expected {(idx.size, n_items)}")
            rank, tie = target_ranks(sc, items[idx], excl)
            ranks.append(rank)
            ties.append(tie)
            positions.append(idx)
        if observe is not None:
            observe(users[lo:hi], items[lo:hi])
        if hi >= next_log:
            log.info("scored up to event %d/%d (%.1fs)", hi, users.size, time.perf_counter() - t0)
            next_log += log_every
        lo = hi
    pos_all = _cat(positions)
    return StreamResult(positions=pos_all, users=users[pos_all], ranks=_cat(ranks), ties=_cat(ties),
                        seconds=time.perf_counter() - t0)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _chunk_end(users: np.ndarray, lo: int, batch: int) -> int:
    """End of the chunk starting at ``lo``: at most ``batch`` events and no user twice, so a user's
    own state (e.g. the Markov chain's last item) is always current when their event is scored."""
    hi, stop, chunk = lo, min(users.size, lo + batch), set()
    for u in users[lo:stop].tolist():
        if u in chunk:
            break
        chunk.add(u)
        hi += 1
    return hi


def dense_rows(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer rows 0..n-1 for arbitrary ids, numbered by first appearance (so with a time-sorted
    stream the training period's items get the lowest rows and test-only items come after)."""
    uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[order] = np.arange(uniq.size)
    return rank[inv], int(uniq.size)
