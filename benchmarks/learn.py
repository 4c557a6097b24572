"""``mfli bench learn``: learner training throughput, single pass over ml-1m events.

Method: each run builds a fresh :class:`~mfli.learner.learner.MFLILearner` (catalogue upserted first,
as in ``mfli eval``) and streams the first ``--events`` ratings of the dataset in time order through
``learn_columns`` in micro-batches of ``--batch`` (the ingest batch size by default), one pass. The
clock covers only the learner (the log is loaded before it starts). Reported: median events/s over
``--runs`` runs and the step time broken down by phase (query pooling, forward, backward, optimiser,
quantisation, bookkeeping) in microseconds per event. Threads: ``learner.threads`` (what ``mfli learn`` runs
with) unless ``--threads`` says otherwise.
Target >= 5k events/s with the sequence encoder, full softmax and replay (issue 11; the mean-pooled
query of before did 21k).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mfli.learner's docstring: must precede torch

import torch  # noqa: E402

from mfli.config import Settings
from mfli.events import ItemEvent
from mfli.learner.learner import MFLILearner
from mfli.learner.state import PHASES
from mfli.sources.movielens import load_movielens

from . import learn_group
from .report import Row, result

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="/work/shared/data/ml-1m", help="MovieLens directory")
    parser.add_argument("--events", type=int, default=0, help="events per run (0 = the whole log)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="events per step (0 = ingest.batch_size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = learner.threads)")
    parser.add_argument("--workers", default="", help="e.g. 1,2: the data-parallel group at these sizes instead "
                        "(benchmarks/learn_group.py: events/s, CPU per 1k events, collectives, bytes/event, "
                        "an 8-rank projection); one run per size")
    parser.add_argument("--quality-cut", type=int, default=0, help="with --workers: also score events from this "
                        "position on before learning them and compare each size with 1 rank (paired bootstrap)")


def one_run(settings: Settings, data, n: int, batch: int) -> tuple[float, dict[str, float]]:
    """Seconds for one pass over ``n`` events, and seconds per phase."""
    learner = MFLILearner(settings.model)
    learner.upsert_items([ItemEvent(item_id=i, tags=t) for i, t in data.item_tags.items()])
    phases = dict.fromkeys(PHASES, 0.0)
    users, items, values, ts = data.users[:n], data.items[:n], data.values[:n], data.ts[:n]
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        st = learner.learn_columns(users[s:s + batch], items[s:s + batch], values[s:s + batch], ts[s:s + batch])
        for k, v in st.seconds.items():
            phases[k] += v
    return time.perf_counter() - t0, phases


def run_workers(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """``--workers 1,2``: see benchmarks/learn_group.py."""
    sizes = [int(w) for w in args.workers.split(",")]
    if 1 not in sizes:
        sizes = [1, *sizes]
    n = args.events or 100_000
    batch = args.batch or settings.ingest.batch_size
    threads = max(1, args.threads // max(sizes)) if args.threads else 1
    by_size, raw = {}, {}
    for w in sizes:
        raw[w] = learn_group.run_group(w, args.dataset, n, batch, args.quality_cut, threads)
        by_size[w] = learn_group.summarise(w, raw[w], n, batch)
        log.info("%d worker(s): %.0f events/s, %.2f CPU-s per 1k events, collectives %s s, %.0f bytes/event", w,
                 by_size[w]["events_per_s"], by_size[w]["cpu_s_per_1k_events"],
                 by_size[w]["collective_s_per_rank"], by_size[w]["bytes_per_event"])
    biggest = max(sizes)
    # an ensemble group (MFLI_MODEL__MEMBERS) does K models' work, so a data-parallel projection says nothing
    projection = learn_group.project(by_size[1], by_size[biggest], 8) \
        if biggest > 1 and settings.model.members == 1 else {}
    quality = {w: learn_group.compare_quality(raw[1], raw[w]) for w in sizes if w > 1} if args.quality_cut else {}
    rows = [Row.from_samples(f"{w} worker(s): events per second", [by_size[w]["events_per_s"]], "events/s")
            for w in sizes]
    rows += [Row.from_samples(f"{w} worker(s): CPU per 1k events", [by_size[w]["cpu_s_per_1k_events"]], "s")
             for w in sizes]
    rows += [Row.from_samples(f"{w} worker(s): collective share of wall time", [by_size[w]["collective_share"]],
                              "ratio") for w in sizes]
    rows += [Row.from_samples(f"{w} worker(s): collective payload per event", [by_size[w]["bytes_per_event"]],
                              "bytes") for w in sizes]
    if projection:
        rows.append(Row.from_samples("8 workers on 8 machines (projected)", [projection["events_per_s"]], "events/s"))
    targets = {">= 5k events/s": by_size[biggest]["events_per_s"] >= 5_000} if settings.model.members > 1 else {}
    return result(
        "learn-workers", rows, targets=targets,
        params={"dataset": args.dataset, "events": n, "batch": batch, "threads_per_rank": threads,
                "workers": sizes, "quality_cut": args.quality_cut},
        notes=[json.dumps({"by_size": by_size, "projection_8": projection, "quality": quality})],
    )


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    if not args.workers and settings.model.members > 1:
        # an ensemble learns as `mfli learn` runs it: one rank per member (learner/members.py), beside one
        # member alone in the same harness
        args.workers = str(settings.model.members)
    if args.workers:
        return run_workers(args, settings)
    args.threads = args.threads or settings.learner.threads
    torch.set_num_threads(args.threads)
    data = load_movielens(args.dataset)
    n = len(data) if args.events <= 0 else min(args.events, len(data))
    batch = args.batch or settings.ingest.batch_size
    rates: list[float] = []
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    for r in range(args.runs):
        seconds, phases = one_run(settings, data, n, batch)
        rates.append(n / seconds)
        for p, v in phases.items():
            per_phase[p].append(v / n * 1e6)
        log.info("run %d: %.0f events/s", r + 1, n / seconds)
    rows = [Row.from_samples("events per second", rates, "events/s")]
    rows += [Row.from_samples(f"step time: {p}", per_phase[p], "us/event") for p in PHASES]
    median = statistics.median(rates)
    return result(
        "learn", rows,
        params={"dataset": data.name, "events": n, "batch": batch, "runs": args.runs, "threads": args.threads,
                "facets": settings.model.facets, "dim": settings.model.dim, "negatives": settings.model.negatives},
        targets={">= 5k events/s": median >= 5_000},
        notes=["single pass, fresh learner per run; phases are summed StepStats.seconds"],
    )
