"""``mfli chaos``: crash every process repeatedly mid-stream and prove that nothing was lost.

The run: an embedded broker, a synthetic stream (with invalid records and producer-retry duplicates
mixed in) produced while learner, indexer and server run as real child processes; a killer SIGKILLs
each of them several times at random points and restarts it; a prober keeps asking the server for
recommendations. When the stream is fully consumed everything stops cleanly and the final state is
checked against what was produced:

* **users store** — every valid event applied exactly once (the applied count equals the number of
  distinct valid events) and every user's window equals the last H of their events (recomputed);
* **learner checkpoint** — events learned equals distinct valid events; its stored offsets equal the
  offsets Kafka has committed for the learner group and the topics' high watermarks;
* **index** — the invariant checker passes; applied offsets equal the item-update topic's high
  watermark; every live learner item is indexed with the learner's final vectors;
* **dead letters** — every invalid record is in the DLQ; the prober saw no 5xx.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition

from mfli.config import Settings
from mfli.consumers.dlq import read_dead_letters
from mfli.events import InteractionEvent
from mfli.indexer.check import check_index
from mfli.kafka.broker import EmbeddedBroker
from mfli.kafka.clients import ensure_topics, make_producer
from mfli.kafka.offsets import offset_key, parse_offset_key
from mfli.learner.checkpoint import read_checkpoint
from mfli.learner.process import CHECKPOINT_NAME
from mfli.lifecycle import free_port
from mfli.orchestration.produce import produce_records
from mfli.orchestration.supervisor import Supervisor, exit_on_sigterm, pipeline_env, wait_http
from mfli.sources.synthetic import SyntheticStream
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.users_lmdb import UsersStore

log = logging.getLogger(__name__)

PROCESSES = ("learner", "indexer", "server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000, help="valid events to produce")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per process")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s produced (0 = as fast as possible)")
    parser.add_argument("--invalid-fraction", type=float, default=0.01)
    parser.add_argument("--duplicate-fraction", type=float, default=0.01)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--state-dir", default="var/chaos")
    parser.add_argument("--timeout", type=float, default=1_800.0, help="give up after this many seconds")
    parser.add_argument("--json", default=None, help="write the summary here")


def with_duplicates(records: Iterator, fraction: float, rng: random.Random, counts: Counter) -> Iterator:
    """Re-send a fraction of events a few records later: a producer retry, same event_id, new offset."""
    pending: list[tuple[int, InteractionEvent]] = []
    for i, record in enumerate(records):
        yield record
        if isinstance(record, InteractionEvent) and rng.random() < fraction:
            pending.append((i + rng.randint(1, 200), record))
        while pending and pending[0][0] <= i:
            counts["duplicates_injected"] += 1
            yield pending.pop(0)[1]
    for _, record in pending:
        counts["duplicates_injected"] += 1
        yield record


class Prober(threading.Thread):
    """Asks the server for recommendations all run long; counts answers by status."""

    def __init__(self, base: str, users: list[str]) -> None:
        super().__init__(daemon=True)
        self.base, self.users, self.stop = base, users, threading.Event()
        self.status: Counter = Counter()

    def run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(timeout=2.0) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(f"{self.base}/v1/recommend", params={"user_id": rng.choice(self.users), "k": 10})
                    self.status[str(r.status_code)] += 1
                except httpx.HTTPError:
                    self.status["unreachable"] += 1
                time.sleep(0.02)


def _highwaters(settings: Settings, topics: list[str]) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    out = {}
    try:
        for topic in topics:
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            # ListOffsets(LATEST) is wrong on Tansu (docs/design.md §Kafka and the embedded broker); the
            # fetch response's high watermark is not.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in parts):
                consumer.poll(timeout_ms=200, max_records=1)
                for tp in parts:
                    consumer.seek_to_beginning(tp)
            for tp in parts:
                out[offset_key(topic, tp.partition)] = int(consumer.highwater(tp) or 0)
    finally:
        consumer.close()
    return out


def _committed(settings: Settings, group: str, keys: list[str]) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=group,
                             enable_auto_commit=False)
    try:
        out = {}
        for key in keys:
            out[key] = consumer.committed(parse_offset_key(key)) or 0
        return out
    finally:
        consumer.close()


def run(args: argparse.Namespace, settings: Settings) -> int:
    exit_on_sigterm()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    state = Path(args.state_dir).resolve()
    shutil.rmtree(state, ignore_errors=True)
    (state / "logs").mkdir(parents=True)
    rng = random.Random(args.seed)
    started = time.monotonic()
    summary: dict = {"events_requested": args.events, "kills": {}, "checks": {}}
    with EmbeddedBroker(log_path=state / "logs" / "broker.log") as broker, ExitStack() as cleanup:
        settings = settings.model_copy(deep=True)
        settings.kafka.bootstrap_servers = broker.bootstrap
        # Free ports, not the configured ones: a chaos run must not collide with a demo (or another
        # chaos run) on the same machine, and nothing here needs a well-known port.
        settings.serve.port = free_port()
        settings.kafka.session_timeout_ms, settings.kafka.heartbeat_interval_ms = 3000, 500
        k = settings.kafka
        ensure_topics(broker.bootstrap, k, [k.events_topic, k.items_topic, k.dlq_topic, k.item_updates_topic])
        env = pipeline_env(state, broker.bootstrap, MFLI_LEARNER__CHECKPOINT_INTERVAL_S="3",
                           MFLI_INDEX__FULL_PASS_INTERVAL_S="20", MFLI_SERVE__PORT=str(settings.serve.port),
                           MFLI_LEARNER__METRICS_PORT=str(free_port()), MFLI_INDEX__METRICS_PORT=str(free_port()))
        settings.learner.checkpoint_dir = state / "learner"
        settings.learner.users_path = state / "users.lmdb"
        settings.index.path = state / "index.lmdb"
        sup = Supervisor(state / "logs", env)
        cleanup.callback(sup.stop_all)  # also when a check below raises: no child outlives the run
        for name in PROCESSES:
            sup.add(name, {"learner": ["learn"], "indexer": ["index"], "server": ["serve", "--no-monitor"]}[name])
        sup.start_all()

        # --- produce (in this process, never killed: it is the source of truth) ----------------------
        stream = SyntheticStream(n_users=args.users, n_items=args.items, n_topics=20, seed=args.seed)
        produced: list[InteractionEvent] = []
        sent_valid: set[str] = set()
        counts: Counter = Counter()

        def source() -> Iterator:
            n = 0
            for record in stream:
                if isinstance(record, InteractionEvent):
                    if n >= args.events:
                        return
                    n += 1
                    produced.append(record)
                yield record

        producer = make_producer(k)
        produce_thread = threading.Thread(target=lambda: counts.update(produce_records(
            producer, settings, with_duplicates(source(), args.duplicate_fraction, rng, counts),
            rate=args.rate or None, invalid_fraction=args.invalid_fraction, seed=args.seed, progress=False,
            sent_valid=sent_valid)))
        produce_thread.start()
        base = f"http://127.0.0.1:{settings.serve.port}"
        wait_http(f"{base}/livez", 30)
        prober = Prober(base, [f"u{i}" for i in range(0, args.users, max(1, args.users // 200))])
        prober.start()

        # --- kill schedule: every process `kills` times, in a random order, at random moments --------
        schedule = [name for name in PROCESSES for _ in range(args.kills)]
        rng.shuffle(schedule)
        for name in schedule:
            time.sleep(rng.uniform(2.0, 6.0))
            child = sup.children[name]
            child.kill()
            log.info("SIGKILL %s (kill %d)", name, child.kills)
            time.sleep(rng.uniform(0.2, 1.5))
            child.start()
        produce_thread.join()
        producer.close()
        summary["kills"] = {name: sup.children[name].kills for name in PROCESSES}
        summary["produced"] = {"valid": counts["events"], "invalid": counts["invalid"],
                               "duplicates_injected": counts["duplicates_injected"], "items": counts["items"]}

        # --- drain: wait for the users store to reflect every event offset, then stop cleanly --------
        events_hw = _highwaters(settings, [k.events_topic])
        deadline = started + args.timeout
        while time.monotonic() < deadline:
            for child in sup.crashed():
                log.warning("%s exited (%s); restarting\n%s", child.name, child.proc.returncode, child.log_tail(5))
                child.start()
            store = UsersStore(settings.learner.users_path, history=settings.model.history, readonly=True)
            done = all(store.offsets().get(key, 0) >= hw for key, hw in events_hw.items())
            store.close()
            if done:
                break
            time.sleep(1.0)
        time.sleep(3.0)  # one more checkpoint/flush interval for the indexer to catch up
        prober.stop.set()
        prober.join()
        sup.children["learner"].stop(grace_s=60)  # SIGTERM: final flush + checkpoint + commit
        updates_hw = _highwaters(settings, [k.item_updates_topic])
        index_deadline = time.monotonic() + 120
        while time.monotonic() < index_deadline:
            index = LmdbIndex(settings.index.path, settings.index.map_size)
            with index.view() as view:
                applied = view.offsets()
            index.close()
            if all(applied.get(key, 0) >= hw for key, hw in updates_hw.items() if hw):
                break
            time.sleep(0.5)
        sup.stop_all()
        summary["prober"] = dict(prober.status)
        delivered = [ev for ev in produced if ev.event_id in sent_valid]
        summary["checks"] = verify(settings, delivered, events_hw, updates_hw, counts)
        # A kill leaves no traceback; one in a log is a crash of its own (e.g. a server that could not
        # start), which the end state alone can hide.
        tracebacks = {p.stem: p.read_text(errors="replace").count("Traceback (most recent call last)")
                      for p in sorted((state / "logs").glob("*.log")) if p.stem in PROCESSES}
        summary["checks"]["logs"] = {"ok": not any(tracebacks.values()), "tracebacks": tracebacks}
        summary["seconds"] = round(time.monotonic() - started, 1)
    # 503 is the documented "not ready" answer while a restarted server opens the index; any other
    # 5xx is a failure.
    summary["ok"] = all(c["ok"] for c in summary["checks"].values()) and not any(
        s.startswith("5") and s != "503" for s in summary["prober"])
    out = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
    sys.stdout.write(out + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(out)
    return 0 if summary["ok"] else 1


def _expected_windows(produced: list[InteractionEvent], history: int) -> dict[str, list[str]]:
    """Each user's last ``history`` items by time, as the users store must hold them."""
    per_user: dict[str, list[tuple[int, str]]] = {}
    for ev in produced:
        per_user.setdefault(ev.user_id, []).append((ev.ts, ev.item_id))
    out = {}
    for user, entries in per_user.items():
        entries.sort(key=lambda e: e[0])
        out[user] = [item for _, item in entries[-history:]]
    return out


def verify(settings: Settings, produced: list[InteractionEvent], events_hw: dict[str, int],
           updates_hw: dict[str, int], counts: Counter) -> dict[str, dict]:
    """Every check of the module docstring, each ``{"ok": bool, ...numbers}``."""
    checks: dict[str, dict] = {}
    distinct = len({ev.event_id for ev in produced})
    store = UsersStore(settings.learner.users_path, history=settings.model.history, readonly=True)
    expected = _expected_windows(produced, settings.model.history)
    applied = wrong = 0
    for user, items in expected.items():
        got, _, n = store.history(user)
        applied += n
        wrong += got != items
    store.close()
    checks["users_store"] = {"ok": applied == distinct and wrong == 0, "applied": applied,
                             "distinct_valid_events": distinct, "users_with_wrong_window": wrong}

    learner, offsets, extra = read_checkpoint(Path(settings.learner.checkpoint_dir) / CHECKPOINT_NAME)
    committed = _committed(settings, settings.kafka.learner_group, list(offsets))
    event_offsets = {key: off for key, off in offsets.items() if key in events_hw}
    checks["learner"] = {
        "ok": extra.get("events_received") == distinct and offsets == committed and event_offsets == events_hw,
        "events_received": extra.get("events_received"), "distinct_valid_events": distinct,
        "events_learned": learner.events_seen,  # minus events on items already deleted when they arrived
        "checkpoint_offsets_equal_committed": offsets == committed,
        "checkpoint_offsets_equal_highwater": event_offsets == events_hw,
    }

    report = check_index(settings.index.path, settings.index, min_in_bounds=None)
    index = LmdbIndex(settings.index.path, settings.index.map_size)
    with index.view() as view:
        applied_offsets = view.offsets()
        live = learner.items.live[: len(learner.items)]
        ids = [learner.items.ids.id_of(r) for r in np.flatnonzero(live).tolist()]
        rows = view.rows_of(ids)
        missing = int((rows < 0).sum())
        learned = learner.items.vectors(np.flatnonzero(live)).numpy()
        stored = view.vectors(rows[rows >= 0]) if (rows >= 0).any() else np.empty((0,) + learned.shape[1:])
        max_diff = float(np.abs(stored - learned[rows >= 0]).max()) if stored.size else 0.0
        indexed = view.n_live()
    index.close()
    checks["index"] = {
        "ok": report.ok and missing == 0 and max_diff < 1e-3 and all(
            applied_offsets.get(key, 0) == hw for key, hw in updates_hw.items() if hw),
        "invariants_ok": report.ok, "violations": report.violations[:5], "live_items_learner": len(ids),
        "live_items_index": indexed, "missing_from_index": missing, "max_vector_diff": max_diff,
        "applied_offsets_equal_highwater": all(
            applied_offsets.get(key, 0) == hw for key, hw in updates_hw.items() if hw),
    }
    letters = list(read_dead_letters(settings.kafka, expected=None, timeout_s=30))
    # The DLQ is at-least-once like every hop: a replayed invalid record is dead-lettered again.
    # What must hold is that every invalid source record is there at least once.
    sources = {(d.source_topic, d.source_partition, d.source_offset) for d in letters}
    checks["dead_letters"] = {"ok": len(sources) == counts["invalid"], "distinct_in_dlq": len(sources),
                              "letters": len(letters), "invalid_produced": counts["invalid"],
                              "reasons": dict(Counter(d.reason for d in letters))}
    return checks
