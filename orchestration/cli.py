"""The single ``mfli`` entry point.

Each subcommand lives in the module that implements it and exposes two functions:
``add_arguments(parser)`` and ``run(args, settings) -> int`` (exit status). The CLI imports only the
module of the subcommand being run (``mfli --help`` imports none), so ``mfli serve`` never imports
torch: the learner's and the evaluation's modules are not touched on that path
(``tests/test_structure.py`` checks it in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from mfli.config import Settings, load_settings

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("mfli.orchestration.broker", "run the embedded Kafka-protocol test broker in the foreground"),
    "produce": ("mfli.orchestration.produce",
                "replay MovieLens files, an event log or the synthetic stream into Kafka"),
    "learn": ("mfli.learner.process", "consume events from Kafka and train the MFLI model continuously"),
    "index": ("mfli.indexer.process", "apply learner deltas to the LMDB index; `index check` verifies it"),
    "serve": ("mfli.server.process", "answer retrieval queries over HTTP from the live LMDB index"),
    "demo": ("mfli.orchestration.demo", "run everything on an embedded broker with synthetic (or MovieLens) data"),
    "eval": ("mfli.evaluation.run", "streaming and static evaluation with anchors, on MovieLens or an event log"),
    "bench": ("mfli.benchmarks.cli", "benchmarks: ingest, learn, freshness, index, serve"),
    "chaos": ("mfli.orchestration.chaos", "fault-injection run: SIGKILL processes mid-stream, prove nothing is lost"),
}


def _module(name: str) -> ModuleType | None:
    module_path = COMMANDS[name][0]
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and module_path.startswith(exc.name):
            return None
        raise


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (None if there is none or it is unknown), found without
    importing any command module."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level")
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(list(argv))
    return known.command if known.command in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; only ``command``'s own options are added (its module is imported for that)."""
    parser = argparse.ArgumentParser(prog="mfli", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (env MFLI_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _module(name)
            if module is not None and hasattr(module, "add_arguments"):
                module.add_arguments(cmd)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed with the options of the subcommand it names."""
    return build_parser(command_of(argv)).parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
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
