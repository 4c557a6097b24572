"""``mfli bench learn --workers 1,2``: the data-parallel learner group's throughput, communication and
quality against one rank (issue 14).

Method: for each group size N, N rank processes join a gloo group (file rendezvous) and stream the first
``--events`` ml-1m ratings in time order. Global micro-batches of ``--batch`` events are split by user
(``crc32(user) % N``, as the keyed events topic splits them by partition), so every N trains with the
same global batch and the same user → rank ownership as ``mfli learn --workers N``. The clock covers the
steps only (each rank loads the log first). Reported per N: events/s (events / slowest rank's wall
time), CPU-seconds per 1k events (all ranks' process CPU), seconds in collectives per rank and payload
bytes per event (every rank's contribution summed, by kind).

With ``--quality-cut C`` every rank also scores each of its events at positions >= C *before* learning it
(the streaming protocol of evaluation/prequential.py, exact scorer: the user's window before the event,
earlier items excluded, rank = items scored strictly above the target) and the result compares N ranks
with 1 rank by the paired user bootstrap (evaluation/bootstrap.py) on the same events.

The 8-rank projection assumes 8 machines on a 10 Gbit/s network: per step, compute falls as 1/N (the
measured CPU per event of one rank), the all-gathered rows grow as (N-1) x one rank's measured payload
per step, the dense all-reduce moves 2(N-1)/N of its measured size (ring), plus a latency per collective.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BANDWIDTH_BYTES_S = 1.25e9  # 10 Gbit/s
LATENCY_S = 100e-6  # per collective and hop, commodity Ethernet + gloo


def owner(users: np.ndarray, world: int) -> np.ndarray:
    return np.fromiter((zlib.crc32(u.encode()) % world for u in users.tolist()), np.int64, len(users))


def rank_main(rank: int, world: int, init: str, dataset: str, n: int, batch: int, cut: int, threads: int,
              out: str) -> None:
    """One rank of the benchmark (run as ``python -m mfli.benchmarks.learn_group ...``)."""
    import torch

    from mfli.config import load_settings
    from mfli.evaluation.prequential import _score_batch
    from mfli.events import ItemEvent
    from mfli.learner.distributed import DistributedLearner, init_group, leave_group
    from mfli.learner.members import MemberLearner
    from mfli.sources.movielens import load_movielens

    torch.set_num_threads(threads)
    settings = load_settings()
    data = load_movielens(dataset)
    users, items, values, ts = data.users[:n], data.items[:n], data.values[:n], data.ts[:n]
    mine = owner(users, world) == rank
    init_group("gloo", rank, world, init, timeout_s=600)
    # MFLI_MODEL__MEMBERS=N with --workers N: the ensemble group instead (learner/members.py), each rank one
    # member learning every rank's events; events/s is then the ensemble's (every member learned all n)
    model = settings.model
    if model.members > 1 and world != model.members:  # the same-harness baseline: one member alone
        model = model.model_copy(update={"members": 1})
    learner = MemberLearner(model, rank, world) if model.members > 1 else DistributedLearner(model, rank, world)
    # the catalogue first, as `mfli eval` does; identical on every rank (same order, same generator)
    learner.upsert_items([ItemEvent(item_id=i, tags=t) for i, t in data.item_tags.items()])
    seen: dict[str, set[int]] = {}
    positions: list[int] = []
    scored_users: list[str] = []
    ranks: dict[str, list[int]] = {"exact": []}
    scoring = scoring_cpu = 0.0
    torch.distributed.barrier()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        sl = np.flatnonzero(mine[start:start + batch]) + start
        u, it = users[sl], items[sl]
        if cut and start + batch > cut and len(sl):
            t, c = time.perf_counter(), time.process_time()
            rows_u = learner.users.rows_for(u.tolist())
            rows_i = np.asarray([learner.items.ids.get(x) if learner.items.ids.get(x) is not None else -1
                                 for x in it.tolist()], np.int64)
            win, win_ts, _, _ = learner.users.advance_windows(rows_u, np.maximum(rows_i, 0), ts[sl], commit=False)
            win, win_ts = learner.users.keep_only(win, win_ts, learner.items.live[np.maximum(win, 0)])
            idx, excl, running = [], [], {}
            for j, (uu, ii) in enumerate(zip(u.tolist(), rows_i.tolist(), strict=True)):
                if sl[j] >= cut and ii >= 0 and (uu in seen or uu in running):
                    rows = seen.get(uu, set()) | running.get(uu, set())
                    rows.discard(ii)
                    idx.append(j)
                    excl.append(np.fromiter(rows, np.int64, len(rows)))
                running.setdefault(uu, set()).add(ii)
            if idx:
                _score_batch(learner, None, settings, np.asarray(idx), rows_i, win, win_ts, excl, 100,  # type: ignore[arg-type]
                             ranks)
                positions.extend(sl[idx].tolist())
                scored_users.extend(u[idx].tolist())
            scoring += time.perf_counter() - t
            scoring_cpu += time.process_time() - c
        learner.learn_group(u.tolist(), it.tolist(), values[sl], ts[sl])
        for uu, ii in zip(u.tolist(), it.tolist(), strict=True):
            seen.setdefault(uu, set()).add(learner.items.ids.get(ii))
    wall, cpu = time.perf_counter() - wall0 - scoring, time.process_time() - cpu0 - scoring_cpu
    comm = learner.sync.comm
    Path(out).write_text(json.dumps({
        "rank": rank, "events": int(mine.sum()), "wall_s": wall, "cpu_s": cpu, "scoring_s": scoring,
        "collective_s": comm.seconds, "bytes_sent": comm.bytes_sent, "per_kind_s": comm.per_kind,
        "bytes_per_kind": comm.bytes_per_kind, "steps": learner.step,
        "positions": positions, "users": scored_users, "ranks": ranks["exact"]}))
    leave_group()


def run_group(world: int, dataset: str, n: int, batch: int, cut: int, threads: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mfli-bench-group-") as tmp:
        init = f"file://{tmp}/init"
        outs = [f"{tmp}/rank{r}.json" for r in range(world)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs = [subprocess.Popen([sys.executable, "-m", "mfli.benchmarks.learn_group", str(r), str(world), init,
                                   dataset, str(n), str(batch), str(cut), str(threads), outs[r]], env=env)
                 for r in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"benchmark ranks exited with {codes}")
        return [json.loads(Path(o).read_text()) for o in outs]


def summarise(world: int, ranks: list[dict[str, Any]], n: int, batch: int) -> dict[str, Any]:
    wall = max(r["wall_s"] for r in ranks)
    steps = max(r["steps"] for r in ranks)
    kinds: dict[str, int] = {}
    for r in ranks:
        for k, v in r["bytes_per_kind"].items():
            kinds[k] = kinds.get(k, 0) + v
    return {
        "workers": world, "events": n, "batch": batch, "steps": steps,
        "events_per_s": n / wall, "cpu_s_per_1k_events": sum(r["cpu_s"] for r in ranks) / n * 1000,
        "collective_s_per_rank": [round(r["collective_s"], 3) for r in ranks],
        "collective_share": max(r["collective_s"] for r in ranks) / wall,
        "bytes_per_event": sum(r["bytes_sent"] for r in ranks) / n,
        "bytes_per_event_by_kind": {k: v / n for k, v in kinds.items()},
        "bytes_per_rank_step": {k: v / world / max(steps, 1) for k, v in kinds.items()},
        "events_per_rank": [r["events"] for r in ranks],
    }


def project(one: dict[str, Any], measured: dict[str, Any], world: int) -> dict[str, Any]:
    """Events/s of ``world`` ranks on as many machines, from the one-rank compute per event and the
    measured payload per rank and step of a group (see the module docstring for the model)."""
    compute_per_event = one["cpu_s_per_1k_events"] / 1000
    batch = measured["batch"]
    per_step = measured["bytes_per_rank_step"]
    rows = per_step.get("rows", 0.0) + per_step.get("meta", 0.0) + per_step.get("sizes", 0.0)
    dense = per_step.get("dense", 0.0)
    received = (world - 1) * rows + 2 * (world - 1) / world * dense
    comm = received / BANDWIDTH_BYTES_S + LATENCY_S * 5 * (world - 1)
    step = compute_per_event * batch / world + comm
    return {"workers": world, "events_per_s": batch / step, "step_s": step, "comm_s_per_step": comm,
            "bytes_received_per_rank_step": received, "assumptions": "compute/N from 1 rank's CPU per event, "
            "10 Gbit/s, 100 us per collective hop, payload per rank and step as measured at 2 ranks"}


def compare_quality(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    from mfli.evaluation.bootstrap import hits_at, paired_bootstrap

    def table(ranks: list[dict[str, Any]]) -> dict[int, tuple[str, int]]:
        return {p: (u, k) for r in ranks for p, u, k in zip(r["positions"], r["users"], r["ranks"], strict=True)}

    a, b = table(other), table(base)
    common = sorted(set(a) & set(b))
    users = np.asarray([a[p][0] for p in common], dtype=object)
    ra = np.asarray([a[p][1] for p in common])
    rb = np.asarray([b[p][1] for p in common])
    out: dict[str, Any] = {"events_scored": len(common), "only_one_side": len(set(a) ^ set(b))}
    for k in (20, 100):
        ha, hb = hits_at(ra, k), hits_at(rb, k)
        out[f"HR@{k}"] = {"group": float(ha.mean()), "one_rank": float(hb.mean()),
                          **paired_bootstrap(ha, hb, users)}
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    a = sys.argv[1:]
    rank_main(int(a[0]), int(a[1]), a[2], a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]), a[8])
    from mfli.learner.distributed import exit_now

    exit_now(0)  # the result is written and the group left: skip the teardown that can abort under gloo
