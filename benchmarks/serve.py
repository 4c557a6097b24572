"""``mfli bench serve``: learned index vs hnswlib vs exact in process, then HTTP end to end.

One run, per catalogue size (``--items 100000,1000000``):

1. A synthetic clustered catalogue (d=64, F=3): per facet, items are noisy copies of topic directions,
   a user's history lies in a few topics. RQ codes come from a quick numpy k-means per level (fitted on a
   subsample, then every item assigned), clusters from :mod:`mfli.retrieval.clusters` (split/merge), as
   the indexer's full pass does.
2. In process, over the same embeddings and score: recall@k vs exact and QPS (single queries, one
   thread) for the learned index, exact numpy and hnswlib with ``ef`` raised until its recall reaches the
   learned index's (the paper's comparison: speed at equal recall). Ratio learned / hnsw QPS.
3. HTTP: the catalogue is written to a real LMDB index (the indexer's writer) and users store, a real
   ``mfli serve`` process is started on loopback, and ``wrk`` drives ``GET /v1/recommend`` for random
   users. Install it with ``apt-get install wrk`` (Debian/Ubuntu); without it the HTTP part is skipped
   and the result says so.

Absolute numbers on a shared 2-core machine drift: read the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
from threadpoolctl import threadpool_limits

from mfli.benchmarks.report import Row, result
from mfli.events import InteractionEvent
from mfli.lifecycle import free_port
from mfli.retrieval.base import Query
from mfli.retrieval.exact import ExactRetriever
from mfli.retrieval.hnsw import HnswRetriever
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.query_model import QueryModel
from mfli.retrieval.snapshot import ItemSnapshot

log = logging.getLogger(__name__)


# --- synthetic catalogue ---------------------------------------------------------------------------------
def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 8) -> np.ndarray:
    """Plain Lloyd's k-means on ``x`` (float32[n, d]); returns centroids float32[k, d]."""
    centroids = x[rng.choice(x.shape[0], size=k, replace=False)].copy()
    for _ in range(iters):
        assign = assign_nearest(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        centroids[empty] = x[rng.choice(x.shape[0], size=int(empty.sum()), replace=False)]
    return centroids


def assign_nearest(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.int64)
    c_sq = np.einsum("kd,kd->k", centroids, centroids)
    for start in range(0, x.shape[0], block):
        out[start : start + block] = np.argmin(c_sq[None, :] - 2.0 * (x[start : start + block] @ centroids.T), axis=1)
    return out


def codewords_for(n: int, levels: int) -> int:
    """docs/design.md §Model: M^L ~ items / 32, at least 8."""
    return max(8, int(round((n / 32) ** (1.0 / levels))))


def synthetic_catalogue(n: int, facets: int = 3, dim: int = 64, levels: int = 2, topics: int | None = None,
                        noise: float = 0.7, seed: int = 0, fit_sample: int = 50_000) -> ItemSnapshot:
    """Clustered items with RQ codes; ``item_ids`` are ``"i<row>"``, rows in order of arrival."""
    rng = np.random.default_rng(seed)
    topics = topics or max(8, n // 500)
    m = codewords_for(n, levels)
    vectors = np.empty((n, facets, dim), np.float32)
    codes = np.empty((n, facets, levels), np.int32)
    books = np.empty((facets, levels, m, dim), np.float32)
    item_topic = rng.integers(0, topics, size=n)
    with threadpool_limits(1):
        for f in range(facets):
            centers = rng.normal(size=(topics, dim)).astype(np.float32)
            centers /= np.linalg.norm(centers, axis=1, keepdims=True)
            # Each facet permutes topics differently, so facets disagree about neighbours (multifaceted).
            perm = rng.permutation(topics) if f else np.arange(topics)
            v = centers[perm[item_topic]] + rng.normal(0, noise / np.sqrt(dim), (n, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            vectors[:, f] = v
            residual = v.copy()
            sample = rng.choice(n, size=min(n, fit_sample), replace=False)
            for level in range(levels):
                books[f, level] = _kmeans(residual[sample], m, rng)
                codes[:, f, level] = assign_nearest(residual, books[f, level])
                residual -= books[f, level][codes[:, f, level]]
    prior = (0.3 * np.log1p(rng.pareto(1.5, size=n))).astype(np.float32)
    return ItemSnapshot(item_ids=np.array([f"i{r}" for r in range(n)], dtype=object), vectors=vectors,
                        codes=codes, codebooks=books, prior=prior, live=np.ones(n, bool), version=1)


def _encoder(model) -> QueryModel:
    """A query encoder of the configured shape (random weights: its cost, not its answers, is measured)."""
    return replace(QueryModel.random(model.facets, model.dim, model.history, model.encoder_heads, model.temperature),
                   version=1)


def synthetic_histories(snapshot: ItemSnapshot, users: int, history: int = 50, interests: int = 3,
                        seed: int = 1) -> list[np.ndarray]:
    """Histories of ``history`` rows, drawn around ``interests`` random seed items per user (facet 0
    neighbourhoods), so the index has real structure to exploit."""
    rng = np.random.default_rng(seed)
    n = snapshot.n_items
    keys = snapshot.codes[:, 0, 0].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    starts = np.searchsorted(keys[order], np.arange(snapshot.codewords + 1))
    out = []
    for _ in range(users):
        picks = []
        for seed_row in rng.integers(0, n, size=interests):
            code = keys[seed_row]
            members = order[starts[code] : starts[code + 1]]
            picks.append(rng.choice(members, size=history // interests + 1))
        h = np.concatenate(picks)[:history]
        rng.shuffle(h)
        out.append(h.astype(np.int64))
    return out


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
    users = UsersStore(users_path, history=settings.model.history)
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


def _timed_queries(retriever, queries: list[Query], passes: int = 3) -> tuple[float, list[np.ndarray]]:
    """Median QPS over ``passes`` passes of single queries (one thread), and the last pass's answers."""
    rates, answers = [], []
    for _ in range(passes):
        answers = []
        started = time.perf_counter()
        for q in queries:
            answers.append(retriever.recommend(q).rows)
        rates.append(len(queries) / (time.perf_counter() - started))
    return statistics.median(rates), answers


def _recall(answers: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([np.intersect1d(a, t).size / max(1, t.size) for a, t in zip(answers, truth, strict=True)]))


def in_process(snapshot: ItemSnapshot, settings, k: int, n_queries: int, ef_grid: list[int]) -> dict:
    """Recall@k vs exact and QPS for learned index, exact and hnswlib (ef tuned to the index's recall)."""
    n = snapshot.n_items
    t0 = time.perf_counter()
    view = MemoryIndexView.from_settings(snapshot, settings.index)
    build_index_s = time.perf_counter() - t0
    histories = synthetic_histories(snapshot, n_queries, history=settings.model.history)
    queries = [Query(history=h, k=k, exclude=h) for h in histories]
    params = LearnedIndexParams.from_settings(settings.serve, settings.model)
    out: dict = {"items": n, "build_index_s": build_index_s}
    with threadpool_limits(1):
        exact = ExactRetriever(view, params.history, params.recency_decay)
        out["exact_qps"], truth = _timed_queries(exact, queries[: max(20, n_queries // 5)], passes=1)
        truth = [exact.recommend(q).rows for q in queries]
        learned = LearnedIndexRetriever(view, params)
        out["learned_qps"], answers = _timed_queries(learned, queries)
        out["learned_recall"] = _recall(answers, truth)
        out["learned_candidates"] = float(np.mean([learned.recommend(q).candidates for q in queries[:50]]))
    t0 = time.perf_counter()
    hnsw = HnswRetriever(view, ef=ef_grid[0], m=16, ef_construction=100, threads=2,
                         history=params.history, recency_decay=params.recency_decay)
    out["build_hnsw_s"] = time.perf_counter() - t0
    hnsw.index.set_num_threads(1)
    with threadpool_limits(1):
        def recall_at(ef: int) -> float:
            hnsw.set_ef(ef)
            recall = _recall([hnsw.recommend(q).rows for q in queries], truth)
            log.info("n=%d hnsw ef=%d recall@%d=%.4f (learned %.4f)", n, ef, k, recall, out["learned_recall"])
            return recall

        # Grid up to the first ef reaching the learned index's recall, then bisect between it and the
        # previous grid value: hnsw gets the smallest (fastest) ef that matches, not a coarse overshoot.
        below, chosen = None, None
        for ef in ef_grid:
            recall = recall_at(ef)
            if recall >= out["learned_recall"]:
                chosen = (ef, recall)
                break
            below, chosen = ef, (ef, recall)
        if below is not None and chosen[1] >= out["learned_recall"]:
            lo, hi = below, chosen[0]
            while hi - lo > max(2, lo // 32):
                mid = (lo + hi) // 2
                recall = recall_at(mid)
                if recall >= out["learned_recall"]:
                    hi, chosen = mid, (mid, recall)
                else:
                    lo = mid
        hnsw.set_ef(chosen[0])
        out["hnsw_qps"], _ = _timed_queries(hnsw, queries)
    out["hnsw_ef"], out["hnsw_recall"] = chosen
    out["hnsw_reached_recall"] = chosen[1] >= out["learned_recall"]
    out["ratio_learned_over_hnsw"] = out["learned_qps"] / out["hnsw_qps"]
    log.info("n=%d in-process: %s", n, out)
    return out


_WRK_SCRIPT = """
math.randomseed(1)
request = function()
  return wrk.format("GET", "/v1/recommend?user_id=u" .. math.random(0, %d) .. "&k=%d")
end
"""


def _parse_wrk(text: str) -> dict[str, float]:
    """req/s and latency percentiles (ms) from ``wrk --latency`` output."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            out["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            value = parts[1]
            unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
            out[f"p{parts[0][:-1]}_ms"] = float(value[: -len(unit)]) * units[unit]
        elif "Non-2xx" in line:
            out["non_2xx"] = float(parts[-1])
    return out


def start_server(root: Path, settings, *extra_args: str) -> tuple[subprocess.Popen, str]:
    """A real one-worker ``mfli serve`` on a free loopback port over ``root``'s index and users store,
    returned once ``/readyz`` answers 200 (it is killed if it dies or is not ready within 120 s)."""
    port = free_port()
    env = {**os.environ, "MFLI_INDEX__PATH": str(root / "index.lmdb"),
           "MFLI_LEARNER__USERS_PATH": str(root / "users.lmdb"),
           "MFLI_INDEX__MAP_SIZE": str(settings.index.map_size), "MFLI_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "mfli.orchestration.cli", "serve", "--workers", "1",
                             "--port", str(port), *extra_args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"mfli serve did not become ready: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


def http_end_to_end(snapshot: ItemSnapshot, settings, args: argparse.Namespace) -> dict:
    """Real LMDB + real ``mfli serve`` (one worker) + wrk on loopback: req/s and p50/p99."""
    tag = f"{snapshot.n_items // 1000}k" + ("" if snapshot.query_model is not None else " mean-pool")
    if shutil.which("wrk") is None:
        return {"rows": [], "targets": {},
                "notes": [f"{tag}: HTTP part skipped: wrk not installed (apt-get install wrk)"]}
    users = 2000
    with tempfile.TemporaryDirectory(prefix="mfli-bench-serve-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_lmdb(snapshot, root / "index.lmdb", root / "users.lmdb",
                   synthetic_histories(snapshot, users, history=settings.model.history, seed=7), settings)
        write_s = time.perf_counter() - t0
        proc, base = start_server(root, settings, "--no-monitor")
        try:
            script = root / "recommend.lua"
            script.write_text(_WRK_SCRIPT % (users - 1, args.k))
            # warm-up (page cache, first-touch allocations), then the measured runs
            subprocess.run(["wrk", "-t1", f"-c{args.connections}", "-d2s", "-s", str(script), base],
                           capture_output=True)
            def measure(connections: int) -> list[dict]:
                out = []
                for _ in range(3):
                    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(args.http_seconds)}s",
                                           "--latency", "-s", str(script), base],
                                          capture_output=True, text=True, check=True)
                    out.append(_parse_wrk(done.stdout))
                    log.info("%s wrk -c%d: %s", tag, connections, out[-1])
                return out

            runs = measure(args.connections)  # saturated: the throughput one worker sustains
            light = measure(args.light_connections)  # a few clients: latency without queueing behind others
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rps = Row.from_samples(f"{tag} HTTP /v1/recommend req/s (1 worker, {args.connections} conns)",
                           [r["rps"] for r in runs], "requests/s")
    p50 = Row.from_samples(f"{tag} HTTP /v1/recommend p50", [r["p50_ms"] for r in runs], "ms")
    p99 = Row.from_samples(f"{tag} HTTP /v1/recommend p99", [r["p99_ms"] for r in runs], "ms")
    light_rps = Row.from_samples(f"{tag} HTTP /v1/recommend req/s ({args.light_connections} conns)",
                                 [r["rps"] for r in light], "requests/s")
    light_p50 = Row.from_samples(f"{tag} HTTP /v1/recommend p50 ({args.light_connections} conns)",
                                 [r["p50_ms"] for r in light], "ms")
    light_p99 = Row.from_samples(f"{tag} HTTP /v1/recommend p99 ({args.light_connections} conns)",
                                 [r["p99_ms"] for r in light], "ms")
    bad = sum(r.get("non_2xx", 0) for r in runs + light)
    return {"rows": [rps, p50, p99, light_rps, light_p50, light_p99],
            "targets": {f"{tag} HTTP p99 <= 10 ms at >= 5k req/s (one worker)":
                        p99.median <= 10 and rps.median >= 5000},
            "notes": [f"{tag}: LMDB written in {write_s:.1f}s; non-2xx answers: {bad:.0f}"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", default="100000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--queries", type=int, default=300, help="in-process queries per retriever")
    parser.add_argument("--ef", default="10,16,24,32,48,64,96,128,192,256,384,512,768,1024",
                        help="hnswlib ef values tried in order until recall reaches the learned index's")
    parser.add_argument("--http-seconds", type=int, default=10, help="wrk duration per HTTP measurement")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (saturating run)")
    parser.add_argument("--light-connections", type=int, default=4, help="wrk connections (latency run)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP end-to-end part")
    parser.add_argument("--query-model", choices=["encoder", "mean", "both"], default="encoder",
                        help="publish a query encoder into the index (the server runs it per request, as in "
                             "production), leave none (mean pooling, the pre-encoder query), or measure both")


def run(args: argparse.Namespace, settings) -> dict:
    sizes = [int(float(s)) for s in args.items.split(",") if s]
    ef_grid = [int(e) for e in args.ef.split(",")]
    rows: list[Row] = []
    targets: dict[str, bool] = {}
    notes: list[str] = []
    models = ["encoder", "mean"] if args.query_model == "both" else [args.query_model]
    for n in sizes:
        t0 = time.perf_counter()
        base_snap = synthetic_catalogue(n, facets=settings.model.facets, dim=settings.model.dim,
                                        levels=settings.model.levels)
        log.info("n=%d catalogue built in %.1fs (M=%d)", n, time.perf_counter() - t0, base_snap.codewords)
        for qm in models:
            snap = replace(base_snap, query_model=_encoder(settings.model)) if qm == "encoder" else base_snap
            res = in_process(snap, settings, args.k, args.queries, ef_grid)
            tag = f"{n // 1000}k" + ("" if qm == "encoder" else " mean-pool")
            hnsw = Row(f"{tag} hnsw qps (ef={res['hnsw_ef']})", res["hnsw_qps"], "queries/s")
            rows += [
                Row(f"{tag} learned recall@{args.k}", res["learned_recall"], "ratio"),
                Row(f"{tag} hnsw recall@{args.k} (ef={res['hnsw_ef']})", res["hnsw_recall"], "ratio"),
                Row(f"{tag} exact qps", res["exact_qps"], "queries/s"),
                hnsw,
                Row(f"{tag} learned qps", res["learned_qps"], "queries/s",
                    note=f"{res['learned_candidates']:.0f} candidates/query").against(hnsw),
            ]
            targets[f"{tag} learned >= 1.6x hnsw qps at >= recall"] = bool(
                res["ratio_learned_over_hnsw"] >= 1.6 and res["hnsw_reached_recall"] is False
                or res["ratio_learned_over_hnsw"] >= 1.6 and res["learned_recall"] >= res["hnsw_recall"] - 0.005
            )
            notes.append(f"{tag}: index build {res['build_index_s']:.1f}s, hnsw build {res['build_hnsw_s']:.1f}s")
            if not args.no_http:
                http = http_end_to_end(snap, settings, args)
                rows += http["rows"]
                targets.update(http["targets"])
                notes += http["notes"]
            del snap
        del base_snap
    return result("serve", rows, params={"items": sizes, "k": args.k, "queries": args.queries}, targets=targets,
                  notes=notes)
