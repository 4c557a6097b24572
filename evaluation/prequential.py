"""Streaming (test-then-train) evaluation of the learner, through the index path the server uses.

Protocol, identical to :func:`mfli.evaluation.streaming_anchors.score_stream` so the anchors rank the
very same events: after the training period, every event whose user has an earlier event is scored
*before* it is learned, with the user's history as it is just before the event; items the user
engaged with before are excluded; rank = candidates scored strictly above the target.

The model is scored twice per event, from the same query (the learner's encoder over the user's
window, what the server computes from published weights):

* ``index``: :class:`~mfli.retrieval.learned.LearnedIndexRetriever` over an in-memory index rebuilt
  from the learner's snapshot after every micro-batch (codes re-encoded, split/merge): the index as
  fresh as the pipeline keeps it (deltas are sub-second; a micro-batch of MovieLens spans minutes to
  days of stream time). Only its top ``max(KS)`` are known, so rank is the position there or "miss".
* ``exact``: the same score over every live item (the yardstick for index recall).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from mfli.config import Settings
from mfli.learner.learner import MFLILearner
from mfli.retrieval.base import Query, target_ranks
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.query_model import combine
from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)

MISS = np.iinfo(np.int64).max // 2  # rank of a target the index path did not return


@dataclass
class ModelStream:
    """Per scored event (stream position order): its position, user id and ranks per scorer."""

    positions: np.ndarray
    users: np.ndarray
    ranks: dict[str, np.ndarray]
    seconds: float


def _batches(learner: MFLILearner, data: Interactions, cut: int, hi: int, batch: int):
    """Yield, per micro-batch of ``[cut, hi)``: (start, scored indices, item rows, windows, window times,
    exclusions per scored event), then learn the batch once the consumer is done with it."""
    seen: dict[str, set[int]] = {}
    rows_of = learner.items.ids.get
    for u, i in zip(data.users[:cut].tolist(), data.items[:cut].tolist(), strict=True):
        seen.setdefault(u, set()).add(rows_of(i) if rows_of(i) is not None else -1)
    for start in range(cut, hi, batch):
        end = min(hi, start + batch)
        ids_u, ids_i = data.users[start:end], data.items[start:end]
        users = learner.users.rows_for(ids_u.tolist())
        items, _ = learner.items.rows_for(ids_i.tolist(), learner.gen)
        win, win_ts, _, _ = learner.users.advance_windows(users, items, data.ts[start:end], commit=False)
        win, win_ts = learner.users.keep_only(win, win_ts, learner.items.live[np.maximum(win, 0)])
        # "has an earlier event" is the protocol's rule (a deleted history can empty a window: then a miss)
        scored = np.zeros(len(ids_u), dtype=bool)
        running: dict[str, set[int]] = {}
        excl: list[np.ndarray] = []
        for j, (u, it) in enumerate(zip(ids_u.tolist(), items.tolist(), strict=True)):
            scored[j] = u in seen or u in running
            if scored[j]:
                rows = seen.get(u, set()) | running.get(u, set())
                rows.discard(it)
                excl.append(np.fromiter(rows, np.int64, len(rows)))
            running.setdefault(u, set()).add(it)
        yield start, np.flatnonzero(scored), items, win, win_ts, excl
        for u, s in running.items():
            seen.setdefault(u, set()).update(s)
        learner.learn_columns(ids_u, ids_i, data.values[start:end], data.ts[start:end])


def prequential(learner: MFLILearner, data: Interactions, cut: int, batch: int, settings: Settings,
                k: int = 100, index: bool = True) -> ModelStream:
    """Score then learn events ``[cut, len(data))`` in micro-batches of ``batch``."""
    t0 = time.perf_counter()
    params = LearnedIndexParams.from_settings(settings.serve, learner.settings)
    positions: list[int] = []
    users_out: list[str] = []
    ranks: dict[str, list[int]] = {"exact": [], "index": []} if index else {"exact": []}
    for start, idx, items, win, win_ts, excl in _batches(learner, data, cut, len(data), batch):
        if idx.size:
            _score_batch(learner, params, settings, idx, items, win, win_ts, excl, k, ranks)
            positions.extend((start + idx).tolist())
            users_out.extend(data.users[start + idx].tolist())
    return ModelStream(positions=np.asarray(positions, np.int64), users=np.asarray(users_out, dtype=object),
                       ranks={name: np.asarray(r, np.int64) for name, r in ranks.items()},
                       seconds=time.perf_counter() - t0)


def tune_prior(learner: MFLILearner, data: Interactions, lo: int, hi: int, batch: int, betas: list[float],
               half_lives: list[float]) -> tuple[float, float, list[dict]]:
    """Grid search of the popularity prior (beta, half-life in events) in the streaming protocol over
    ``[lo, hi)`` (a validation slice of the *training* period), exact scoring; by mean HR@20/50/100."""
    from mfli.learner.counts import DecayedCounts

    s = learner.settings
    counts = {hl: DecayedCounts(hl) for hl in half_lives}
    for c in counts.values():
        c.add(np.asarray([learner.items.ids.get(i) for i in data.items[:lo].tolist()], np.int64))
    hits = {(b, hl): np.zeros(3) for b in betas for hl in half_lives}
    total = 0
    for _start, idx, items, win, win_ts, excl in _batches(learner, data, lo, hi, batch):
        has = win[idx, -1] >= 0
        sel, tgt = idx[has], items[idx[has]]
        if sel.size:
            q, g = learner.window_queries(win[sel], win_ts[sel])
            vectors = learner.serving_vectors()
            model = combine(np.einsum("bfd,nfd->bnf", q, vectors), g[:, None, :], s.score_tau)
            model[:, ~learner.items.live[: len(vectors)]] = -np.inf
            ex = [e for e, h in zip(excl, has, strict=True) if h]
            for hl, c in counts.items():
                logc = np.log1p(c.values(model.shape[1])).astype(np.float32)
                for b in betas:
                    above, _ = target_ranks(model + b * logc[None, :], tgt, ex)
                    hits[(b, hl)] += [(above < kk).sum() for kk in (20, 50, 100)]
        total += idx.size
        for c in counts.values():
            c.add(items)
    table = [{"beta": b, "half_life": hl, **{f"hr@{kk}": float(v[j] / max(total, 1))
                                             for j, kk in enumerate((20, 50, 100))}}
             for (b, hl), v in hits.items()]
    best = max(table, key=lambda row: row["hr@20"] + row["hr@50"] + row["hr@100"])
    return best["beta"], best["half_life"], table


def _score_batch(learner: MFLILearner, params: LearnedIndexParams, settings: Settings, idx: np.ndarray,
                 items: np.ndarray, win: np.ndarray, win_ts: np.ndarray, excl: list[np.ndarray], k: int,
                 ranks: dict[str, list[int]]) -> None:
    s = learner.settings
    has = win[idx, -1] >= 0
    q = np.zeros((idx.size, s.facets, s.dim), np.float32)
    g = np.full((idx.size, s.facets), -np.log(s.facets), np.float32)
    if has.any():
        q[has], g[has] = learner.window_queries(win[idx[has]], win_ts[idx[has]])
    snap = learner.snapshot()
    facet_scores = np.einsum("bfd,nfd->bnf", q, snap.vectors)
    exact = combine(facet_scores, g[:, None, :], s.score_tau) + snap.prior[None, :]
    exact[:, ~snap.live] = -np.inf
    tgt = items[idx]
    above, _ = target_ranks(exact, tgt, excl)
    above[~has] = MISS  # nothing to build a query from
    ranks["exact"].extend(above.tolist())
    if "index" not in ranks:
        return
    view = MemoryIndexView.from_settings(snap, settings.index, seed=s.seed)
    retriever = LearnedIndexRetriever(view, params)
    for r in range(idx.size):
        if not has[r]:
            ranks["index"].append(MISS)
            continue
        hist = win[idx[r]]
        rec = retriever.recommend(Query(history=hist[hist >= 0], k=k, exclude=excl[r], vector=q[r],
                                        log_gates=g[r]))
        hit = np.flatnonzero(rec.rows == tgt[r])
        ranks["index"].append(int(hit[0]) if hit.size else MISS)
