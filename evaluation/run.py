"""``mfli eval``: the streaming protocol (the one that matters) and the static one, with every anchor
computed in the same run on the same events.

1. Temporal split 90/10. The popularity prior (beta, half-life) is tuned in the streaming protocol on a
   validation slice cut from the *training* period (the last 10 % of it); the test period is never used
   for tuning.
2. A fresh learner streams the training period once, then the static protocol (docs/design.md
   §Evaluation protocol: recall of the test users' unseen test items) for the index path, exact
   search, hnswlib, popularity, EASE, ALS.
3. Streaming: every test event is scored before it is learned, through the index path and exactly;
   the anchors (online decayed popularity, the online Markov chain, SASRec trained on the training
   period and frozen) rank the same events. HR@20/50/100, NDCG@20, paired bootstrap intervals (over
   users) of mfli minus each anchor, HR@20 on fresh items (first seen < 1 day of stream time earlier).
4. ``--ablations``: F=1/F=3, mean-pooled query, separate input embeddings, no replay, each retrained and
   scored in the streaming protocol.
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
from mfli.evaluation.prequential import ModelStream, prequential, tune_prior
from mfli.evaluation.protocol import temporal_cut
from mfli.evaluation.static import static_eval
from mfli.evaluation.stream_anchors import anchor_streams, summarise
from mfli.evaluation.training import train
from mfli.learner.ensemble import Ensemble, learner_for
from mfli.learner.learner import MFLILearner
from mfli.sources import add_source_arguments, load_interactions, spec_from_args
from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)

# beta = 0 included: with a full-catalogue softmax the encoder may learn popularity itself
BETAS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
HALF_LIVES_FRACTION = [0.003, 0.01, 0.03, 0.1]  # of the training events


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None,
                        help="MovieLens directory (ml-1m, ml-100k, ml-latest-small) or an event file (see --columns)")
    parser.add_argument("--compare-probes", nargs=2, metavar=("A", "B"), default=None,
                        help="instead: compare two learner probe logs (globs; learner.probe_path), paired by event")
    parser.add_argument("--from-row", type=int, default=0,
                        help="with --compare-probes: only events whose id ends in a row number >= this")
    add_source_arguments(parser, events=False)
    parser.add_argument("--batch", type=int, default=1024,
                        help="events per micro-batch: scored together, then learned (in steps of model.step_events)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--plot", default=None, help="PNG of streaming HR@100 over time")
    parser.add_argument("--report", default=None,
                        help="self-contained HTML report: HR over time, cluster sizes, codebook usage")
    parser.add_argument("--ablations", action="store_true", help="also F=1 and mean pooling, streaming protocol")
    parser.add_argument("--no-static", action="store_true", help="skip the static protocol")
    parser.add_argument("--static-only", action="store_true", help="only the static protocol (no streaming)")
    parser.add_argument("--sasrec-epochs", type=int, default=12, help="SASRec anchor epochs (0 = skip it)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    parser.add_argument("--seeds", type=int, default=1,
                        help="streaming protocol: also retrain the model with seeds seed+1 .. seed+N-1 on the same "
                        "events and report each seed and the seed mean against the anchors (a single run carries "
                        "the learner's own optimisation noise, which the bootstrap over users does not see)")
    parser.add_argument("--beta", type=float, default=None, help="skip tuning: use this prior weight")
    parser.add_argument("--half-life", type=float, default=None, help="skip tuning: prior half-life (events)")


def fresh(model: ModelSettings, data: Interactions) -> MFLILearner | Ensemble:
    """A learner (an ensemble when ``model.members`` > 1) that knows the catalogue (upserted at time 0
    with its tags): ratings are what streams."""
    from mfli.events import ItemEvent

    learner = learner_for(model)
    learner.upsert_items([ItemEvent(item_id=i, op="upsert", created_ts=0, tags=t) for i, t in data.item_tags.items()])
    return learner


def tune(model: ModelSettings, data: Interactions, cut: int, batch: int) -> dict:
    vcut = temporal_cut(cut, 0.9)
    learner = fresh(model, data)
    train(learner, data, vcut, 1, batch)
    half_lives = [max(200.0, f * vcut) for f in HALF_LIVES_FRACTION]
    beta, hl, table = tune_prior(learner, data, vcut, cut, batch, BETAS, half_lives)
    log.info("prior tuned on validation events [%d, %d): beta=%g half_life=%.0f events", vcut, cut, beta, hl)
    return {"beta": beta, "half_life": hl, "validation_events": cut - vcut, "grid": table}


def _stream_table(title: str, rows: dict[str, dict]) -> str:
    cols = ("HR@20", "HR@50", "HR@100", "NDCG@20", "fresh_hr@20")
    out = [f"\n{title}\n", f"{'method':<24}" + "".join(f"{c:>12}" for c in cols) + "\n"]
    for name, r in rows.items():
        out.append(f"{name:<24}" + "".join(f"{r.get(c, float('nan')):>12.4f}" for c in cols) + "\n")
    return "".join(out)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "compare_probes", None):
        from mfli.evaluation.probes import compare, format_report

        a, b = args.compare_probes
        probe_report = compare(a, b, from_row=args.from_row, n_boot=args.bootstrap)
        log.info("probe comparison, A = %s, B = %s\n%s", a, b, format_report(probe_report, "A", "B"))
        if args.json:
            with open(args.json, "wb") as f:
                f.write(orjson.dumps(probe_report, option=orjson.OPT_INDENT_2))
        return 0
    if getattr(args, "dataset", None) is None:
        raise SystemExit("mfli eval: --dataset is required (or --compare-probes A B)")
    torch.set_num_threads(settings.learner.threads)  # the model trains as `mfli learn` does; SASRec sets its own
    t0 = time.perf_counter()
    data = load_interactions(spec_from_args(args, path=args.dataset))
    cut = temporal_cut(len(data))
    model = settings.model
    report: dict = {"dataset": data.name, "events": len(data), "train_events": cut, "batch": args.batch,
                    "seed": model.seed}
    if args.beta is None or args.half_life is None:
        report["prior_tuning"] = tune(model, data, cut, args.batch)
        beta, hl = report["prior_tuning"]["beta"], report["prior_tuning"]["half_life"]
    else:
        beta, hl = args.beta, args.half_life
    model = model.model_copy(update={"popularity_beta": beta, "popularity_half_life_events": hl})
    report["model"] = model.model_dump()
    learner = fresh(model, data)
    t = time.perf_counter()
    train(learner, data, cut, 1, args.batch)
    report["train_seconds"] = round(time.perf_counter() - t, 1)
    report["codebook"] = {"codewords": learner.rq.m, "utilisation": learner.rq.utilisation.tolist(),
                          "perplexity": learner.rq.perplexity.tolist()}
    if not args.no_static:
        report["static"] = static_eval(learner, settings, data, cut)
        sys.stdout.write(report["static"].pop("_table"))
    html_stats = None
    if getattr(args, "static_only", False):
        return _write(args, report, t0)
    if getattr(args, "report", None):  # the index as it was after training (streaming keeps learning)
        from mfli.orchestration.report import snapshot_stats

        html_stats = snapshot_stats(learner.snapshot(), settings.index, seed=model.seed)
    ours = prequential(learner, data, cut, args.batch, settings)
    anchors = anchor_streams(data, cut, sasrec_epochs=args.sasrec_epochs, sasrec_dim=model.dim,
                             sasrec_history=model.history)
    report["streaming"] = summarise(data, ours, anchors, n_boot=args.bootstrap,
                                    more_seeds=_more_seeds(model, settings, data, cut, args))
    rows = dict(report["streaming"]["methods"])
    if "seeds" in report["streaming"]:
        seeds = report["streaming"]["seeds"]
        for k, per in enumerate(seeds["per_seed"]):
            per["seed"] = model.seed + k
        rows[f"mfli index, {seeds['count']}-seed mean"] = seeds["mean_model"]
    sys.stdout.write(_stream_table(f"{data.name}: streaming protocol, {report['streaming']['events_scored']} "
                                   f"events (prior beta={beta:g}, half-life={hl:g} events)", rows))
    for line in report["streaming"]["comparisons_text"]:
        sys.stdout.write(line + "\n")
    report["prequential"] = report["streaming"]["prequential_compat"]
    if args.plot:
        from mfli.evaluation.training import plot_curve

        plot_curve(report["prequential"]["curve"], args.plot, f"{data.name}: streaming HR@100")
    if args.ablations:
        report["ablations"] = _ablations(model, settings, data, cut, args, ours)
    _write(args, report, t0)
    if getattr(args, "report", None):
        from mfli.orchestration.report import eval_report, write_report

        sizes, counts = html_stats
        write_report(args.report, eval_report(report, sizes, (settings.index.b_low, settings.index.b_upp), counts))
        log.info("wrote %s", args.report)
    return 0


def _more_seeds(model: ModelSettings, settings: Settings, data: Interactions, cut: int,
                args: argparse.Namespace) -> list[ModelStream]:
    """The streaming protocol again for seeds ``seed+1 .. seed+N-1`` (same prior, same events, no static block)."""
    out = []
    for k in range(1, getattr(args, "seeds", 1) or 1):
        learner = fresh(model.model_copy(update={"seed": model.seed + k}), data)
        train(learner, data, cut, 1, args.batch)
        out.append(prequential(learner, data, cut, args.batch, settings))
        log.info("seed %d: streaming HR@20 (index) %.4f", model.seed + k, float((out[-1].ranks["index"] < 20).mean()))
    return out


def _write(args: argparse.Namespace, report: dict, t0: float) -> int:
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return 0


def _ablations(model: ModelSettings, settings: Settings, data: Interactions, cut: int, args, main: ModelStream
               ) -> dict:
    """Streaming protocol (exact scoring) for each variant, paired against the full model's exact ranks."""
    from mfli.evaluation.bootstrap import paired_bootstrap, rank_metrics

    full = ModelSettings()  # the three default objective mixtures, one per facet
    other_facets = {"facets": 3, "objective_weights": full.objective_weights} if model.facets == 1 else \
        {"facets": 1, "objective_weights": [model.objective_weights[0]]}
    variants = {
        f"F={other_facets['facets']}": other_facets,
        "mean-pooled query (no encoder)": {"query_model": "mean"},
        "separate input embeddings" if model.encoder_input == "shared" else "shared input embeddings":
            {"encoder_input": "separate" if model.encoder_input == "shared" else "shared"},
    }
    if model.replay_ratio > 0:
        variants["no replay"] = {"replay_ratio": 0.0}
    out: dict = {"default model (exact)": rank_metrics(main.ranks["exact"])}
    base, base_name = main, "default"
    if model.members > 1:
        # the ensemble against one member; every other variant is then a change to that one member
        variants = {"one member (no ensemble)": {"members": 1}} | {
            f"one member, {name}": {"members": 1, **upd} for name, upd in variants.items()}
    users = np.unique(main.users, return_inverse=True)[1]
    for name, upd in variants.items():
        learner = fresh(model.model_copy(update=upd), data)
        train(learner, data, cut, 1, args.batch)
        res = prequential(learner, data, cut, args.batch, settings, index=False)
        if not np.array_equal(res.positions, main.positions):
            raise RuntimeError(f"ablation {name!r} scored other events than the full model")
        out[name] = rank_metrics(res.ranks["exact"])
        out[name]["baseline"] = base_name
        out[name]["default_minus_this_hr@20"] = paired_bootstrap(
            (base.ranks["exact"] < 20).astype(float), (res.ranks["exact"] < 20).astype(float), users,
            n_boot=args.bootstrap)
        log.info("ablation %s: %s", name, out[name])
        if upd == {"members": 1}:
            base, base_name = res, "one member"
    base_text = "default model (after the ensemble row: one member)" if model.members > 1 else "default model"
    sys.stdout.write(f"\nablations (streaming, exact scoring; interval = {base_text} minus variant, HR@20)\n")
    for name, r in out.items():
        ci = r.get("default_minus_this_hr@20")
        extra = f"  diff {ci['diff']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]" if ci else ""
        sys.stdout.write(f"{name:<34} HR@20 {r['HR@20']:.4f} HR@100 {r['HR@100']:.4f}{extra}\n")
    return out
