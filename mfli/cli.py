"""The single ``mfli`` entry point.

Each subcommand lives in the module of the process it runs and exposes two functions:
``add_arguments(parser)`` and ``run(args, settings) -> int`` (exit status). The CLI imports a module
only when its subcommand is used, so ``mfli serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mfli.config import Settings, load_settings

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("mfli.kafka.broker", "run the embedded Kafka-protocol test broker in the foreground"),
    "produce": ("mfli.sources.produce", "replay MovieLens files, an event log or the synthetic stream into Kafka"),
    "learn": ("mfli.learner.process", "consume events from Kafka and train the MFLI model continuously"),
    "index": ("mfli.indexer.process", "apply learner deltas to the LMDB index; `index check` verifies it"),
    "serve": ("mfli.server.process", "answer retrieval queries over HTTP from the live LMDB index"),
    "demo": ("mfli.demo", "run everything on an embedded broker with synthetic (or MovieLens) data"),
    "eval": ("mfli.evaluation.run", "streaming and static evaluation with anchors, on MovieLens or an event log"),
    "bench": ("mfli.benchmarks.cli", "benchmarks: ingest, learn, freshness, index, serve"),
    "chaos": ("mfli.chaos", "fault-injection run: SIGKILL processes mid-stream, prove nothing is lost"),
}


def _module(name: str):
    module_path = COMMANDS[name][0]
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and module_path.startswith(exc.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfli", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (env MFLI_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module = _module(name)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: Settings = load_settings()
    level = args.log_level or settings.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = _module(args.command)
    if module is None or not hasattr(module, "run"):
        logging.getLogger("mfli").error("`mfli %s` is not built yet", args.command)
        return 2
    return int(module.run(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
