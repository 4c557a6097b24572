"""``mfli chaos``: crash every process repeatedly mid-stream and prove that nothing was lost.

The run: an embedded broker, a synthetic stream (with invalid records and producer-retry duplicates
mixed in) produced while learner, indexer, server and ``--replicas`` server replicas (``mfli serve
--replica``, own data directories, fed by Kafka) run as real child processes; a killer SIGKILLs each of
them several times at random points and restarts it; probers keep asking the server and every replica
for recommendations. When the stream is fully consumed everything stops cleanly and the final state is
checked against what was produced:

* **kills** — every kill landed mid-stream: events were applied while the process was down (for the
  learner, which applies them itself: events were produced while it was down), and the killed
  process made progress after its restart;
* **users store** — every valid event applied exactly once (the applied count equals the number of
  distinct valid events) and every user's window holds exactly the event ids of their last H events
  (compared as sets of event ids, recomputed from what was produced);
* **learner checkpoint** — events learned equals distinct valid events; its stored offsets equal the
  offsets Kafka has committed for the learner group and the topics' high watermarks;
* **index** — the invariant checker passes; applied offsets equal the item-update topic's high
  watermark; every live learner item is indexed with the learner's final vectors;
* **replicas** — each replica's index equals the primary's byte for byte at the same version
  (:func:`mfli.indexer.compare.compare_indexes`) and its users store holds the same event ids per user;
* **dead letters** — every invalid record is in the DLQ; the probers saw no 5xx.
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
from mfli.learner.group import read_ensemble_checkpoint
from mfli.learner.process import CHECKPOINT_NAME
from mfli.lifecycle import free_port, free_port_block
from mfli.orchestration.produce import produce_records
from mfli.orchestration.supervisor import Supervisor, exit_on_sigterm, pipeline_env, wait_http
from mfli.sources.synthetic import SyntheticStream
from mfli.storage.index.compare import compare_indexes
from mfli.storage.index.copy import copy_position
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.users_lmdb import UsersStore

log = logging.getLogger(__name__)

PROCESSES = ("learner", "indexer", "server")
#: a kill takes 2-6 s before it plus 0.5-1.5 s of downtime (the schedule below) ...
SECONDS_PER_KILL = 5.0
#: ... and a killed learner needs this long before events flow again (torch import, checkpoint, group join)
LEARNER_RESTART_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000, help="valid events to produce")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per process")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events/s produced (0 = paced so the stream outlasts the kill schedule)")
    parser.add_argument("--replicas", type=int, default=2, help="server replicas (mfli serve --replica)")
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
    replicas = [f"replica-{i + 1}" for i in range(args.replicas)]
    processes = (*PROCESSES, *replicas)
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
                           MFLI_LEARNER__METRICS_PORT=str(free_port_block(settings.model.members)),
                           MFLI_INDEX__METRICS_PORT=str(free_port()),
                           MFLI_REPLICATION__METRICS_PORT="0")
        settings.learner.checkpoint_dir = state / "learner"
        settings.learner.users_path = state / "users.lmdb"
        settings.index.path = state / "index.lmdb"
        sup = Supervisor(state / "logs", env)
        cleanup.callback(sup.stop_all)  # also when a check below raises: no child outlives the run
        for name in PROCESSES:
            sup.add(name, {"learner": ["learn"], "indexer": ["index"], "server": ["serve", "--no-monitor"]}[name])
        ports = {name: free_port() for name in replicas}
        for name in replicas:
            sup.add(name, ["serve", "--replica", "--data-dir", str(state / name), "--port", str(ports[name]),
                           "--no-monitor"])
        sup.start_all()

        # --- produce (in this process, never killed: it is the source of truth) ----------------------
        stream = SyntheticStream(n_users=args.users, n_items=args.items, n_topics=20, seed=args.seed)
        produced: list[InteractionEvent] = []
        sent_valid: set[str] = set()
        counts: Counter = Counter()
        # paced so production outlasts the kill schedule: every kill then finds events still flowing
        schedule_s = len(processes) * args.kills * SECONDS_PER_KILL + args.kills * LEARNER_RESTART_S + 20
        rate = args.rate or args.events / schedule_s

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
            rate=rate, invalid_fraction=args.invalid_fraction, seed=args.seed, progress=False,
            sent_valid=sent_valid)))
        produce_thread.start()
        base = f"http://127.0.0.1:{settings.serve.port}"
        wait_http(f"{base}/livez", 30)
        probe_users = [f"u{i}" for i in range(0, args.users, max(1, args.users // 200))]
        probers = {"server": Prober(base, probe_users)}
        for name in replicas:
            wait_http(f"http://127.0.0.1:{ports[name]}/livez", 60)
            probers[name] = Prober(f"http://127.0.0.1:{ports[name]}", probe_users)
        for prober in probers.values():
            prober.start()

        # --- kill schedule: every process `kills` times, in a random order, at random moments --------
        schedule = [name for name in processes for _ in range(args.kills)]
        rng.shuffle(schedule)
        kills: list[dict] = []
        for name in schedule:
            time.sleep(rng.uniform(2.0, 6.0))
            _wait_moving(settings, timeout_s=90)  # a restarted learner first: a kill must find events flowing
            child = sup.children[name]
            before = _progress(settings, state, name)
            child.kill()
            at_kill = {"process": name, "events_applied": _events_applied(settings),
                       "events_produced": len(sent_valid), "progress": before}
            log.info("SIGKILL %s (kill %d)", name, child.kills)
            time.sleep(rng.uniform(0.5, 1.5))
            # down until the stream visibly moved past it (bounded: a stream that ended fails the check)
            down_until = time.monotonic() + 15
            while not _moved(name, at_kill, sent_valid, settings) and time.monotonic() < down_until:
                time.sleep(0.1)
            at_kill["events_applied_at_restart"] = _events_applied(settings)
            at_kill["events_produced_at_restart"] = len(sent_valid)
            child.start()
            kills.append(at_kill)
        produce_thread.join()
        producer.close()
        summary["kills"] = {name: sup.children[name].kills for name in processes}
        summary["produced"] = {"valid": counts["events"], "invalid": counts["invalid"],
                               "duplicates_injected": counts["duplicates_injected"], "items": counts["items"],
                               "rate": round(rate, 1)}

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
        for prober in probers.values():
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
        sup.children["indexer"].stop(grace_s=60)  # SIGTERM: publishes what is queued for the replicas
        if replicas:
            _wait_replicas(settings, state, replicas, deadline=time.monotonic() + 180)
        for name in processes:
            kills_of = [kill for kill in kills if kill["process"] == name]
            for kill in kills_of:
                kill["progress_at_end"] = _progress(settings, state, name)
        sup.stop_all()
        summary["prober"] = {name: dict(p.status) for name, p in probers.items()}
        delivered = [ev for ev in produced if ev.event_id in sent_valid]
        summary["checks"] = verify(settings, delivered, events_hw, updates_hw, counts)
        summary["checks"]["kills"] = _check_kills(kills)
        if replicas:
            summary["checks"]["replicas"] = verify_replicas(settings, state, replicas)
        # A kill leaves no traceback; one in a log is a crash of its own (e.g. a server that could not
        # start), which the end state alone can hide.
        tracebacks = {p.stem: our_tracebacks(p.read_text(errors="replace"))
                      for p in sorted((state / "logs").glob("*.log")) if p.stem in processes}
        summary["checks"]["logs"] = {"ok": not any(tracebacks.values()),
                                     "tracebacks": {name: len(t) for name, t in tracebacks.items()}}
        summary["seconds"] = round(time.monotonic() - started, 1)
    # 503 is the documented "not ready" answer while a restarted server opens the index; any other
    # 5xx is a failure.
    summary["ok"] = all(c["ok"] for c in summary["checks"].values()) and not any(
        s.startswith("5") and s != "503" for statuses in summary["prober"].values() for s in statuses)
    out = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
    sys.stdout.write(out + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(out)
    return 0 if summary["ok"] else 1


_CHAINED = ("During handling of the above exception, another exception occurred:",
            "The above exception was the direct cause of the following exception:")


def our_tracebacks(text: str) -> list[str]:
    """Tracebacks in a process log, except those kafka-python's network layer logs about its own sockets
    (a recv on a socket it just closed, handled inside the client, seen after broker hangs; or a closed
    socket re-registered while a process shuts down). A chained traceback ("During handling of the
    above exception ...") belongs to the log record that started the chain, so it is counted with it."""
    lines = text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        if any(lines[j] in _CHAINED for j in range(max(0, i - 2), i)):
            continue  # counted (or not) with the record that started the chain
        record = lines[i - 1] if i else ""
        if " kafka.net." not in record:
            out.append(record)
    return out


def _events_applied(settings: Settings) -> int:
    """Event offsets the users store reflects (summed over partitions): how far the stream got."""
    try:
        store = UsersStore(settings.learner.users_path, history=settings.model.history, readonly=True)
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    try:
        return sum(v for key, v in store.offsets().items() if key.startswith(settings.kafka.events_topic + ":"))
    finally:
        store.close()


def _moved(name: str, at_kill: dict, sent_valid: set[str], settings: Settings) -> bool:
    """Since the kill, events were produced (a killed learner) or applied (any other process)."""
    if name == "learner":
        return len(sent_valid) > at_kill["events_produced"]
    return _events_applied(settings) > at_kill["events_applied"]


def _wait_moving(settings: Settings, timeout_s: float) -> bool:
    """Until the users store applies events again (False if it did not within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last = _events_applied(settings)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = _events_applied(settings)
        if now > last:
            return True
        last = now
    return False


def _index_offsets(path: Path, map_size: int) -> int:
    index = LmdbIndex(path, map_size)
    try:
        with index.view() as view:
            return sum(view.offsets().values())
    except Exception:  # noqa: BLE001 - not created or empty yet
        return 0
    finally:
        index.close()


def _replica_state(path: Path) -> tuple[int, int]:
    """(applied index-change offset, index version) of a replica's copy; (-1, -1) if unreadable."""
    return copy_position(path / "index.lmdb")


def _progress(settings: Settings, state: Path, name: str) -> int:
    """How far a process got, in its own terms: events applied (learner), item updates applied
    (indexer), index-change records applied (a replica); the server, a reader, has none (0)."""
    if name == "learner":
        return _events_applied(settings)
    if name == "indexer":
        return _index_offsets(settings.index.path, settings.index.map_size)
    if name.startswith("replica-"):
        return _replica_state(state / name)[0]
    return 0


def _check_kills(kills: list[dict]) -> dict:
    """Every kill landed mid-stream (see the module docstring)."""
    bad = []
    for kill in kills:
        if kill["process"] == "learner":  # it applies events itself: they must have arrived meanwhile
            mid = kill["events_produced_at_restart"] > kill["events_produced"]
        else:
            mid = kill["events_applied_at_restart"] > kill["events_applied"]
        resumed = kill["process"] == "server" or kill["progress_at_end"] > kill["progress"]
        if not (mid and resumed):
            bad.append(kill)
    return {"ok": not bad and bool(kills), "kills": len(kills), "not_mid_stream": bad[:5]}


def _wait_replicas(settings: Settings, state: Path, replicas: list[str], deadline: float) -> None:
    """Until every replica's copy is at the primary's index version and its users store at the user-state
    topic's end (the indexer is stopped, so the primary no longer moves)."""
    index = LmdbIndex(settings.index.path, settings.index.map_size)
    with index.view() as view:
        version = view.version
    index.close()
    users_hw = _highwaters(settings, [settings.kafka.user_state_topic])
    while time.monotonic() < deadline:
        behind = [name for name in replicas if _replica_state(state / name)[1] != version]
        for name in replicas:
            try:
                store = UsersStore(state / name / "users.lmdb", readonly=True)
            except Exception:  # noqa: BLE001 - not created yet
                behind.append(name)
                continue
            offsets = store.offsets()
            store.close()
            if any(offsets.get(key, 0) < hw for key, hw in users_hw.items()):
                behind.append(name)
        if not behind:
            return
        time.sleep(0.5)
    log.warning("replicas still behind the primary at the deadline")


def verify_replicas(settings: Settings, state: Path, replicas: list[str]) -> dict:
    """Each replica's index equals the primary's byte for byte; its users store has the same event ids."""
    out: dict = {"ok": True}
    primary = UsersStore(settings.learner.users_path, history=settings.model.history, readonly=True)
    users = primary.user_ids(10_000_000)
    expected = {u: set(primary.event_ids(u)) for u in users}
    primary.close()
    for name in replicas:
        report = compare_indexes(settings.index.path, state / name / "index.lmdb", settings.index.map_size,
                                 wait_s=5)
        store = UsersStore(state / name / "users.lmdb", history=settings.model.history, readonly=True)
        got = store.user_ids(10_000_000)
        wrong = sum(set(store.event_ids(u)) != expected.get(u) for u in got) + len(set(users) - set(got))
        store.close()
        ok = report.ok and wrong == 0
        out[name] = {"ok": ok, "index_equal": report.ok, "index_version": report.index_version,
                     "replica_version": report.other_version, "differences": report.differences,
                     "items": report.entries.get("rec", 0), "users": len(got), "users_with_other_event_ids": wrong}
        out["ok"] = out["ok"] and ok
    return out


def _expected_windows(produced: list[InteractionEvent], history: int) -> dict[str, list[str]]:
    """Each user's last ``history`` event ids by time, as the users store must hold them (its H-event
    window; older kept items carry no event id)."""
    per_user: dict[str, list[tuple[int, str]]] = {}
    for ev in produced:
        per_user.setdefault(ev.user_id, []).append((ev.ts, ev.event_id))
    out = {}
    for user, entries in per_user.items():
        entries.sort(key=lambda e: e[0])
        out[user] = [event_id for _, event_id in entries[-history:]]
    return out


def verify(settings: Settings, produced: list[InteractionEvent], events_hw: dict[str, int],
           updates_hw: dict[str, int], counts: Counter) -> dict[str, dict]:
    """Every check of the module docstring, each ``{"ok": bool, ...numbers}``."""
    checks: dict[str, dict] = {}
    distinct = len({ev.event_id for ev in produced})
    store = UsersStore(settings.learner.users_path, history=settings.model.history, readonly=True)
    expected = _expected_windows(produced, settings.model.history)
    applied = wrong = 0
    for user, event_ids in expected.items():
        applied += store.history(user)[2]
        wrong += set(store.event_ids(user)) != set(event_ids)
    store.close()
    checks["users_store"] = {"ok": applied == distinct and wrong == 0, "applied": applied,
                             "distinct_valid_events": distinct, "users_with_other_event_ids": wrong}

    if settings.model.members > 1:  # an ensemble group: every rank's member (learner/members.py)
        members, offsets, extra = read_ensemble_checkpoint(settings.learner.checkpoint_dir)
    else:
        learner, offsets, extra = read_checkpoint(Path(settings.learner.checkpoint_dir) / CHECKPOINT_NAME)
        members = [learner]
    learner = members[0]  # every member numbers items alike
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
        # an ensemble's member j is facet j of the index
        learned = np.concatenate([m.items.serving_vectors(np.flatnonzero(live)).numpy() for m in members], axis=1)
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
