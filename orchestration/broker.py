"""``mfli broker``: the embedded Kafka-protocol broker (:class:`mfli.kafka.broker.EmbeddedBroker`) in the
foreground, with the mfli topics created, for running the processes by hand without a Kafka cluster."""

from __future__ import annotations

import argparse
import logging
import sys

from mfli.config import Settings
from mfli.kafka.broker import EmbeddedBroker
from mfli.kafka.clients import ensure_topics
from mfli.lifecycle import stop_on_signals

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-topics", action="store_true", help="do not pre-create the mfli topics")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Foreground broker: prints its bootstrap address, pre-creates the mfli topics, runs until Ctrl-C."""
    stop = stop_on_signals()
    with EmbeddedBroker() as broker:
        k = settings.kafka
        if not args.no_topics:
            ensure_topics(broker.bootstrap, k, [k.events_topic, k.items_topic, k.dlq_topic, k.item_updates_topic])
        sys.stdout.write(f"{broker.bootstrap}\n")
        sys.stdout.flush()
        while not stop.is_set():
            if not broker.alive():
                log.error("tansu exited unexpectedly")
                return 1
            stop.wait(0.5)
    return 0
