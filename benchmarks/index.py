"""``mfli bench index``: the LMDB indexer at catalogue scale, Kafka-free (issue 4, "must show" 4).

Builds a synthetic catalogue (clustered random unit vectors, d=64, F=3; codes by greedy residual
argmin under a codebook whose level-1 words are random catalogue vectors, with M^L ~ items / 32), loads
it through :class:`~mfli.storage.index.writer.IndexWriter`, then measures:

* **full pass** seconds (re-encode + split/merge clusters + one atomic swap transaction);
* **delta apply** throughput: batches of item updates (small embedding drift for most items, a large
  move for ``--drift``), item updates per second per batch (target >= 50k/s);
* **LMDB bytes per item** (pages in use, not the sparse map size);
* **reader latency** of ``vectors()`` (one request's worth of candidates) and ``members()``.

Encoding the updated items (the learner's job) happens outside the timed section.

``--movielens DIR`` instead trains the learner on the training period of the evaluation protocol
(docs/design.md §Evaluation protocol; one pass), indexes its state in LMDB with and without
split/merge, and reports the learned-index recall of both over the LMDB views (the split/merge
ablation), exact search, and the invariant check of the balanced index.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mfli.config import IndexSettings, Settings
from mfli.deltas import CodebookSnapshot, DeltaBatch
from mfli.indexer.check import check_index
from mfli.storage.index.full_pass import encode
from mfli.storage.index.writer import IndexWriter

from .report import Row, result

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--facets", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10_000, help="item deltas per write transaction")
    parser.add_argument("--update-batches", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.01, help="per-dimension noise of an ordinary update")
    parser.add_argument("--drift", type=float, default=0.05,
                        help="share of updates that move far (re-cluster)")
    parser.add_argument("--reader-reps", type=int, default=50)
    parser.add_argument("--path", default=None, help="index directory (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tight-clusters", type=int, default=8, help="--movielens: K of the tight budget")
    parser.add_argument("--movielens", default=None, metavar="DIR",
                        help="split/merge ablation on a trained MovieLens state instead of the synthetic run")


def _catalogue(n: int, facets: int, dim: int, levels: int, rng: np.random.Generator):
    m = max(8, math.ceil((n / 32) ** (1 / levels)))
    centers = rng.normal(size=(max(64, n // 500), facets, dim)).astype(np.float32)
    vectors = np.empty((n, facets, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centers[rng.integers(0, centers.shape[0], stop - start)]
        block += 0.6 * rng.normal(size=block.shape).astype(np.float32)
        vectors[start:stop] = block / np.linalg.norm(block, axis=2, keepdims=True)
    cb = np.empty((facets, levels, m, dim), dtype=np.float32)
    for f in range(facets):
        cb[f, 0] = vectors[rng.choice(n, m, replace=False), f]
        for level in range(1, levels):
            cb[f, level] = (0.3 / level) * rng.normal(size=(m, dim)) / math.sqrt(dim)
    return vectors, cb


def _encode_all(vectors: np.ndarray, cb: np.ndarray) -> np.ndarray:
    return np.stack([encode(vectors[:, f], cb[f]) for f in range(vectors.shape[1])], axis=1)


def _batch(rows, vectors, codes, prior, versions, ts_ms) -> DeltaBatch:
    n = rows.size
    return DeltaBatch([f"item-{r}" for r in rows.tolist()], rows.astype(np.int64), versions.astype(np.int64),
                      np.full(n, ts_ms, np.int64), vectors, codes, prior, np.zeros(n, bool), [])


def _update_batch(args, rng, vectors, prior, cb, version: int) -> DeltaBatch:
    """``args.batch`` distinct random items: small noise for most, a far move for ``args.drift``."""
    n = vectors.shape[0]
    rows = np.sort(rng.choice(n, args.batch, replace=False))
    noise = rng.normal(size=(rows.size, args.facets, args.dim)).astype(np.float32)
    v = vectors[rows] + args.noise * noise
    far = rng.random(rows.size) < args.drift
    v[far] = vectors[rng.choice(n, int(far.sum()))]
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    p = (prior[rows] * rng.uniform(0.8, 1.2, rows.size)).astype(np.float32)
    return _batch(rows, v, _encode_all(v, cb), p, np.full(rows.size, version), int(time.time() * 1000))


def _movielens_ablation(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from mfli.evaluation.offline import evaluate_retriever, test_set, user_rows
    from mfli.evaluation.protocol import temporal_cut
    from mfli.evaluation.run import fresh
    from mfli.evaluation.training import train
    from mfli.retrieval.exact import ExactRetriever
    from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
    from mfli.sources.movielens import load_movielens

    data = load_movielens(args.movielens)
    cut = temporal_cut(len(data), 0.9)
    learner = fresh(settings.model, data)
    t = time.perf_counter()
    train(learner, data, cut, 1, settings.ingest.batch_size)
    log.info("trained on %d events in %.0f s", cut, time.perf_counter() - t)
    snap = learner.snapshot()
    ts = test_set(data, 0, cut, len(data))
    hist, excl, truth = user_rows(learner, ts)
    from dataclasses import replace

    params = LearnedIndexParams.from_settings(settings.serve, settings.model)
    # the default budget (K=64 clusters x N_k=256 + trending) covers most of a 4k-item catalogue, which
    # hides the index; a tight budget makes the ablation about the clusters themselves
    budgets = {"": params, ", tight budget": replace(params, clusters_per_request=args.tight_clusters,
                                                      members_per_cluster=64, trending=0)}
    tmp = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="mfli-bench-index-ml-"))
    rows, notes, recalls, ok = [], [], {}, False
    try:
        for split_merge in (True, False):
            s = settings.index.model_copy(update={"split_merge": split_merge, "map_size": 1 << 30})
            writer = IndexWriter(tmp / f"split_merge_{split_merge}", s)
            try:
                t = time.perf_counter()
                writer.load_snapshot(snap)
                load_s = time.perf_counter() - t
                report = check_index(writer.reader(), s, min_in_bounds=0.95 if split_merge else None)
                with writer.reader().view() as view:
                    name = "learned index" + ("" if split_merge else ", no split/merge")
                    for suffix, p in budgets.items():
                        r = evaluate_retriever(LearnedIndexRetriever(view, p), hist, excl, truth)
                        for k in (20, 100):
                            row_name = f"{name}{suffix} recall@{k}"
                            rows.append(Row.from_samples(row_name, [r[f"recall@{k}"]], "ratio"))
                            recalls[(split_merge, suffix, k)] = r[f"recall@{k}"]
                    if split_merge:
                        ok = report.ok
                        exact_ret = ExactRetriever(view, settings.model.history, settings.model.recency_decay)
                        exact = evaluate_retriever(exact_ret, hist, excl, truth)
                        for k in (20, 100):
                            rows.append(Row.from_samples(f"exact recall@{k}", [exact[f"recall@{k}"]],
                                                         "ratio"))
                bounds = [round(x, 4) for x in report.in_bounds]
                notes.append(f"{name}: clusters {report.clusters}, in bounds {bounds}, "
                             f"sizes {report.size_stats}, load+full pass {load_s:.2f} s, ok={report.ok}")
            finally:
                writer.close()
    finally:
        if not args.path:
            shutil.rmtree(tmp, ignore_errors=True)
    return result(
        "index", rows,
        params={"dataset": args.movielens, "train_events": cut, "test_users": len(ts.users),
                "items": int(snap.live.sum())},
        targets={"split/merge recall@100 >= without (tight budget)":
                 recalls[(True, ", tight budget", 100)] >= recalls[(False, ", tight budget", 100)],
                 "check ok with split/merge (>= 95% items in [B_low, B_upp])": ok},
        notes=notes,
    )


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if args.movielens:
        return _movielens_ablation(args, settings)
    rng = np.random.default_rng(args.seed)
    n = args.items
    t0 = time.perf_counter()
    vectors, cb = _catalogue(n, args.facets, args.dim, args.levels, rng)
    codes = _encode_all(vectors, cb)
    prior = rng.gamma(1.0, 1.0, n).astype(np.float32)
    log.info("catalogue of %d items built in %.1f s (M=%d)", n, time.perf_counter() - t0, cb.shape[2])
    tmp = Path(args.path) if args.path else Path(tempfile.mkdtemp(prefix="mfli-bench-index-"))
    map_size = max(settings.index.map_size, 16 << 30)
    index_settings: IndexSettings = settings.index.model_copy(update={"map_size": map_size})
    writer = IndexWriter(tmp, index_settings, auto_bootstrap=False)
    rows_out: list[Row] = []
    rates: dict[str, float] = {}
    try:
        load_rates = []
        for start in range(0, n, args.batch):
            rows = np.arange(start, min(n, start + args.batch))
            now = int(time.time() * 1000)
            b = _batch(rows, vectors[rows], codes[rows], prior[rows], np.ones(rows.size), now)
            t = time.perf_counter()
            writer.apply(b, {"bench:0": start + rows.size})
            load_rates.append(rows.size / (time.perf_counter() - t))
        rows_out.append(Row.from_samples("initial load (unclustered)", load_rates, "items/s"))
        writer.apply(None, {}, [CodebookSnapshot(1, cb)])
        t = time.perf_counter()
        fp = writer.full_pass()
        full_pass_s = time.perf_counter() - t
        rows_out.append(Row.from_samples("full pass", [full_pass_s], "s",
                                         note=f"clusters per facet {fp.clusters}"))
        # delta updates: small drift for most, a far move for args.drift of them; first with an fsync per
        # commit (the default), then with index.sync_commits off (same writer code, env reopened)
        version = 1
        for sync in (True, False):
            if not sync:
                writer.close()
                writer = IndexWriter(tmp, index_settings.model_copy(update={"sync_commits": False}),
                                     auto_bootstrap=False)
            update_rates, cpu_rates, moved = [], [], []
            for _ in range(args.update_batches):
                version += 1
                b = _update_batch(args, rng, vectors, prior, cb, version)
                t, c = time.perf_counter(), time.process_time()
                res = writer.apply(b, {"bench:0": n + version})
                update_rates.append(len(b) / (time.perf_counter() - t))
                cpu_rates.append(len(b) / max(time.process_time() - c, 1e-9))
                moved.append(sum(res.moved) / (len(b) * args.facets))
            name = "delta apply" if sync else "delta apply, sync_commits off"
            rows_out.append(Row.from_samples(name, update_rates, "items/s",
                                             note=f"batch {args.batch}, moved share {np.median(moved):.3f}"))
            rates[name] = float(np.median(update_rates))
            # on a shared box wall time includes waiting for the CPU; this row shows what the code costs
            rows_out.append(Row.from_samples(f"{name} per CPU second", cpu_rates, "items/s",
                                             note="items / process CPU time (excludes run-queue waits)"))
        info, stat = writer.env.info(), writer.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        rows_out.append(Row.from_samples("LMDB bytes per item", [used / n], "B",
                                         note=f"{used / 2**20:.0f} MiB in use for {n} items"))
        index = writer.reader()
        vec_lat, mem_lat, vec16_lat = [], [], []
        with index.view() as view:
            ids = [int(x) for x in rng.integers(0, 50, args.reader_reps)]
            for rep in range(args.reader_reps):
                rows = rng.choice(n, 1000, replace=False)
                t = time.perf_counter()
                view.vectors(rows)
                vec_lat.append(time.perf_counter() - t)
                rows = rng.choice(n, 16_384, replace=False)
                t = time.perf_counter()
                view.vectors(rows)
                vec16_lat.append(time.perf_counter() - t)
                facet = ids[rep] % args.facets
                clusters = rng.integers(0, fp.clusters[facet], 64)
                t = time.perf_counter()
                for c in clusters.tolist():
                    view.members(facet, c, 256)
                mem_lat.append(time.perf_counter() - t)
        rows_out.append(Row.from_samples("reader vectors() 1k rows", vec_lat, "s"))
        rows_out.append(Row.from_samples("reader vectors() 16k rows", vec16_lat, "s"))
        rows_out.append(Row.from_samples("reader members() x64 clusters", mem_lat, "s"))
        t = time.perf_counter()
        report = check_index(index, index_settings, min_in_bounds=0.95)
        check_s = time.perf_counter() - t
        rows_out.append(Row.from_samples("index check", [check_s], "s"))
    finally:
        writer.close()
        if not args.path:
            shutil.rmtree(tmp, ignore_errors=True)
    return result(
        "index", rows_out,
        params={"items": n, "facets": args.facets, "dim": args.dim, "levels": args.levels,
                "codewords": int(cb.shape[2]), "batch": args.batch, "drift": args.drift, "noise": args.noise,
                "target": index_settings.target_cluster_size, "b_low": index_settings.b_low,
                "b_upp": index_settings.b_upp},
        targets={"delta apply >= 50k items/s": rates["delta apply"] >= 50_000,
                 "delta apply (sync_commits off) >= 50k items/s":
                     rates["delta apply, sync_commits off"] >= 50_000,
                 "index check ok (>= 95% items in [B_low, B_upp])": report.ok},
        notes=[f"in bounds per facet {[round(x, 4) for x in report.in_bounds]}",
               f"cluster sizes {report.size_stats}"] + report.violations[:5],
    )
