"""Streaming HR on a validation slice cut from the *training* period: the recipe behind the README's
"what changed the answers" figures (tune here, never on the test period).

Trains a fresh learner on the first ``0.9 * 0.9`` of the time-sorted log (one pass, micro-batches of
1024), then runs the streaming protocol (score each event, then learn it) on the next ``--events``
events, exact scoring. Model settings come from the environment (``MFLI_MODEL__...``), so a variant is
``MFLI_MODEL__REPLAY_RATIO=2 python tools/validation_slice.py ../shared/data/ml-1m``.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from mfli.config import load_settings
from mfli.evaluation.bootstrap import paired_bootstrap, rank_metrics
from mfli.evaluation.prequential import prequential
from mfli.evaluation.protocol import validation_slice
from mfli.evaluation.run import fresh
from mfli.evaluation.stream_anchors import anchor_streams
from mfli.evaluation.training import train
from mfli.sources.movielens import load_movielens

log = logging.getLogger("validation_slice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="MovieLens directory")
    parser.add_argument("--events", type=int, default=30_000, help="validation events scored")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anchors", action="store_true",
                        help="also score the streaming anchors (online popularity, online Markov, SASRec trained "
                        "on the slice's training part and frozen, the model's d and H) on the same events")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    settings = load_settings()
    data = load_movielens(args.dataset)
    sub, lo, hi = validation_slice(data, args.events)
    learner = fresh(settings.model, sub)
    t = time.time()
    train(learner, sub, lo, 1, 1024)
    rate = lo / (time.time() - t)
    ours = prequential(learner, sub, lo, 1024, settings, index=False)
    m = rank_metrics(ours.ranks["exact"])
    log.info("%s validation slice [%d, %d): train %.0f events/s; HR@20 %.4f HR@50 %.4f HR@100 %.4f (n %d)",
             data.name, lo, hi, rate, m["HR@20"], m["HR@50"], m["HR@100"], m["n"])
    if args.anchors:
        users = np.unique(ours.users, return_inverse=True)[1]
        hits = (ours.ranks["exact"] < 20).astype(np.float64)
        for name, res in anchor_streams(sub, lo, sasrec_dim=settings.model.dim,
                                        sasrec_history=settings.model.history).items():
            if not np.array_equal(res.positions, ours.positions):
                raise RuntimeError(f"anchor {name!r} scored other events than the model")
            a = rank_metrics(res.ranks)
            c = paired_bootstrap(hits, (res.ranks < 20).astype(np.float64), users)
            log.info("  anchor %-16s HR@20 %.4f HR@50 %.4f HR@100 %.4f; model / anchor HR@20 %.3f [%.3f, %.3f]",
                     name, a["HR@20"], a["HR@50"], a["HR@100"], c["ratio"], c["ratio_lo"], c["ratio_hi"])


if __name__ == "__main__":
    main()
