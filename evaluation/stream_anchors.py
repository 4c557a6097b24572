"""The anchors of the streaming protocol, run on the same log as mfli, and the comparison table.

Anchors (computed in the same run, never copied from a table): online decayed popularity, the online
first-order Markov chain, and SASRec trained on the training period and frozen. They rank every
catalogue item that occurs in the log; mfli ranks every live catalogue item (a superset: the
catalogue's never-rated items only make its task harder).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from mfli.evaluation.anchors import OnlineMarkov, OnlinePopularity, SASRecAnchor, SASRecSettings
from mfli.evaluation.bootstrap import hits_at, ndcg_at, paired_bootstrap, rank_metrics
from mfli.evaluation.prequential import ModelStream
from mfli.evaluation.streaming_anchors import StreamResult, dense_rows, score_stream
from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)

FRESH_MS = 86_400_000  # "fresh": the item's first event in the log is less than a day (stream time) old
KS = (20, 50, 100)


def anchor_streams(data: Interactions, cut: int, sasrec_epochs: int = 12,
                   popularity_half_life: float | None = None, sasrec_dim: int = 64,
                   sasrec_history: int = 50) -> dict[str, StreamResult]:
    """Per-event ranks of each anchor over the test period (same events as :func:`prequential`).

    ``sasrec_dim``/``sasrec_history``: the eval passes the model's own d and H, so SASRec gets the same
    width and window as the model it is compared with."""
    users, _ = dense_rows(data.users)
    items, n_items = dense_rows(data.items)
    out: dict[str, StreamResult] = {}
    pop = OnlinePopularity(popularity_half_life or max(200.0, 0.01 * cut))
    out["online popularity"] = score_stream(lambda u, h: pop.scores(u, n_items), users, items, cut, n_items,
                                            observe=pop.observe, batch=1024)
    markov = OnlineMarkov(window=max(1, int(round(0.05 * cut))))
    out["online Markov"] = score_stream(lambda u, h: markov.scores(u, n_items, dtype=np.float64), users, items,
                                        cut, n_items, observe=markov.observe, batch=1024)
    if sasrec_epochs > 0:
        seqs: dict[int, list[int]] = {}
        for u, i in zip(users[:cut].tolist(), items[:cut].tolist(), strict=True):
            seqs.setdefault(u, []).append(i)
        n_train = int(items[:cut].max()) + 1
        sasrec = SASRecAnchor(n_train, SASRecSettings(epochs=sasrec_epochs, d=sasrec_dim, max_len=sasrec_history))
        stats = sasrec.fit([np.asarray(v) for v in seqs.values()])
        log.info("SASRec anchor: %d epochs, %.0f s", stats["epochs_run"], stats["seconds"])
        out["SASRec (frozen)"] = score_stream(lambda u, h: sasrec.scores(h, n_items), users, items, cut, n_items,
                                              batch=512)
    return out


def _fresh_mask(data: Interactions, positions: np.ndarray) -> np.ndarray:
    first: dict[str, int] = {}
    for i, t in zip(data.items.tolist(), data.ts.tolist(), strict=True):
        first.setdefault(i, t)
    born = np.fromiter((first[i] for i in data.items[positions].tolist()), np.int64, positions.size)
    return data.ts[positions] - born < FRESH_MS


def summarise(data: Interactions, ours: ModelStream, anchors: dict[str, StreamResult], n_boot: int = 1000,
              more_seeds: Sequence[ModelStream] = ()) -> dict:
    """Metrics per method, fresh-item HR@20, and paired intervals of mfli (index path) minus each anchor.

    ``more_seeds``: the same model retrained with other seeds on the same events. One streaming run of a
    model that learns from every event carries its own optimisation noise (two seeds, or the same seed on
    another float path, differ by ~0.006 HR@20 on ml-100k's 9.9k events), which a bootstrap over users
    cannot see. With them the summary adds each seed's HR@20 and ratio to the best anchor, and the
    seed-averaged model (per event, the share of seeds that hit) with its own paired intervals.
    """
    ranks = {f"mfli {name}": r for name, r in ours.ranks.items()}
    for name, res in anchors.items():
        if not np.array_equal(res.positions, ours.positions):
            raise RuntimeError(f"anchor {name!r} scored other events than mfli "
                               f"({res.positions.size} vs {ours.positions.size})")
        ranks[name] = res.ranks
    fresh = _fresh_mask(data, ours.positions)
    methods = {}
    for name, r in ranks.items():
        m = rank_metrics(r, KS)
        m["fresh_hr@20"] = float((r[fresh] < 20).mean()) if fresh.any() else float("nan")
        methods[name] = m
    users = np.unique(ours.users, return_inverse=True)[1]
    main = ranks["mfli index"]
    comparisons, text = {}, []
    for name in anchors:
        comp = {}
        for metric, fn in (("HR@20", lambda r: hits_at(r, 20)), ("HR@100", lambda r: hits_at(r, 100)),
                           ("NDCG@20", lambda r: ndcg_at(r, 20))):
            comp[metric] = paired_bootstrap(fn(main), fn(ranks[name]), users, n_boot=n_boot)
        comparisons[name] = comp
        c = comp["HR@20"]
        text.append(f"mfli index - {name}: HR@20 {c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], "
                    f"ratio {c['ratio']:.3f} [{c['ratio_lo']:.3f}, {c['ratio_hi']:.3f}]")
    best = max(anchors, key=lambda n: methods[n]["HR@20"]) if anchors else None
    exact = methods["mfli exact"]["HR@20"]
    index_over_exact = methods["mfli index"]["HR@20"] / exact if exact else float("nan")
    text.append(f"index path / exact HR@20 = {index_over_exact:.3f}; best anchor by HR@20: {best}; "
                f"fresh-item events: {int(fresh.sum())}")
    out = {"events_scored": int(ours.positions.size), "users": int(users.max()) + 1 if users.size else 0,
           "fresh_events": int(fresh.sum()), "methods": methods, "best_anchor": best,
           "vs_anchors": comparisons, "index_over_exact_hr@20": index_over_exact, "comparisons_text": text,
           "prequential_compat": _compat(ours, ranks, data)}
    if more_seeds:
        out["seeds"] = _over_seeds([ours, *more_seeds], ranks, list(anchors), best, fresh, users, n_boot, text)
    return out


def _over_seeds(streams: Sequence[ModelStream], ranks: dict[str, np.ndarray], anchors: list[str],
                best: str | None, fresh: np.ndarray, users: np.ndarray, n_boot: int, text: list[str]) -> dict:
    """Per seed HR@20 (index path) and ratio to the best anchor; the seed-mean model against every anchor."""
    for s in streams[1:]:
        if not np.array_equal(s.positions, streams[0].positions):
            raise RuntimeError("a retrained seed scored other events than the first run")
    index_ranks = [s.ranks["index"] for s in streams]
    best_hr = float(hits_at(ranks[best], 20).mean()) if best else float("nan")
    per_seed = []
    for r in index_ranks:
        hr = float(hits_at(r, 20).mean())
        per_seed.append({"HR@20": hr, "ratio_to_best_anchor": hr / best_hr if best_hr else float("nan")})
    mean_hits = {k: np.mean([hits_at(r, k) for r in index_ranks], axis=0) for k in KS}
    mean_ndcg = np.mean([ndcg_at(r, 20) for r in index_ranks], axis=0)
    metrics = {f"HR@{k}": float(v.mean()) for k, v in mean_hits.items()}
    metrics["NDCG@20"] = float(mean_ndcg.mean())
    metrics["fresh_hr@20"] = float(mean_hits[20][fresh].mean()) if fresh.any() else float("nan")
    metrics["n"] = int(mean_ndcg.size)
    comparisons = {}
    for name in anchors:
        r = ranks[name]
        comparisons[name] = {
            "HR@20": paired_bootstrap(mean_hits[20], hits_at(r, 20), users, n_boot=n_boot),
            "HR@100": paired_bootstrap(mean_hits[100], hits_at(r, 100), users, n_boot=n_boot),
            "NDCG@20": paired_bootstrap(mean_ndcg, ndcg_at(r, 20), users, n_boot=n_boot)}
    hr = [p["HR@20"] for p in per_seed]
    text.append(f"mfli index over {len(streams)} seeds: HR@20 " + " / ".join(f"{h:.4f}" for h in hr)
                + f" (mean {np.mean(hr):.4f}, spread {max(hr) - min(hr):.4f})")
    for name, comp in comparisons.items():
        c = comp["HR@20"]
        text.append(f"mfli index (seed mean) - {name}: HR@20 {c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], "
                    f"ratio {c['ratio']:.3f} [{c['ratio_lo']:.3f}, {c['ratio_hi']:.3f}]")
    return {"count": len(streams), "per_seed": per_seed, "mean_model": metrics, "vs_anchors": comparisons}


def _compat(ours: ModelStream, ranks: dict[str, np.ndarray], data: Interactions, windows: int = 20) -> dict:
    """The older ``prequential`` block (recall@K per method and a per-window HR@100 curve) the HTML
    report and plot read."""
    out: dict = {"events_scored": int(ours.positions.size)}
    names = {"mfli": "mfli index", "online_popularity": "online popularity", "markov": "online Markov",
             "sasrec": "SASRec (frozen)"}
    pos = ours.positions
    lo, hi = (int(pos.min()), int(pos.max()) + 1) if pos.size else (0, 1)
    edges = np.linspace(lo, hi, windows + 1)
    curve: dict = {"window_start_event": edges[:-1].astype(int).tolist()}
    for short, name in names.items():
        if name not in ranks:
            continue
        r = ranks[name]
        out[short] = {f"recall@{k}": float((r < k).mean()) for k in KS}
        h = (r < 100).astype(float)
        curve[short] = [float(h[(pos >= a) & (pos < b)].mean()) if ((pos >= a) & (pos < b)).any() else None
                        for a, b in zip(edges[:-1], edges[1:], strict=True)]
    out["curve"] = curve
    return out
