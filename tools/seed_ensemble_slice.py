"""Streaming HR on a validation slice for K independently seeded learners and their ensemble (scores summed).

Why: the one quality gain measured beyond seed noise is variance, and this is how large it is. Same
recipe as ``tools/validation_slice.py`` (train on the first ``0.9 * 0.9`` of the log, then score each of
the next ``--events`` events before learning it, exact scoring, seen items excluded): every member is
trained with seed ``k`` on the same events; each event is also ranked by the sum of the members' served
scores. ``MFLI_MODEL__POPULARITY_BETA=0 python tools/seed_ensemble_slice.py ../shared/data/ml-1m 2``.
An ensemble costs K learners; the README's "Answer quality" says why that is not the default.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from mfli.config import load_settings
from mfli.evaluation.prequential import _batches
from mfli.evaluation.protocol import validation_slice
from mfli.evaluation.run import fresh
from mfli.evaluation.training import train
from mfli.retrieval.base import target_ranks
from mfli.retrieval.query_model import combine
from mfli.sources.movielens import load_movielens

log = logging.getLogger("seed_ensemble_slice")
KS = (20, 50, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="MovieLens directory")
    parser.add_argument("members", type=int, help="K, independently seeded learners")
    parser.add_argument("--events", type=int, default=30_000, help="validation events scored")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    settings = load_settings()
    data = load_movielens(args.dataset)
    sub, lo, hi = validation_slice(data, args.events)
    members = []
    for k in range(args.members):
        learner = fresh(settings.model.model_copy(update={"seed": k}), sub)
        train(learner, sub, lo, 1, 1024)
        members.append(learner)
    names = [f"seed {k}" for k in range(args.members)] + ["ensemble", "mixture"]
    hits = {name: np.zeros(len(KS)) for name in names}
    total = 0
    # _batches learns the first member after each batch; the others learn the same batch below
    for start, idx, items, win, win_ts, excl, *_ in _batches(members[0], sub, lo, hi, 1024):
        end = start + len(items)
        for other in members[1:]:
            other.users.rows_for(sub.users[start:end].tolist())
            rows, _ = other.items.rows_for(sub.items[start:end].tolist(), other.gen)
            if not np.array_equal(rows, items):
                raise RuntimeError("members assigned different item rows")
        has = win[idx, -1] >= 0
        sel, tgt = idx[has], items[idx[has]]
        if sel.size:
            excluded = [e for e, h in zip(excl, has, strict=True) if h]
            summed = 0.0
            member_scores = []
            for name, learner in zip(names, members, strict=False):
                q, gates = learner.window_queries(win[sel], win_ts[sel])
                vectors = learner.serving_vectors()
                scores = combine(np.einsum("bfd,nfd->bnf", q, vectors), gates[:, None, :], learner.settings.temperature)
                scores[:, ~learner.items.live[: len(vectors)]] = -np.inf
                above, _ = target_ranks(scores, tgt, excluded)
                hits[name] += [(above < k).sum() for k in KS]
                summed = summed + scores
                member_scores.append(scores)
            above, _ = target_ranks(np.asarray(summed), tgt, excluded)
            hits["ensemble"] += [(above < k).sum() for k in KS]
            # the members as facets of one model: mixture of softmaxes with uniform gates (combine's rule)
            stacked = np.nan_to_num(np.stack(member_scores, axis=2), neginf=-1e4)
            mixture = combine(stacked, np.full(stacked.shape, -np.log(len(member_scores)), np.float32),
                              members[0].settings.temperature)
            above, _ = target_ranks(mixture, tgt, excluded)
            hits["mixture"] += [(above < k).sum() for k in KS]
        total += idx.size
        for other in members[1:]:
            other.learn_columns(sub.users[start:end], sub.items[start:end], sub.values[start:end], sub.ts[start:end])
    for name, h in hits.items():
        log.info("%s validation slice [%d, %d) %s: HR@20 %.4f HR@50 %.4f HR@100 %.4f (n %d)", data.name, lo, hi,
                 name, h[0] / total, h[1] / total, h[2] / total, total)


if __name__ == "__main__":
    main()
