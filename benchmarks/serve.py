"""``mfli bench serve``: the learned index against the strongest ANN peers in process, then HTTP end to end.

Per catalogue size (``--items 100000,1000000``) and workload (``--workloads learned,synthetic``, see
:mod:`mfli.benchmarks.workloads`):

1. In process, one thread, every retriever on the *same* queries (each carries its ready-made query
   vector) and the *same* score (``combine(q . e) + prior``): recall@k against exact search, then QPS of
   single queries (one untimed warm-up pass, median of three timed passes) for the learned index, exact
   numpy and each peer of :mod:`mfli.benchmarks.peers` (hnswlib, FAISS HNSW / IVF-Flat / IVF-PQ
   fast-scan + refine, ScaNN) with its search parameter bisected to the learned index's recall. Beside
   QPS: build time, bytes per item and the cost of absorbing 1 % churn (the learned index through its
   LMDB writer, in place; peers by update/add/remove where the library can, else a rebuild).
2. HTTP: the catalogue is written to a real LMDB index (the indexer's writer) and users store, a real
   ``mfli serve`` process is started on loopback, and ``wrk`` drives ``GET /v1/recommend`` for random
   users. Install it with ``apt-get install wrk`` (Debian/Ubuntu); without it the HTTP part is skipped
   and the result says so.

What could flatter the learned index, stated so a reader can discount it: the learned index alone uses
the request's history (trigger clusters), which peers cannot; peers over-fetch ``k + |exclude|`` and filter;
each peer's parameters are tuned on the very queries that are timed (so is nothing of ours: the learned
index runs its configured defaults). Absolute numbers on a shared 2-core machine drift: read the ratios,
which are measured in the same process, minutes apart.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import replace as dc_replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from mfli.benchmarks.peers import PEERS, Catalogue, PeerRetriever, available
from mfli.benchmarks.report import Row, result
from mfli.benchmarks.workloads import (
    Workload,
    assign_nearest,
    learned_workload,
    synthetic_workload,
)
from mfli.events import InteractionEvent
from mfli.retrieval.base import Query, Recommendation
from mfli.retrieval.exact import ExactRetriever
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.snapshot import ItemSnapshot

log = logging.getLogger(__name__)


def write_lmdb(snapshot: ItemSnapshot, index_path: Path, users_path: Path | None, histories: list[np.ndarray],
               settings, chunk: int = 50_000) -> None:
    """Write the catalogue through the indexer's writer (chunked transactions, then a full pass) and the
    histories (users ``u0``, ``u1``, ...) into a users store, as the learner and indexer would."""
    from mfli.deltas import CodebookSnapshot, DeltaBatch
    from mfli.storage.index.writer import IndexWriter
    from mfli.storage.users_lmdb import UsersStore

    n = snapshot.n_items
    writer = IndexWriter(index_path, settings.index)
    try:
        now = int(time.time() * 1000)
        for start in range(0, n, chunk):
            rows = np.arange(start, min(n, start + chunk), dtype=np.int64)
            batch = DeltaBatch(
                [str(i) for i in snapshot.item_ids[rows]], rows, np.full(rows.size, snapshot.version, np.int64),
                np.full(rows.size, now, np.int64), snapshot.vectors[rows], snapshot.codes[rows],
                snapshot.prior[rows], ~snapshot.live[rows],
            )
            books = [CodebookSnapshot(snapshot.version, snapshot.codebooks)] if start == 0 else None
            models = [snapshot.query_model] if start == 0 and snapshot.query_model is not None else None
            writer.apply(batch, None, books, models)
        writer.full_pass()
    finally:
        writer.close()
    if users_path is None:
        return
    users = UsersStore(users_path, history=settings.model.history, keep=settings.model.seen_kept)
    try:
        events = [
            InteractionEvent(event_id=f"u{u}-{j}", user_id=f"u{u}", item_id=str(snapshot.item_ids[r]),
                             event_type="view", ts=1_000 + j)
            for u, h in enumerate(histories) for j, r in enumerate(h.tolist())
        ]
        for start in range(0, len(events), 20_000):
            users.apply(events[start : start + 20_000])
    finally:
        users.close()


def timed_queries(retriever, queries: list[Query], passes: int = 3) -> tuple[float, list[Recommendation]]:
    """Median QPS over ``passes`` timed passes of single queries (one thread), after one untimed warm-up
    pass (every retriever is warmed the same way: caches, lazy allocations, compiled kernels), and the
    answers of the last pass."""
    answers = [retriever.recommend(q) for q in queries]
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        answers = [retriever.recommend(q) for q in queries]
        rates.append(len(queries) / (time.perf_counter() - started))
    return statistics.median(rates), answers


def recall(answers: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Mean recall@k of ``answers`` against the exact top k (rows)."""
    return float(np.mean([np.intersect1d(a, t).size / max(1, t.size) for a, t in zip(answers, truth, strict=True)]))


def bisect_param(recall_at, grid: list[int], target: float) -> tuple[int, float, bool]:
    """Smallest search parameter whose recall reaches ``target``: walk ``grid`` (ascending) to the first
    value that reaches it, then bisect between it and the grid value before (recall is taken as monotone
    in the parameter). Returns (value, its recall, reached)."""
    below, chosen = None, None
    for value in grid:
        r = recall_at(value)
        if r >= target:
            chosen = (value, r)
            break
        below, chosen = value, (value, r)
    assert chosen is not None
    if chosen[1] < target:
        return chosen[0], chosen[1], False
    if below is not None:
        lo, hi = below, chosen[0]
        while hi - lo > max(1, lo // 16):
            mid = (lo + hi) // 2
            r = recall_at(mid)
            if r >= target:
                hi, chosen = mid, (mid, r)
            else:
                lo = mid
    return chosen[0], chosen[1], True


def churn_batch(cat: Catalogue, snapshot: ItemSnapshot, fraction: float = 0.01, seed: int = 3
                ) -> tuple[Catalogue, np.ndarray, np.ndarray, np.ndarray, dict]:
    """A churn batch touching ``fraction`` of the catalogue, as an online learner produces it: half of
    it re-embedded items (their vectors drift), a quarter deleted, a quarter new items. Returns the
    catalogue after it (labels of changed rows kept, new items appended), the changed / deleted / added
    labels, and the same batch in row space for the learned index's writer."""
    rng = np.random.default_rng(seed)
    n = cat.rows.size
    c = max(4, int(n * fraction))
    picked = rng.choice(n, size=c // 2 + c // 4, replace=False)
    changed, deleted = picked[: c // 2], picked[c // 2:]
    n_new = c // 4
    f, d = snapshot.facets, snapshot.dim

    def drift(v: np.ndarray) -> np.ndarray:
        v = v.reshape(v.shape[0], f, d) + rng.normal(0, 0.3 / np.sqrt(d), (v.shape[0], f, d)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=2, keepdims=True)).astype(np.float32)

    new_changed = drift(cat.flat[changed])
    new_items = drift(cat.flat[rng.choice(n, size=n_new, replace=False)])
    new_prior = cat.prior[rng.choice(n, size=n_new, replace=False)]
    flat = cat.flat.copy()
    flat[changed] = new_changed.reshape(changed.size, -1)
    after = Catalogue(rows=np.concatenate([cat.rows, snapshot.n_items + np.arange(n_new)]),
                      flat=np.concatenate([flat, new_items.reshape(n_new, -1)]),
                      prior=np.concatenate([cat.prior, new_prior]), facets=cat.facets, tau=cat.tau)
    added = np.arange(n, n + n_new)
    rows = {"changed": cat.rows[changed], "changed_vectors": new_changed, "deleted": cat.rows[deleted],
            "added": snapshot.n_items + np.arange(n_new), "added_vectors": new_items, "added_prior": new_prior}
    return after, changed, deleted, added, rows


def rq_encode(vectors: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Greedy residual-quantisation codes int32[n, F, L] of float32[n, F, d] (what the learner publishes)."""
    n, f, _ = vectors.shape
    levels = codebooks.shape[1]
    codes = np.empty((n, f, levels), np.int32)
    for facet in range(f):
        residual = vectors[:, facet].copy()
        for level in range(levels):
            codes[:, facet, level] = assign_nearest(residual, codebooks[facet, level])
            residual -= codebooks[facet, level][codes[:, facet, level]]
    return codes


def learned_churn(snapshot: ItemSnapshot, batch: dict, settings, root: Path) -> tuple[float, float]:
    """(seconds to write the catalogue into an LMDB index and run its full pass, seconds for the index
    writer to absorb the churn batch in place: one write transaction, as the indexer applies deltas)."""
    from mfli.deltas import DeltaBatch
    from mfli.storage.index.writer import IndexWriter

    t0 = time.perf_counter()
    write_lmdb(snapshot, root / "index.lmdb", None, [], settings)
    write_s = time.perf_counter() - t0
    vectors = np.concatenate([batch["changed_vectors"], batch["added_vectors"],
                              np.zeros((batch["deleted"].size, snapshot.facets, snapshot.dim), np.float32)])
    rows = np.concatenate([batch["changed"], batch["added"], batch["deleted"]]).astype(np.int64)
    codes = rq_encode(vectors, snapshot.codebooks)
    prior = np.concatenate([snapshot.prior[batch["changed"]], batch["added_prior"],
                            np.zeros(batch["deleted"].size, np.float32)]).astype(np.float32)
    deleted = np.zeros(rows.size, bool)
    deleted[-batch["deleted"].size:] = True
    delta = DeltaBatch([f"i{r}" for r in rows.tolist()], rows, np.full(rows.size, snapshot.version + 1, np.int64),
                       np.zeros(rows.size, np.int64), vectors, codes, prior, deleted, [])
    writer = IndexWriter(root / "index.lmdb", settings.index)
    try:
        t0 = time.perf_counter()
        writer.apply(delta)
        churn_s = time.perf_counter() - t0
    finally:
        writer.close()
    return write_s, churn_s


def view_nbytes(view: MemoryIndexView) -> int:
    """Bytes the learned index holds to answer a request (vectors for the exact refine, int8 codes in
    posting-list order and by row, priors, posting lists, cluster assignments, path map, codebooks)."""
    arrays = [view._flat, view._prior, view._all_rows, view._gstart, view._gend, view._cluster_base, view._assign,
              view._path_key, view._path_ptr, view._path_ids, view._codebooks, view._trending]
    dense = view.dense()
    arrays += [dense.codes, dense.scale, dense.bias]
    arrays += [fc.centroids for fc in view.clusters]
    return int(sum(a.nbytes for a in arrays))


def compare(workload: Workload, settings, k: int, peers: list[str], churn: bool = True, interleave: int = 3) -> dict:
    """The in-process comparison on one workload: learned index, exact search and every peer on the
    same queries and score, one thread; each peer's search parameter bisected to the learned index's
    recall@k; QPS, build time, bytes per item and the cost of absorbing 1 % churn."""
    snap, queries = workload.snapshot, workload.queries
    n = workload.n_items
    out: dict = {"workload": workload.name, "items": n, "queries": len(queries), "k": k, "peers": {}}
    with threadpool_limits(1):
        t0 = time.perf_counter()
        view = MemoryIndexView.from_settings(snap, settings.index)
        out["learned_build_s"] = time.perf_counter() - t0
        out["learned_bytes_per_item"] = view_nbytes(view) / n
        params = LearnedIndexParams.from_settings(settings.serve, settings.model)
        exact = ExactRetriever(view, params.history, params.recency_decay)
        subset = queries[: max(20, len(queries) // 5)]
        out["exact_qps"], _ = timed_queries(exact, subset, passes=1)
        truth_recs = [exact.recommend(q) for q in queries]
        truth = [r.rows for r in truth_recs]
        learned = LearnedIndexRetriever(view, params)
        alive: dict = {}
        out["learned_qps"], answers = timed_queries(learned, queries)
        out["learned_recall"] = recall([a.rows for a in answers], truth)
        out["learned_candidates"] = float(np.mean([a.candidates for a in answers]))
        out["learned_answers"] = answers
        out["truth"] = truth_recs
        target = out["learned_recall"]
        log.info("%s n=%d: learned %.0f q/s at recall@%d %.4f (%.0f candidates), exact %.0f q/s", workload.name, n,
                 out["learned_qps"], k, target, out["learned_candidates"], out["exact_qps"])
        live = snap.live_rows()
        cat = Catalogue(rows=live, flat=np.ascontiguousarray(snap.vectors[live].reshape(live.size, -1)),
                        prior=snap.prior[live].astype(np.float32), facets=snap.facets, tau=workload.tau)
        want = int(np.median([min(n, q.k + q.exclude.size) for q in queries]))
        batch = churn_batch(cat, snap) if churn else None
        for name in peers:
            peer = PEERS[name]()
            t0 = time.perf_counter()
            peer.build(cat)
            res = {"build_s": time.perf_counter() - t0, "bytes_per_item": peer.nbytes() / n}
            retriever = PeerRetriever(peer, cat)
            best = None
            for secondary in peer.secondary:
                def recall_at(value: int, peer=peer, secondary=secondary, retriever=retriever, name=name) -> float:
                    peer.set_params(value, secondary)
                    r = recall([retriever.recommend(q).rows for q in queries], truth)
                    log.debug("%s %s=%d %s=%s recall %.4f", name, peer.param, value, peer.secondary_name,
                              secondary, r)
                    return r

                value, r, reached = bisect_param(recall_at, peer.grid(want), target)
                peer.set_params(value, secondary)
                qps, _ = timed_queries(retriever, queries, passes=1) if len(peer.secondary) > 1 else (0.0, None)
                log.info("%s n=%d: %s=%d %s=%s recall %.4f (target %.4f) %.0f q/s", name, n, peer.param, value,
                         peer.secondary_name or "-", secondary, r, target, qps)
                cand = (reached, qps, value, secondary)
                if best is None or (cand[0], cand[1]) > (best[0], best[1]):
                    best = cand
            reached, _, value, secondary = best
            peer.set_params(value, secondary)
            res["qps"], peer_answers = timed_queries(retriever, queries)
            res["recall"] = recall([a.rows for a in peer_answers], truth)
            res.update(param=peer.param, value=value, secondary_name=peer.secondary_name, secondary=secondary,
                       reached=reached, answers=peer_answers, ratio_learned_over_peer=out["learned_qps"] / res["qps"])
            log.info("%s n=%d: %s", name, n, {k_: v for k_, v in res.items() if k_ != "answers"})
            out["peers"][name] = res
            alive[name] = retriever
    if batch is not None:
        with tempfile.TemporaryDirectory(prefix="mfli-bench-churn-") as tmp:
            out["learned_lmdb_write_s"], out["learned_churn_s"] = learned_churn(snap, batch[4], settings, Path(tmp))
        out["churn_items"] = int(batch[1].size + batch[2].size + batch[3].size)
    if interleave and alive:
        # The QPS above were taken minutes apart, each while that retriever was tuned; on a shared box the
        # neighbours' load drifts in between. Here every retriever answers the same queries in turns (one
        # pass each, ``interleave`` rounds), so all see the same load; these medians are the headline.
        samples: dict[str, list[float]] = {"learned": [], **{name: [] for name in alive}}
        with threadpool_limits(1):
            for _ in range(interleave):
                for name, retriever in [("learned", learned), *alive.items()]:
                    started = time.perf_counter()
                    for q in queries:
                        retriever.recommend(q)
                    samples[name].append(len(queries) / (time.perf_counter() - started))
        out["learned_qps_sequential"] = out["learned_qps"]
        out["learned_qps"] = statistics.median(samples["learned"])
        for name in alive:
            out["peers"][name]["qps_sequential"] = out["peers"][name]["qps"]
            out["peers"][name]["qps"] = statistics.median(samples[name])
            out["peers"][name]["ratio_learned_over_peer"] = out["learned_qps"] / out["peers"][name]["qps"]
        log.info("%s n=%d interleaved qps: %s", workload.name, n,
                 {k_: round(statistics.median(v)) for k_, v in samples.items()})
    if batch is not None:  # last: a churned index no longer matches the catalogue its retriever reads
        after, changed, deleted, added, _ = batch
        for name, retriever in alive.items():
            out["peers"][name]["churn_s"], out["peers"][name]["churn_how"] = retriever.peer.churn(
                after, changed, deleted, added)
    alive.clear()
    reached = [p for p in out["peers"].values() if p["reached"]]
    out["best_peer"] = max(out["peers"], key=lambda p: (out["peers"][p]["reached"], out["peers"][p]["qps"])) \
        if out["peers"] else None
    out["ratio_learned_over_best_peer"] = (out["learned_qps"] / max(p["qps"] for p in reached)) if reached else None
    return out




def http_end_to_end(wl: Workload, settings, args: argparse.Namespace) -> dict:
    """Real LMDB + real ``mfli serve`` (one worker) + wrk on loopback (:mod:`mfli.benchmarks.http_cpu`):
    CPU per request in the server against the same service call in process, req/s, and p50/p99 at half
    the saturating rate. The users store holds the workload's request histories (user ``u<i>`` = query i)."""
    from mfli.benchmarks.http_cpu import in_process_cpu, republishing, server_cpu

    snapshot = wl.snapshot
    tag = f"{wl.name} {snapshot.n_items // 1000}k"
    if shutil.which("wrk") is None:
        return {"rows": [], "targets": {},
                "notes": [f"{tag}: HTTP part skipped: wrk not installed (apt-get install wrk)"]}
    users = len(wl.queries)
    with tempfile.TemporaryDirectory(prefix="mfli-bench-serve-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_lmdb(snapshot, root / "index.lmdb", root / "users.lmdb", [q.history for q in wl.queries], settings)
        write_s = time.perf_counter() - t0
        local = settings.model_copy(update={
            "index": settings.index.model_copy(update={"path": root / "index.lmdb"}),
            "learner": settings.learner.model_copy(update={"users_path": root / "users.lmdb"})})
        # alternate in-process and server measurements so both see the same neighbours' load
        inproc, server = [], []
        interval = settings.learner.model_publish_interval_s if args.republish_s is None else args.republish_s
        with republishing(root / "index.lmdb", settings, interval) as published:
            for _ in range(args.http_rounds):
                inproc.append(in_process_cpu(local, users, args.k, args.http_requests))
                server.append(server_cpu(root, settings, users, args.k, args.http_seconds))
    cpu_in = Row.from_samples(f"{tag} in-process service call CPU/request",
                              [1e3 * r["cpu_per_request_s"] for r in inproc],
                              "ms CPU")
    cpu_ret = Row.from_samples(f"{tag} in-process retrieval only CPU/request",
                               [1e3 * r["retrieval_cpu_per_request_s"] for r in inproc], "ms CPU")
    cpu_srv = Row.from_samples(f"{tag} HTTP GET /v1/recommend server CPU/request",
                               [1e3 * run["cpu_per_request_s"] for s in server for run in s["runs"]],
                               "ms CPU").against(cpu_in)
    rps = Row.from_samples(f"{tag} HTTP req/s (1 worker, 8 conns, server pinned to a core)",
                           [run["rps"] for s in server for run in s["runs"]], "requests/s")
    half = [h for s in server for h in s["half_rate"]]
    p50 = Row.from_samples(f"{tag} HTTP p50 at ~half the saturating rate", [h["p50_ms"] for h in half], "ms",
                           note=f"{statistics.median(h['rps'] for h in half):.0f} req/s achieved")
    p99 = Row.from_samples(f"{tag} HTTP p99 at ~half the saturating rate", [h["p99_ms"] for h in half], "ms")
    # issue 13's target is at 10^6 items: below that the fixed HTTP cost (~0.1 ms) is a larger share of a
    # cheaper request, and the ratio is reported without a verdict
    targets = {} if snapshot.n_items < 1_000_000 else {
        f"{tag} server CPU/request <= 1.3x the in-process service call": bool(cpu_srv.ratio is not None
                                                                              and cpu_srv.ratio <= 1.3)}
    return {"rows": [cpu_in, cpu_ret, cpu_srv, rps, p50, p99], "rps": rps,
            "targets": targets,
            "notes": [f"{tag}: LMDB written in {write_s:.1f}s; server pinned to one core: "
                      f"{all(s['pinned'] for s in server)}; query encoder re-published "
                      f"{published['versions']} times (every {interval:g} s, as the learner does: the "
                      "server recomputes each cached encoder input once per version)"]}


def _query_models(args: argparse.Namespace, wl: Workload) -> list[str]:
    """Query models timed over HTTP: the workload's encoder, the mean-pooled query, or both."""
    if wl.snapshot.query_model is None:
        return ["mean"]
    return ["encoder", "mean"] if args.query_model == "both" else [args.query_model]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", default="100000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--workloads", default="learned,synthetic",
                        help="comma-separated: learned (stream-trained, held-out users), synthetic (code buckets)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--queries", type=int, default=300, help="in-process queries per retriever")
    parser.add_argument("--events-per-item", type=float, default=1.0,
                        help="stream length of the learned workload, in events per catalogue item")
    parser.add_argument("--cache-dir", default="var/bench-cache", help="where trained workloads are kept ('' = none)")
    parser.add_argument("--no-churn", action="store_true", help="skip the 1%% churn measurements")
    parser.add_argument("--interleave", type=int, default=3,
                        help="rounds in which every tuned retriever answers the queries in turn (the headline QPS)")
    parser.add_argument("--http-seconds", type=int, default=5, help="wrk duration per HTTP measurement")
    parser.add_argument("--http-rounds", type=int, default=2, help="alternations of in-process and server runs")
    parser.add_argument("--http-requests", type=int, default=2000, help="in-process service calls per round")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP end-to-end part")
    parser.add_argument("--republish-s", type=float, default=None,
                        help="HTTP part: publish the encoder's weights under a new version this often while "
                             "measuring (default learner.model_publish_interval_s; 0 = never)")
    parser.add_argument("--query-model", choices=["encoder", "mean", "both"], default="encoder",
                        help="HTTP part: answer with the learned encoder, the mean-pooled history, or time both")


def _table(res: dict, k: int) -> dict:
    """The comparison as a table: one line per retriever, ratios to the learned index."""
    lq = res["learned_qps"]
    header = ["retriever", f"recall@{k}", "QPS", "vs learned", "search param", "build s", "bytes/item",
              "1% churn s", "churn how"]
    rows = [["learned index", round(res["learned_recall"], 4), round(lq), 1.0,
             f"{res['learned_candidates']:.0f} candidates", round(res["learned_build_s"], 2),
             round(res["learned_bytes_per_item"]), _r(res.get("learned_churn_s")), "LMDB writer, in place"]]
    for name, p in res["peers"].items():
        param = f"{p['param']}={p['value']}"
        if p["secondary_name"]:
            param += f", {p['secondary_name']}={p['secondary']}"
        rows.append([PEERS[name].name + ("" if p["reached"] else " (recall NOT reached)"), round(p["recall"], 4),
                     round(p["qps"]), round(p["qps"] / lq, 3), param, round(p["build_s"], 2),
                     round(p["bytes_per_item"]), _r(p.get("churn_s")), p.get("churn_how", "-")])
    rows.append(["exact (numpy)", 1.0, round(res["exact_qps"]), round(res["exact_qps"] / lq, 3),
                 "-", "-", "-", "-", "-"])
    return {"title": f"{res['workload']} workload, {res['items']:,} items, {res['queries']} queries, one thread",
            "header": header, "rows": rows}


def _r(value: float | None) -> float | str:
    return "-" if value is None else round(value, 3)


def run(args: argparse.Namespace, settings) -> dict:
    sizes = [int(float(s)) for s in args.items.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    peers, notes = available([p for p in args.peers.split(",") if p])
    rows: list[Row] = []
    targets: dict[str, bool] = {}
    tables: list[dict] = []
    comparisons: list[dict] = []
    for n in sizes:
        for name in workloads:
            t0 = time.perf_counter()
            if name == "learned":
                wl = learned_workload(n, settings, args.k, args.queries, args.events_per_item,
                                      Path(args.cache_dir) if args.cache_dir else None)
            elif name == "synthetic":
                wl = synthetic_workload(n, settings, args.k, args.queries)
            else:
                raise SystemExit(f"unknown workload {name!r}")
            log.info("%s n=%d workload ready in %.1fs", name, n, time.perf_counter() - t0)
            notes += wl.notes
            res = compare(wl, settings, args.k, peers, churn=not args.no_churn, interleave=args.interleave)
            tag = f"{name} {n // 1000}k"
            learned_row = Row(f"{tag} learned qps", res["learned_qps"], "queries/s",
                              note=f"recall@{args.k} {res['learned_recall']:.4f}, "
                                   f"{res['learned_candidates']:.0f} candidates")
            rows += [Row(f"{tag} learned recall@{args.k}", res["learned_recall"], "ratio"), learned_row,
                     Row(f"{tag} exact qps", res["exact_qps"], "queries/s").against(learned_row)]
            for peer, p in res["peers"].items():
                rows.append(Row(f"{tag} {peer} qps", p["qps"], "queries/s",
                                note=f"recall {p['recall']:.4f} at {p['param']}={p['value']}"
                                     + ("" if p["reached"] else " (target recall not reached)")).against(learned_row))
            if res["ratio_learned_over_best_peer"] is not None:
                rows.append(Row(f"{tag} learned / best peer qps", res["ratio_learned_over_best_peer"], "ratio",
                                note=f"best peer: {res['best_peer']}"))
                targets[f"{tag}: learned >= 1.6x the best peer's qps at equal recall"] = \
                    res["ratio_learned_over_best_peer"] >= 1.6
            tables.append(_table(res, args.k))
            comparisons.append({key: value for key, value in res.items() if key not in ("learned_answers", "truth")}
                               | {"peers": {p: {key: v for key, v in r.items() if key != "answers"}
                                            for p, r in res["peers"].items()}})
            if res.get("learned_lmdb_write_s") is not None:
                notes.append(f"{tag}: LMDB index written + full pass in {res['learned_lmdb_write_s']:.1f}s; "
                             "churn batch "
                             f"= {res['churn_items']} items (1/2 re-embedded, 1/4 deleted, 1/4 new)")
            if not args.no_http:
                by_model: dict[str, Row] = {}
                for qm in _query_models(args, wl):
                    # "mean": the same catalogue and histories answered with the pre-encoder query (the
                    # recency-weighted mean of the history's vectors): what the encoder costs per request
                    wl_q = wl if qm == "encoder" else dc_replace(
                        wl, name=f"{wl.name} mean-pool", snapshot=dc_replace(wl.snapshot, query_model=None))
                    http = http_end_to_end(wl_q, settings, args)
                    rows += http["rows"]
                    targets.update(http["targets"])
                    notes += http["notes"]
                    by_model[qm] = http["rps"]
                if len(by_model) == 2:
                    enc, mean = by_model["encoder"], by_model["mean"]
                    ratio = enc.median / mean.median if mean.median else float("nan")
                    rows.append(Row(f"{tag} HTTP req/s encoder / mean-pool", ratio, "ratio"))
                    targets[f"{tag}: encoder HTTP req/s >= 0.75x mean-pool (issue 11)"] = ratio >= 0.75
            del wl, res
    out = result("serve", rows, params={"items": sizes, "k": args.k, "queries": args.queries, "workloads": workloads,
                                        "peers": peers}, targets=targets, notes=notes)
    out["tables"] = tables
    out["comparisons"] = comparisons
    return out
