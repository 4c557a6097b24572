"""``mfli bench NAME [options] [--json PATH]``: the benchmark dispatcher.

Each benchmark lives in ``benchmarks/<name>.py`` and exposes ``add_arguments(parser)`` and
``run(args, settings) -> dict`` (built with :func:`mfli.benchmarks.report.result`); this module
prints its table and writes ``--json``. A benchmark's options are parsed here, once the benchmark is
chosen, so ``mfli bench serve`` never imports the learner's torch (nor any other benchmark's module).
A benchmark whose module does not exist yet says so and exits non-zero; ``all`` runs every one that
exists and also exits non-zero if any is missing, so ``make bench`` never reports a partial run as a pass.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType
from typing import Any

from mfli.config import Settings

from .report import render, write_json

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, str] = {
    "ingest": "broker -> consumer -> validated batches, vs raw kafka-python consumption",
    "learn": "learner training throughput",
    "freshness": "event time -> visible in the LMDB index",
    "index": "index recall and cost vs exact search and HNSW",
    "serve": "HTTP recommend latency and throughput",
    "load": "server under 2x its sustainable rate for 60 s: errors, p99, RSS growth",
}


def _load(name: str) -> ModuleType | None:
    path = f"mfli.benchmarks.{name}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            return None
        raise
    return module if hasattr(module, "run") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*BENCHMARKS, "all"],
                        help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of the chosen benchmark (see NAME -h)")


def _run_one(name: str, module: ModuleType, argv: list[str], settings: Settings) -> dict[str, Any]:
    sub = argparse.ArgumentParser(prog=f"mfli bench {name}", description=BENCHMARKS[name])
    if hasattr(module, "add_arguments"):
        module.add_arguments(sub)
    args = sub.parse_args(argv)
    res = module.run(args, settings)
    sys.stdout.write(render(res))
    sys.stdout.flush()
    return res


def run(args: argparse.Namespace, settings: Settings) -> int:
    options = list(args.options)
    if "--json" in options:  # accept `mfli bench ingest --runs 3 --json out.json` too
        i = options.index("--json")
        args.json = options[i + 1]
        del options[i:i + 2]
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    results, missing = [], []
    for name in names:
        module = _load(name)
        if module is None:
            log.error("benchmark %r is not built yet", name)
            sys.stderr.write(f"mfli bench {name}: not built yet\n")
            missing.append(name)
            continue
        results.append(_run_one(name, module, options if args.name != "all" else [], settings))
    if args.json and results:
        write_json(args.json, results)
        log.info("wrote %s", args.json)
    failed = [r["name"] for r in results if not all(r.get("targets", {}).values())]
    if failed:
        log.warning("targets missed in: %s", ", ".join(failed))
    return 1 if missing else 0
