"""``mfli produce``: replay MovieLens files, an event log or the synthetic stream into Kafka, in time order.

Items go to ``mfli.items`` keyed by item id and interactions to ``mfli.events`` keyed by user id, so a
user's events stay ordered within one partition (the learner shards by user later, docs/design.md §Delivery). For
MovieLens the whole catalogue is sent first (each item's ``created_ts`` is its first rating); the
synthetic stream interleaves catalogue changes where they happen. An event log (``--events``, see
docs/eventlog.md) is replayed like MovieLens: its ``--catalogue`` first, then its interactions by time.

The producer is idempotent with ``acks='all'``: retries cannot duplicate or reorder. ``--rate`` paces
interactions with an absolute schedule (not per-record sleeps), so the long-run rate is exact even when
single sends stall. ``--invalid-fraction`` swaps that share of interactions for broken records of
every DLQ reason, for demos and fault tests.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from tqdm import tqdm

from mfli import metrics
from mfli.config import Settings
from mfli.events import InteractionEvent, ItemEvent
from mfli.sources import add_source_arguments, load_interactions, spec_from_args

if TYPE_CHECKING:
    from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)

Record = InteractionEvent | ItemEvent
INVALID_KINDS = ("malformed_json", "missing_field", "wrong_type", "non_finite", "oversized", "unknown_event_type")


def corrupt(event: InteractionEvent, kind: str, max_bytes: int) -> bytes:
    """A broken version of ``event`` that the consumers must send to the DLQ for reason ``kind``."""
    raw = event.model_dump_json().encode()
    if kind == "malformed_json":
        return raw[: len(raw) // 2]
    if kind == "missing_field":
        return event.model_dump_json(exclude={"item_id"}).encode()
    if kind == "wrong_type":
        return orjson.dumps(event.model_dump() | {"ts": str(event.ts)})
    if kind == "non_finite":
        return event.model_dump_json(exclude={"value"}).encode()[:-1] + b',"value":NaN}'
    if kind == "oversized":
        return raw[:-1] + b',"pad":"' + b"x" * max_bytes + b'"}'
    if kind == "unknown_event_type":
        return event.model_copy(update={"event_type": "teleport"}).model_dump_json().encode()
    raise ValueError(f"unknown invalid kind {kind!r}; expected one of {INVALID_KINDS}")


def movielens_records(path: str | Path, limit: int | None = None) -> tuple[int, Iterator[Record]]:
    """(number of interactions, records): the catalogue as upserts, then interactions by time."""
    from mfli.sources.movielens import load_movielens

    return interaction_records(load_movielens(path), limit)


def interaction_records(data: Interactions, limit: int | None = None) -> tuple[int, Iterator[Record]]:
    """``movielens_records`` for any loaded source (MovieLens directory or event log)."""
    n = len(data) if limit is None else min(limit, len(data))

    def gen() -> Iterator[Record]:
        yield from data.item_events()
        for i, event in enumerate(data.iter_events()):
            if i >= n:
                return
            yield event

    return n, gen()


def produce_records(
    producer,
    settings: Settings,
    records: Iterable[Record],
    *,
    total: int | None = None,
    rate: float | None = None,
    invalid_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    sent_valid: set[str] | None = None,
) -> Counter[str]:
    """Send ``records`` in order; returns counts by kind (``events``, ``items``, ``invalid:<kind>``).

    ``sent_valid``, if given, collects the ``event_id`` of every event sent intact (not corrupted), so a
    caller can tell exactly which events the pipeline must deliver."""
    if not 0.0 <= invalid_fraction <= 1.0:
        raise ValueError(f"invalid_fraction must be in [0, 1], not {invalid_fraction}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, not {rate}")
    k = settings.kafka
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    started = time.monotonic()
    bar = tqdm(total=total, unit="ev", disable=not progress, file=sys.stderr, mininterval=0.5)
    sent = 0
    try:
        for record in records:
            if isinstance(record, ItemEvent):
                producer.send(k.items_topic, key=record.item_id.encode(), value=record.model_dump_json().encode())
                counts["items"] += 1
                continue
            key = record.user_id.encode()
            if invalid_fraction and rng.random() < invalid_fraction:
                kind = INVALID_KINDS[counts["invalid"] % len(INVALID_KINDS)]
                value = corrupt(record, kind, settings.ingest.max_event_bytes)
                counts["invalid"] += 1
                counts[f"invalid:{kind}"] += 1
            else:
                value = record.model_dump_json().encode()
                counts["events"] += 1
                if sent_valid is not None:
                    sent_valid.add(record.event_id)
            producer.send(k.events_topic, key=key, value=value)
            sent += 1
            if sent % 256 == 0:
                bar.update(256)
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        producer.flush()
    finally:
        bar.update(sent % 256)
        bar.close()
    metrics.PRODUCED.labels(topic=k.events_topic).inc(counts["events"] + counts["invalid"])
    metrics.PRODUCED.labels(topic=k.items_topic).inc(counts["items"])
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--movielens", metavar="DIR", help="MovieLens directory (ml-1m, ml-100k, ml-latest-small)")
    source.add_argument("--synthetic", metavar="N", type=int, help="N synthetic interactions (default source)")
    add_source_arguments(parser, group=source)
    parser.add_argument("--limit", type=int, default=None,
                        help="MovieLens or --events: send at most this many interactions")
    parser.add_argument("--rate", type=float, default=None,
                        help="interactions per second (default: as fast as possible)")
    parser.add_argument("--invalid-fraction", type=float, default=0.0, help="share of interactions sent broken")
    parser.add_argument("--bootstrap", default=None, help="host:port, overrides MFLI_KAFKA__BOOTSTRAP_SERVERS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=1_000, help="synthetic: users")
    parser.add_argument("--items", type=int, default=2_000, help="synthetic: initial catalogue size")
    parser.add_argument("--topics", type=int, default=20, help="synthetic: latent topics")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def warn_unknown_event_types(data: Interactions, accepted: list[str]) -> int:
    """Log (and count) events whose type the consumers will dead-letter, before they are sent."""
    if data.event_types is None:
        return 0
    ok = set(accepted)
    unknown = Counter(t for t in data.event_types.tolist() if t not in ok)
    if unknown:
        log.warning("%d events have an event_type the consumers reject and will dead-letter (%s); "
                    "accepted: %s (MFLI_INGEST__EVENT_TYPES)", sum(unknown.values()),
                    ", ".join(f"{t}: {n}" for t, n in unknown.most_common(5)), ", ".join(accepted))
    return sum(unknown.values())


def run(args: argparse.Namespace, settings: Settings) -> int:
    from mfli.kafka.clients import ensure_topics, make_producer
    from mfli.sources.synthetic import SyntheticStream

    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if args.bootstrap:
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(
            update={"bootstrap_servers": args.bootstrap})})
    k = settings.kafka
    if not k.bootstrap_servers:
        log.error("no broker: pass --bootstrap or set MFLI_KAFKA__BOOTSTRAP_SERVERS (`mfli broker` starts one)")
        return 2
    if spec is not None:
        try:
            data = load_interactions(spec)
        except (ValueError, ImportError, OSError) as exc:  # a bad file or mapping: say why, no traceback
            log.error("%s", exc)
            return 2
        warn_unknown_event_types(data, settings.ingest.event_types)
    ensure_topics(k.bootstrap_servers, k, [k.events_topic, k.items_topic, k.dlq_topic])
    if args.movielens:
        total, records = movielens_records(args.movielens, args.limit)
    elif spec is not None:
        total, records = interaction_records(data, args.limit)
    else:
        total = args.synthetic if args.synthetic is not None else 100_000
        records = SyntheticStream(args.users, args.items, args.topics, seed=args.seed).records(total)
    producer = make_producer(k)
    started = time.monotonic()
    try:
        counts = produce_records(producer, settings, records, total=total, rate=args.rate,
                                 invalid_fraction=args.invalid_fraction, seed=args.seed,
                                 progress=not args.no_progress)
    finally:
        producer.close()
    elapsed = time.monotonic() - started
    sent = counts["events"] + counts["invalid"]
    sys.stdout.write(
        f"produced {counts['events']} events, {counts['invalid']} invalid, {counts['items']} item records "
        f"to {k.bootstrap_servers} in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):,.0f} events/s)\n"
    )
    return 0
