"""``mfli eval``: the DESIGN §7 protocol on a MovieLens-format dataset, in-process (no broker).

1. Temporal split 90/10. The prior's beta and half-life are tuned on a validation slice (the last 10 %
   of the *training* period) with a learner trained on the rest of it; the test period is never used
   for tuning.
2. A fresh learner streams the training period (``--passes``), then the learned index path, exact
   search, hnswlib (all over one snapshot) and popularity baselines answer the same queries.
3. Cold-item recall (truth items first seen in the test period), then prequential recall while the
   learner keeps learning through the test period, beside online decayed popularity; PNG plot.
4. ``--ablations``: F=1, no quantised loss, no delayed start, each retrained with the tuned prior.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import orjson
import torch

from mfli.config import ModelSettings, Settings
from mfli.learner.learner import MFLILearner
from mfli.learner.offline import (evaluate_retriever, popularity_scores, test_set, tune_prior, user_rows)
from mfli.learner.protocol import KS, temporal_cut
from mfli.learner.streaming import plot_curve, prequential, train
from mfli.retrieval.exact import ExactRetriever
from mfli.retrieval.hnsw import HnswRetriever
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.popularity import PopularityRetriever
from mfli.sources.movielens import Interactions, load_movielens

log = logging.getLogger(__name__)

# ml-100k's first run chose the grid's corner (beta 6, the 1000-event half-life floor): grid widened.
BETAS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 9.0, 12.0]
HALF_LIVES_FRACTION = [0.003, 0.01, 0.03, 0.1, 0.3, 1e6]  # of the training events; 1e6 ~ no decay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="MovieLens directory (ml-1m, ml-100k, ...)")
    parser.add_argument("--passes", type=int, default=1, help="passes over the training period")
    parser.add_argument("--batch", type=int, default=1024, help="events per learner step")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--plot", default=None, help="PNG of prequential recall over time")
    parser.add_argument("--report", default=None,
                        help="self-contained HTML report: recall over time, cluster sizes, codebook usage")
    parser.add_argument("--ablations", action="store_true", help="also F=1, no quantised loss, no delayed start")
    parser.add_argument("--no-prequential", action="store_true", help="skip the test-then-train pass")
    parser.add_argument("--beta", type=float, default=None, help="skip tuning: use this prior weight")
    parser.add_argument("--half-life", type=float, default=None, help="skip tuning: prior half-life (events)")


def fresh(model: ModelSettings, data: Interactions) -> MFLILearner:
    learner = MFLILearner(model)
    learner.upsert_items(_catalogue(data))
    return learner


def _catalogue(data: Interactions):
    """The catalogue is known up front (upserted at time 0 with its tags); ratings are what streams."""
    from mfli.events import ItemEvent

    return [ItemEvent(item_id=i, op="upsert", created_ts=0, tags=t) for i, t in data.item_tags.items()]


def tune(model: ModelSettings, data: Interactions, cut: int, passes: int, batch: int) -> dict:
    vcut = temporal_cut(cut, 0.9)
    learner = fresh(model, data)
    train(learner, data, vcut, passes, batch)
    ts = test_set(data, 0, vcut, cut)
    hist, excl, truth = user_rows(learner, ts)
    rows = np.asarray([learner.items.ids.get(i) for i in data.items[:vcut].tolist()], dtype=np.int64)
    half_lives = [max(200.0, f * vcut) for f in HALF_LIVES_FRACTION]
    beta, hl, table = tune_prior(learner.snapshot(), rows, hist, excl, truth, model.recency_decay,
                                 model.history, BETAS, half_lives)
    log.info("prior tuned on %d validation users: beta=%.2f half_life=%.0f events", len(ts.users), beta, hl)
    return {"beta": beta, "half_life": hl, "validation_users": len(ts.users), "grid": table}


def static_eval(learner: MFLILearner, settings: Settings, data: Interactions, cut: int,
                baselines: bool = True) -> dict:
    model = learner.settings
    snap = learner.snapshot()
    ts = test_set(data, 0, cut, len(data))
    hist, excl, truth = user_rows(learner, ts)
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
        n = cut
        for name, lo in (("popularity", 0), ("recent_popularity_20pct", n - n // 5),
                         ("recent_popularity_5pct", n - n // 20)):
            retrievers.append(PopularityRetriever(popularity_scores(learner, data, lo, cut), name, snap.live))
    out = {"test_users": len(ts.users), "cold_users": sum(1 for c in cold if c)}
    for r in retrievers:
        t = time.perf_counter()
        out[r.name] = evaluate_retriever(r, hist, excl, truth, cold)
        out[r.name]["seconds"] = round(time.perf_counter() - t, 2)
    out["index_over_exact@100"] = out["index"]["recall@100"] / max(out["exact"]["recall@100"], 1e-12)
    return out


def _table(title: str, rows: dict[str, dict]) -> str:
    lines = [f"\n{title}\n", f"{'method':<28}" + "".join(f"{'R@' + str(k):>9}" for k in KS) +
             f"{'cold R@100':>12}\n"]
    for name, r in rows.items():
        if isinstance(r, dict) and "recall@20" in r:
            lines.append(f"{name:<28}" + "".join(f"{r[f'recall@{k}']:>9.4f}" for k in KS) +
                         f"{r.get('cold_recall@100', float('nan')):>12.4f}\n")
    return "".join(lines)


def run(args: argparse.Namespace, settings: Settings) -> int:
    torch.set_num_threads(2)
    torch.manual_seed(settings.model.seed)
    t0 = time.perf_counter()
    data = load_movielens(args.dataset)
    cut = temporal_cut(len(data))
    model = settings.model
    report: dict = {"dataset": data.name, "events": len(data), "train_events": cut, "passes": args.passes,
                    "batch": args.batch, "seed": model.seed}
    if args.beta is None or args.half_life is None:
        report["prior_tuning"] = tune(model, data, cut, args.passes, args.batch)
        beta, hl = report["prior_tuning"]["beta"], report["prior_tuning"]["half_life"]
    else:
        beta, hl = args.beta, args.half_life
    model = model.model_copy(update={"popularity_beta": beta, "popularity_half_life_events": hl})
    report["model"] = model.model_dump()
    learner = fresh(model, data)
    t = time.perf_counter()
    train(learner, data, cut, args.passes, args.batch)
    report["train_seconds"] = round(time.perf_counter() - t, 1)
    report["codebook"] = {"codewords": learner.rq.m, "utilisation": learner.rq.utilisation.tolist(),
                          "perplexity": learner.rq.perplexity.tolist()}
    report["static"] = static_eval(learner, settings, data, cut)
    if getattr(args, "report", None):  # the index as it was evaluated (prequential keeps learning)
        from mfli.report import snapshot_stats

        html_stats = snapshot_stats(learner.snapshot(), settings.index, seed=model.seed)
    sys.stdout.write(_table(f"{data.name}: static recall, {report['static']['test_users']} test users "
                            f"(prior beta={beta:g}, half-life={hl:g} events, passes={args.passes})",
                            report["static"]))
    sys.stdout.write(f"index/exact R@100 = {report['static']['index_over_exact@100']:.3f}\n")
    if not args.no_prequential:
        preq = prequential(learner, data, cut, len(data), args.batch)
        report["prequential"] = preq
        sys.stdout.write(_table(f"prequential (test-then-train, {preq['events_scored']} events)",
                                {k: v for k, v in preq.items() if k in ("mfli", "online_popularity")}))
        if args.plot:
            plot_curve(preq["curve"], args.plot, f"{data.name}: prequential recall@100")
    if args.ablations:
        report["ablations"] = {}
        w = model.objective_weights
        variants = {
            "F=1 (engagement only)": {"facets": 1, "objective_weights": [w[0]]},
            "no quantised loss": {"quantised_loss": False},
            "no delayed start": {"warmup_events": 0, "level_interval_events": 0},
        }
        for name, upd in variants.items():
            ab = fresh(model.model_copy(update=upd), data)
            train(ab, data, cut, args.passes, args.batch)
            res = static_eval(ab, settings, data, cut, baselines=False)
            report["ablations"][name] = {"index": res["index"], "exact": res["exact"],
                                         "utilisation": ab.rq.utilisation.tolist()}
        sys.stdout.write(_table("ablations (exact search)", {k: v["exact"] for k, v in report["ablations"].items()}
                                | {"full model": report["static"]["exact"]}))
        sys.stdout.write(_table("ablations (index path)", {k: v["index"] for k, v in report["ablations"].items()}
                                | {"full model": report["static"]["index"]}))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if getattr(args, "report", None):
        from mfli.report import eval_report, write_report

        sizes, counts = html_stats
        write_report(args.report, eval_report(report, sizes, (settings.index.b_low, settings.index.b_upp), counts))
        log.info("wrote %s", args.report)
    return 0
