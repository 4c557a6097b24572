"""``mfli bench freshness``: how long until an event about a brand-new item makes it retrievable.

The whole write path runs for real: embedded broker, ``mfli learn`` and ``mfli index`` as child
processes, and a steady background replay of synthetic events so the learner is busy. A probe is an
``ItemEvent`` (upsert) plus an ``InteractionEvent`` on a never-seen item; its latency is from the
moment the probe was handed to the producer until a fresh read transaction on the index LMDB shows
the item live with a cluster in every facet (so the server would find it in a posting list).

Baseline in the same run: the Kafka hop alone (produce → a plain consumer receives it), the part of
the budget the pipeline cannot go below. The ratio says what learning + publishing + indexing add.

With ``--replicas N`` (issue 12), N ``mfli serve --replica`` processes run too, each with its own data
directory fed from Kafka, and every probe is also timed until it is visible in each replica's own LMDB
copy (same rule): event → visible on a replica, beside the primary's figure of the same probes. With
``--bootstrap-items`` a new replica then copies a synthetic index of that size from the topic start
(:mod:`mfli.benchmarks.replica_bootstrap`): bootstrap seconds per 100k items.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time
from pathlib import Path

from mfli.benchmarks.report import Row, result
from mfli.config import Settings
from mfli.events import InteractionEvent, ItemEvent

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probes", type=int, default=200, help="brand-new items probed")
    parser.add_argument("--rate", type=float, default=2_000.0, help="background events/s replayed meanwhile")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between probes")
    parser.add_argument("--warmup-events", type=int, default=20_000, help="events learned before probing")
    parser.add_argument("--state-dir", default="var/bench-freshness")
    parser.add_argument("--replicas", type=int, default=2, help="server replicas timed beside the primary")
    parser.add_argument("--bootstrap-items", type=int, default=100_000,
                        help="items of the index a new replica copies from the topic start (0 = skip)")


def _kafka_hop(settings: Settings, n: int = 50) -> list[float]:
    """Produce → receive latency of single small records through the same broker."""
    from kafka import KafkaConsumer, TopicPartition

    from mfli.kafka.clients import ensure_topics, make_producer

    topic = "mfli.bench.hop"
    ensure_topics(settings.kafka.bootstrap_servers, settings.kafka, [topic], partitions=1)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False,
                             fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    producer = make_producer(settings.kafka, linger_ms=0)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        producer.send(topic, value=str(i).encode())
        producer.flush()
        got = False
        while not got:
            for records in consumer.poll(timeout_ms=1000).values():
                got = got or any(r.value == str(i).encode() for r in records)
        out.append(time.perf_counter() - t0)
    producer.close()
    consumer.close()
    return out


def _visible(index, item_id: str) -> bool:
    import numpy as np

    try:
        with index.view() as view:
            row = view.row_of(item_id)
            return row is not None and bool((view.clusters_of(np.array([row]))[0] >= 0).all())
    except Exception:  # index not created yet, or a reader race at start-up: not visible
        return False


def _live(index) -> int:
    try:
        with index.view() as view:
            return view.n_live()
    except Exception:  # not created yet
        return 0


def _answer(index, users, user_id: str, settings: Settings):
    """The server's index answer for a user (its stored history, the published encoder), as ids."""
    import numpy as np

    from mfli.retrieval.base import Query
    from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever

    ids, ts, _ = users.history(user_id)
    with index.view() as view:
        rows = view.rows_of(ids)
        keep = rows >= 0
        rows, ts = rows[keep], np.asarray(ts, np.int64)[keep]
        if rows.size == 0:
            return len(ids), []
        rec = LearnedIndexRetriever(view, LearnedIndexParams.from_settings(settings.serve, settings.model)).recommend(
            Query(history=rows, k=20, exclude=rows, history_ts=ts))
        return len(ids), view.item_ids(rec.rows)


def _user_probes(args, settings: Settings, k, producer, index, users_path: Path) -> tuple[list[float], int, int]:
    """An existing user engages with an existing item; latency until the server's answer for that user is
    computed from a history that holds the event (the query is the encoder over that history)."""
    import numpy as np

    from mfli.storage.users_lmdb import UsersStore

    users = UsersStore(users_path, history=settings.model.history, readonly=True)
    with index.view() as view:
        live = view.live_rows()
        items = view.item_ids(live[:50])
    latencies, changed, missed = [], 0, 0
    rng = np.random.default_rng(5)
    for i in range(min(args.probes, 100)):
        user = f"u{int(rng.integers(2000))}"
        _, before = _answer(index, users, user, settings)
        item = items[int(rng.integers(len(items)))]
        t0 = time.perf_counter()
        sent_ts = int(time.time() * 1000)
        producer.send(k.events_topic, key=user.encode(), value=InteractionEvent(
            event_id=f"user-probe-{i}", user_id=user, item_id=item, event_type="view",
            ts=sent_ts).model_dump_json().encode())
        producer.flush()
        limit = time.perf_counter() + 30
        while True:
            ids, ts, _ = users.history(user)
            if ids and ids[-1] == item and ts[-1] == sent_ts:
                latencies.append(time.perf_counter() - t0)
                changed += _answer(index, users, user, settings)[1] != before
                break
            if time.perf_counter() > limit:
                missed += 1
                break
            time.sleep(0.005)
        time.sleep(args.interval)
    users.close()
    return latencies, changed, missed


def run(args: argparse.Namespace, settings: Settings) -> dict:
    from mfli.kafka.broker import EmbeddedBroker
    from mfli.kafka.clients import ensure_topics, make_producer
    from mfli.orchestration.produce import produce_records
    from mfli.orchestration.supervisor import Supervisor, exit_on_sigterm, pipeline_env
    from mfli.sources.synthetic import SyntheticStream
    from mfli.storage.index.reader import LmdbIndex

    exit_on_sigterm()
    state = Path(args.state_dir).resolve()
    shutil.rmtree(state, ignore_errors=True)
    (state / "logs").mkdir(parents=True)
    with EmbeddedBroker(log_path=state / "logs" / "broker.log") as broker:
        settings = settings.model_copy(deep=True)
        settings.kafka.bootstrap_servers = broker.bootstrap
        k = settings.kafka
        ensure_topics(broker.bootstrap, k, [k.events_topic, k.items_topic, k.dlq_topic, k.item_updates_topic])
        env = pipeline_env(state, broker.bootstrap, MFLI_LEARNER__METRICS_PORT="0", MFLI_INDEX__METRICS_PORT="0",
                           MFLI_REPLICATION__METRICS_PORT="0")
        sup = Supervisor(state / "logs", env)
        sup.add("learner", ["--log-level", "WARNING", "learn"])
        sup.add("indexer", ["--log-level", "WARNING", "index"])
        from mfli.lifecycle import free_port

        replica_dirs = [state / f"replica-{i + 1}" for i in range(args.replicas)]
        for data in replica_dirs:
            sup.add(data.name, ["--log-level", "WARNING", "serve", "--replica", "--data-dir", str(data),
                                "--port", str(free_port()), "--no-monitor"])
        sup.start_all()
        hop = _kafka_hop(settings)

        stream = SyntheticStream(n_users=2_000, n_items=5_000, n_topics=20, seed=11)
        stop = threading.Event()

        def background() -> None:
            producer = make_producer(k)
            produce_records(producer, settings, stream.records(args.warmup_events), progress=False)

            def endless():
                while not stop.is_set():
                    yield from stream.records(1_000)

            produce_records(producer, settings, endless(), rate=args.rate, progress=False)
            producer.close()

        feeder = threading.Thread(target=background, daemon=True)
        feeder.start()
        index = LmdbIndex(state / "index.lmdb", map_size=settings.index.map_size)
        copies = [LmdbIndex(d / "index.lmdb", map_size=settings.index.map_size) for d in replica_dirs]
        deadline = time.monotonic() + 600
        while (_live(index) < 1_000 or any(_live(c) < 1_000 for c in copies)) and time.monotonic() < deadline:
            time.sleep(0.2)  # wait until the warm-up catalogue is learned and indexed (and replicated)
        probe_producer = make_producer(k, linger_ms=0)
        latencies: list[float] = []
        replica_latencies: list[float] = []
        missed = replica_missed = 0
        for i in range(args.probes):
            item, user = f"fresh-{i}", f"u{i % 2000}"
            t0 = time.perf_counter()
            now_ms = int(time.time() * 1000)
            probe_producer.send(k.items_topic, key=item.encode(), value=ItemEvent(
                item_id=item, op="upsert", created_ts=now_ms, tags=["t1"]).model_dump_json().encode())
            probe_producer.send(k.events_topic, key=user.encode(), value=InteractionEvent(
                event_id=f"probe-{i}", user_id=user, item_id=item, event_type="view", ts=now_ms,
            ).model_dump_json().encode())
            probe_producer.flush()
            limit = time.perf_counter() + 30
            waiting = {"primary": index, **{f"replica-{j}": c for j, c in enumerate(copies)}}
            while waiting and time.perf_counter() < limit:
                for name, where in list(waiting.items()):
                    if _visible(where, item):
                        (latencies if name == "primary" else replica_latencies).append(time.perf_counter() - t0)
                        del waiting[name]
                time.sleep(0.005)
            missed += "primary" in waiting
            replica_missed += len(waiting) - ("primary" in waiting)
            time.sleep(args.interval)
        user_latencies, changed, user_missed = _user_probes(args, settings, k, probe_producer, index,
                                                            state / "users.lmdb")
        stop.set()
        probe_producer.close()
        crashed = [c.name for c in sup.crashed()]
        for c in copies:
            c.close()
        bootstrap = None
        if args.bootstrap_items:
            from mfli.benchmarks.replica_bootstrap import measure

            sup.children["learner"].stop()  # the phase needs the machine, not the live stream
            bootstrap = measure(settings, state, args.bootstrap_items, sup, env, free_port())
        sup.stop_all()
    if not latencies:
        raise RuntimeError(f"no probe became visible (missed {missed}; crashed: {crashed})")
    base = Row.from_samples("kafka hop (produce -> consume)", hop, "s")
    fresh = Row.from_samples("new item visible in LMDB", latencies, "s").against(base)
    rows = [fresh, base]
    user_p95 = None
    if user_latencies:
        user_row = Row.from_samples("user event -> changed answer", user_latencies, "s").against(base)
        rows.insert(1, user_row)
        user_p95 = user_row.p95
    replica_p95 = None
    if replica_latencies:
        replica_row = Row.from_samples(f"new item visible on a replica ({args.replicas}, own LMDB)", replica_latencies,
                                       "s").against(base)
        rows.insert(1, replica_row)
        replica_p95 = replica_row.p95
    notes_extra = []
    targets_extra = {}
    if args.replicas:
        notes_extra.append(f"replica probes: {len(replica_latencies)} seen, {replica_missed} missed")
        targets_extra["replica p95 <= 1.5 s"] = replica_p95 is not None and replica_p95 <= 1.5
        targets_extra["no replica probe missed"] = replica_missed == 0
    if bootstrap is not None:
        notes_extra.append(f"replica bootstrap: {bootstrap}")
        targets_extra["bootstrap copy identical"] = bool(bootstrap["identical"])
    return result(
        "freshness", rows,
        params={"probes": args.probes, "background_rate": args.rate, "interval_s": args.interval,
                "flush_interval_ms": settings.learner.flush_interval_ms, "replicas": args.replicas,
                "bootstrap_items": args.bootstrap_items},
        targets={"p95 <= 1 s": (fresh.p95 or 0) <= 1.0, "no probe missed": missed == 0,
                 "user event -> changed answer p95 <= 1 s": user_p95 is not None and user_p95 <= 1.0,
                 **targets_extra},
        notes=[f"missed probes (not visible within 30 s): {missed}", f"crashed children: {crashed or 'none'}",
               f"user probes: {len(user_latencies)} seen, {user_missed} missed, answer changed in {changed}",
               *notes_extra],
    )
