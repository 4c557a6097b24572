"""``mfli learn --workers N``: a data-parallel learner group (issue 14) — its ranks, checkpoint and launcher.

**Ranks.** Rank r of N reads the ``mfli.events`` partitions p with ``p % N == r`` by explicit assignment
(the topic is keyed by user, so a user's history, replay examples and de-duplication window stay on one
rank); rank 0 also reads ``mfli.items`` and hands catalogue changes to the group inside the step's meta
gather. Every loop iteration is one group step (learner/distributed.py), taken by every rank even with no
events of its own. Rank 0 decides *when* to flush and checkpoint and any rank may ask to stop; the
decisions travel in the same gather, so every rank acts at the same step. Rank 0 alone publishes
deltas, codebooks and the encoder (its model is everyone's).

**An ensemble group** (``model.members`` = K > 1, learner/members.py): the same ranks, partitions,
checkpoint protocol and launcher, but rank r learns *member* r of the ensemble on every rank's events
(gathered each step, rank order) and nothing else is exchanged while learning; at a flush every member
sends rank 0 its state for the rows rank 0 publishes, as facet r. Each rank's file then holds its whole
member, and ``model.pt`` only the publisher's held rows.

**One checkpoint for the group** (``<checkpoint_dir>/group``): ``ckpt-<seq>/model.pt`` (rank 0: the model,
the publisher's held rows) and ``ckpt-<seq>/rank-<r>.pt`` (every rank: its users' windows, replay buffer,
negative-sampling generator, offsets of its partitions, de-duplication window). Every rank writes its
file, a barrier checks that all succeeded, rank 0 renames ``CURRENT`` onto the new directory, a second
barrier, and only then does each rank commit its Kafka offsets. ``CURRENT`` is the commit point: a crash
before it leaves the previous checkpoint whole, a crash after it leaves the new one whole; a restart of
the group loads ``CURRENT`` on every rank and so resumes from the same step everywhere, re-learning
exactly the events after the checkpoint's offsets, once.

**A crashed rank.** Its peers are inside (or soon enter) a collective with it: gloo fails that
collective when the peer's connection closes (SIGKILL, a machine gone) and otherwise after
``learner.collective_timeout_s`` (a peer hung), so they exit non-zero instead of hanging. The launcher
(:func:`launch`, one machine) watches its ranks: the first rank to exit non-zero makes it stop the
others and start the whole group again, from ``CURRENT``, on a new rendezvous port. On several machines
``torchrun`` (``--max-restarts``) is that launcher: its agents tear down and restart every worker of the
group when one fails (docs/design.md §Delivery). Deltas published after the last checkpoint by the dead
group are re-published by the restarted one with newer versions, so the index converges to the model.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from mfli import metrics
from mfli.config import ModelSettings, Settings
from mfli.consumers.stream import EventStream
from mfli.kafka.clients import BrokerHealth, bootstrap_of, make_producer
from mfli.kafka.offsets import offsets_from_json, offsets_to_json
from mfli.learner.checkpoint import DEDUPE_IDS_KEPT, write_atomic
from mfli.learner.distributed import DistributedLearner, init_group, leave_group
from mfli.learner.learner import MFLILearner
from mfli.learner.members import EnsembleView, MemberLearner
from mfli.learner.publisher import Publisher
from mfli.lifecycle import take_single_writer_lock
from mfli.storage.users_lmdb import UsersStore

log = logging.getLogger(__name__)

GROUP_DIR = "group"
FORMAT_VERSION = 1


def owned_partitions(consumer: KafkaConsumer, topic: str, rank: int, world: int,
                     timeout_s: float = 30.0) -> list[TopicPartition]:
    """The partitions of ``topic`` rank ``rank`` owns: ``p % world == rank`` (a fixed, disjoint split: a
    restarted group gives every rank the partitions whose users' state its checkpoint holds)."""
    deadline = time.monotonic() + timeout_s
    parts = consumer.partitions_for_topic(topic)
    while not parts and time.monotonic() < deadline:
        time.sleep(0.2)
        consumer.topics()  # refreshes metadata
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise RuntimeError(f"topic {topic} has no partitions (does it exist?)")
    if len(parts) < world:
        log.warning("%s has %d partitions for %d ranks: some ranks will own none", topic, len(parts), world)
    return [TopicPartition(topic, p) for p in sorted(parts) if p % world == rank]


def read_ensemble_checkpoint(directory: str | Path) -> tuple[list[MFLILearner], dict[str, int], dict[str, Any]]:
    """An ensemble group's ``CURRENT`` checkpoint under ``<checkpoint_dir>/group``, for checks from outside
    (``mfli chaos``): every member's learner (rank order), the group's Kafka offsets (the union of the
    ranks' partitions) and ``{"events_received": sum over ranks}``. Raises ``ValueError`` for a
    data-parallel group (one model split over ranks' files)."""
    from mfli.learner.ensemble import member_settings

    ckpt = Path(directory) / GROUP_DIR
    name, world = (ckpt / "CURRENT").read_text().split()
    model = torch.load(ckpt / name / "model.pt", weights_only=False)
    if model.get("learner") is not None:
        raise ValueError(f"{ckpt / name}: a data-parallel group's checkpoint, not an ensemble's")
    ranks = [torch.load(ckpt / name / f"rank-{r}.pt", weights_only=False) for r in range(int(world))]
    ensemble = ModelSettings(**{**ranks[0]["learner"]["settings"], "members": int(world), "seed": 0})
    members = []
    for r, payload in enumerate(ranks):
        member = MFLILearner(member_settings(ensemble, r))
        member.load_state_dict(payload["learner"])
        members.append(member)
    offsets: dict[str, int] = {}
    for payload in ranks:
        offsets.update(payload["offsets"])  # "topic:partition" -> offset, as a single learner's checkpoint
    return members, offsets, {"events_received": sum(p["events_received"] for p in ranks)}


class GroupCheckpoint:
    """The group's checkpoint directory (see the module docstring)."""

    def __init__(self, directory: Path, rank: int, world: int) -> None:
        self.dir, self.rank, self.world = Path(directory), rank, world
        self.dir.mkdir(parents=True, exist_ok=True)

    def current(self) -> tuple[int, Path] | None:
        marker = self.dir / "CURRENT"
        if not marker.exists():
            return None
        name, world = marker.read_text().split()
        if int(world) != self.world:
            raise RuntimeError(f"{self.dir} holds a checkpoint of a {world}-rank group, not {self.world}: the "
                               "user state is split by partition owner, so the group size must stay the same")
        return int(name.split("-")[1]), self.dir / name

    def load(self) -> tuple[int, dict, dict] | None:
        """(sequence, model payload, this rank's payload) of ``CURRENT``, or None on a first start."""
        cur = self.current()
        if cur is None:
            return None
        seq, where = cur
        model = torch.load(where / "model.pt", weights_only=False)
        mine = torch.load(where / f"rank-{self.rank}.pt", weights_only=False)
        for payload in (model, mine):
            if payload.get("format") != FORMAT_VERSION:
                raise ValueError(f"{where}: group checkpoint format {payload.get('format')!r}")
        return seq, model, mine

    def write(self, seq: int, model: dict | None, mine: dict) -> None:
        where = self.dir / f"ckpt-{seq:08d}"
        where.mkdir(parents=True, exist_ok=True)
        if model is not None:
            write_atomic(where / "model.pt", {"format": FORMAT_VERSION, **model})
        write_atomic(where / f"rank-{self.rank}.pt", {"format": FORMAT_VERSION, **mine})

    def commit(self, seq: int) -> None:
        """Rank 0, once every rank's file is durable: point ``CURRENT`` at ``seq``; drop older ones but
        the previous (kept for inspection)."""
        tmp = self.dir / "CURRENT.tmp"
        tmp.write_text(f"ckpt-{seq:08d} {self.world}\n")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / "CURRENT")
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        for old in sorted(self.dir.glob("ckpt-*"))[:-2]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


class RankProcess:
    """One rank's loop: ``run_once`` is one poll → group step → users store → (flush) → (checkpoint)."""

    def __init__(self, settings: Settings, rank: int, world: int) -> None:
        if settings.model.encoder_input != "shared":
            raise ValueError("the learner process trains encoder_input='shared' only")
        self.settings, self.rank, self.world = settings, rank, world
        ls, k = settings.learner, settings.kafka
        torch.set_num_threads(ls.threads)
        # an ensemble group (learner/members.py): each rank learns one member on the group's events
        self.learner: DistributedLearner | MemberLearner = MemberLearner(settings.model, rank, world) \
            if settings.model.members > 1 else DistributedLearner(settings.model, rank, world)
        self.ckpt = GroupCheckpoint(Path(ls.checkpoint_dir) / GROUP_DIR, rank, world)
        self.offsets: dict[TopicPartition, int] = {}
        self.seq = 0
        self.events_received = 0
        recent: list[str] = []
        held: list[int] = []
        restored = self.ckpt.load()
        if restored is not None:
            self.seq, model, mine = restored
            if isinstance(self.learner, MemberLearner):
                self.learner.load_state_dict(mine["learner"])
            else:
                self.learner.load_group_state(model["learner"], mine["learner"])
            self.offsets = offsets_from_json(mine["offsets"])
            recent = list(mine.get("recent_event_ids", []))
            self.events_received = int(mine.get("events_received", 0))
            held = [int(r) for r in model.get("held_rows", [])]
            log.info("rank %d/%d restored group checkpoint %d at step %d (%d events)", rank, world, self.seq,
                     self.learner.step, self.learner.events_seen)
        self.users = UsersStore(ls.users_path, history=settings.model.history, keep=settings.model.seen_kept)
        probe = KafkaConsumer(bootstrap_servers=k.bootstrap_servers.split(","))
        try:
            owned = owned_partitions(probe, k.events_topic, rank, world)
            if rank == 0:
                owned += owned_partitions(probe, k.items_topic, 0, 1)
        finally:
            probe.close()
        self.stream = EventStream(settings, group_id=k.learner_group, topics=sorted({tp.topic for tp in owned}),
                                  partitions=owned)
        self.stream.dedupe.admit_many(recent)
        self.stream.seek_to(self.offsets)
        self.producer = make_producer(k) if rank == 0 else None
        self.view = EnsembleView(self.learner) if isinstance(self.learner, MemberLearner) and rank == 0 else None
        self.publisher = Publisher(settings, self.view or self.learner, self.producer, held=held) \
            if self.producer is not None else None
        # every rank publishes the user state it owns for server replicas (learner/publish_users.py); a
        # user's events all reach one rank, so each user's record has one writer
        self.user_state = None
        self._user_producer = None
        if settings.replication.publish:
            from mfli.learner.publish_users import UserStatePublisher

            if self.producer is None:
                self._user_producer = make_producer(k)
            self.user_state = UserStatePublisher(settings, self.producer or self._user_producer)
        self.probe = None
        if settings.learner.probe_path is not None:
            from mfli.learner.probe import PrequentialProbe

            path = settings.learner.probe_path
            self.probe = PrequentialProbe(path.with_name(f"{path.name}.rank{rank}"))
        self._last_flush = self._last_ckpt = time.monotonic()
        self._dirty = False
        self.stop_requested = False
        metrics.LEARNER_RANK.labels(rank=str(rank), world=str(world)).set(1)
        log.info("rank %d/%d owns %s", rank, world, sorted(f"{tp.topic}:{tp.partition}" for tp in owned))

    def run_once(self) -> bool:
        """One group step; False once the group has stopped (after its final checkpoint)."""
        batch = self.stream.poll_batch()
        mono = time.monotonic()
        ls = self.settings.learner
        control: dict[str, Any] = {"stop": self.stop_requested, "dirty": self._dirty or bool(batch.offsets)}
        if self.rank == 0:
            control["flush"] = mono - self._last_flush >= ls.flush_interval_ms / 1000
            control["checkpoint"] = mono - self._last_ckpt >= ls.checkpoint_interval_s
            if len(batch) and self.publisher is not None:
                self.publisher.ingested(time.time())
        events = batch.events
        if self.probe is not None and events:
            self.probe.score_events(self.learner, events)
        t0 = time.perf_counter()
        values = np.asarray([np.nan if e.value is None else e.value for e in events], dtype=np.float32)
        _, controls = self.learner.learn_group(
            [e.user_id for e in events], [e.item_id for e in events], values,
            np.asarray([e.ts for e in events], dtype=np.int64), upserts=batch.items, control=control)
        self.events_received += len(events)
        if len(batch):
            self.users.apply(events, offsets=offsets_to_json(batch.offsets))
            if self.user_state is not None and events:
                self.user_state.publish(self.users, {e.user_id for e in events}, int(time.time() * 1000))
            metrics.LEARNER_STEP_SECONDS.labels(phase="total").observe(time.perf_counter() - t0)
        if batch.offsets:
            self.offsets.update(batch.offsets)
            self._dirty = True
        lead = controls[0]
        stop = any(c["stop"] for c in controls)
        if lead["flush"]:
            self.flush()
        if stop or (lead["checkpoint"] and any(c["dirty"] for c in controls)):
            self.checkpoint(final=stop)
        elif lead["checkpoint"]:
            self._last_ckpt = time.monotonic()
        return not stop

    def flush(self, everything: bool = False) -> None:
        """Rank 0 publishes what changed; the others forget it (rank 0's copy of the model is theirs; in an
        ensemble group they first send rank 0 their member's state for it)."""
        self._last_flush = time.monotonic()
        if isinstance(self.learner, MemberLearner):
            self._flush_members(self.learner, everything)
        elif self.publisher is not None:
            self.publisher.flush(everything)
        else:
            self.learner.changed.clear()
            self.learner.deleted.clear()
        metrics.LEARNER_ITEMS.set(len(self.learner.items))
        metrics.LEARNER_USERS.set(len(self.learner.users))
        self.stream.lag()

    def _flush_members(self, learner: MemberLearner, everything: bool) -> None:
        """Rank 0 marks what this flush drains, every member sends its state for those rows (a collective),
        then rank 0 publishes the members side by side (learner/members.py)."""
        if self.publisher is None or self.view is None:
            learner.share_for_publish(None)
            learner.changed.clear()
            learner.deleted.clear()
            return
        forced = self.publisher.prepare(everything)
        rows = self.view.plan_rows()
        shared = learner.share_for_publish({"rows": rows, "model": self.publisher.model_due})
        assert shared is not None, "rank 0 receives every member's share"
        self.view.install(rows, shared)
        self.publisher.send(forced, everything)

    def checkpoint(self, final: bool = False) -> None:
        """Deltas out (rank 0), every rank's state on disk, ``CURRENT`` moved, then the Kafka commits."""
        t0 = time.perf_counter()
        self.flush(everything=final)
        self.seq += 1
        ok = True
        try:
            if self.user_state is not None:  # replicas hold every record before the offsets move past it
                self.user_state.ensure_delivered(self.users)
            model = None
            # an ensemble's member is its rank's own model: all of it goes in the rank's file
            members = isinstance(self.learner, MemberLearner)
            if self.rank == 0:
                assert self.publisher is not None
                model = {"learner": None if members else self.learner.model_state(),
                         "held_rows": self.publisher.held_rows}
            self.ckpt.write(self.seq, model, {
                "learner": self.learner.state_dict() if members else self.learner.rank_state(),
                "offsets": offsets_to_json(self.offsets),
                "recent_event_ids": self.stream.dedupe.recent(DEDUPE_IDS_KEPT),
                "events_received": self.events_received})
        except (OSError, KafkaError):
            log.exception("rank %d could not write its checkpoint file or deliver its user state", self.rank)
            ok = False
        sync = self.learner.sync
        if not sync.barrier_all_ok(ok):
            raise RuntimeError(f"group checkpoint {self.seq} failed on some rank; restarting from the last one")
        if self.rank == 0:
            self.ckpt.commit(self.seq)
        sync.barrier_all_ok(True)  # CURRENT is durable before anyone commits to Kafka
        self.stream.commit(dict(self.offsets))
        self._last_ckpt = time.monotonic()
        self._dirty = False
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - t0)
        log.info("rank %d: group checkpoint %d at step %d, %d events (group), %d received here", self.rank,
                 self.seq, self.learner.step, self.learner.events_seen, self.events_received)

    def close(self) -> None:
        self.stream.close()
        for producer in (self.producer, self._user_producer):
            if producer is not None:
                producer.close()
        self.users.close()
        if self.probe is not None:
            self.probe.close()


def serve_rank_metrics(settings: Settings, rank: int, local_rank: int | None = None) -> None:
    """Serve this rank's metrics on ``metrics_port + local_rank`` (ranks sharing a machine need their own
    ports; one rank per pod keeps the configured one), up and not ready: a rank started before its broker
    answers says so while it waits, as a single learner does."""
    port = settings.learner.metrics_port
    metrics.serve_metrics(port + (rank if local_rank is None else local_rank) if port else 0, process="learner")
    metrics.UP.labels(process="learner").set(1)
    metrics.READY.labels(process="learner").set(0)


def rank_main(settings: Settings, rank: int, world: int, init_method: str, max_seconds: float = 0.0,
              local_rank: int | None = None) -> int:
    """Run one rank until the group stops (SIGTERM/SIGINT on any rank, or ``max_seconds``); a failed
    collective or any error exits non-zero so the launcher restarts the group. Metrics are served on
    ``metrics_port + local_rank`` (ranks sharing a machine need their own ports; one rank per pod keeps
    the configured one; :func:`serve_rank_metrics`, called before the rank waits for its broker)."""
    proc_ref: list[RankProcess] = []
    early: list[bool] = []  # a stop asked for before the rank's process object exists

    def request_stop(signum: int, frame: object) -> None:
        if proc_ref:
            proc_ref[0].stop_requested = True
        else:
            early.append(True)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if not _stop_with_launcher():
        return 0
    # one process per rank: a rank whose launcher was SIGKILLed alone gets SIGTERM and stops after a final
    # checkpoint; its successor waits for that before it loads CURRENT and reads the rank's partitions
    lock = take_single_writer_lock(Path(settings.learner.checkpoint_dir) / GROUP_DIR, f"rank-{rank}.lock",
                                   f"learner rank {rank}", wait_s=settings.learner.collective_timeout_s)
    init_group(settings.learner.backend, rank, world, init_method, settings.learner.collective_timeout_s)
    proc = RankProcess(settings, rank, world)
    proc_ref.append(proc)
    proc.stop_requested = bool(early)
    # readiness follows a background broker probe, as a single learner's does: a rank blocked in a call to
    # a hung broker raises nothing (tests/test_broker_outage.py)
    health = BrokerHealth(bootstrap_of(settings.kafka),
                          on_change=lambda ok: metrics.READY.labels(process="learner").set(1 if ok else 0)).start()
    metrics.READY.labels(process="learner").set(1 if health.ok else 0)
    started = time.monotonic()
    try:
        while True:
            if max_seconds and time.monotonic() - started >= max_seconds:
                proc.stop_requested = True
            if not proc.run_once():
                break
    finally:
        health.stop()
        proc.close()
        metrics.UP.labels(process="learner").set(0)
    leave_group()
    lock.close()
    return 0


LAUNCHER_PID_ENV = "MFLI_LAUNCHER_PID"


def _stop_with_launcher() -> bool:
    """Ask the kernel for a SIGTERM when our launcher dies (Linux ``PR_SET_PDEATHSIG``); False if it
    already has.

    Why: a launcher that is SIGKILLed (a supervisor's restart, an OOM kill) cannot stop its ranks, and
    orphaned ranks would go on learning and publishing beside the group its restart starts. With this a
    rank stops as on any SIGTERM: at the group's next step, after a final checkpoint."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return True
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank would outlive its launcher",
                    ctypes.get_errno())
        return True
    if os.getppid() != int(launcher):  # it died before the request: nobody would send the signal
        log.warning("the launcher (pid %s) is gone: not starting", launcher)
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(settings: Settings, workers: int, extra_args: list[str], stop_is_set) -> int:
    """Start ``workers`` ranks on this machine and keep the group alive: when a rank exits non-zero (or is
    killed), stop the others and start the group again from its checkpoint. Returns when every rank
    exited 0 (the group stopped), or 1 after ``learner.max_group_restarts`` restarts."""
    restarts = 0
    while True:
        init = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}
        procs = [subprocess.Popen([sys.executable, "-m", "mfli.orchestration.cli", "learn", "--rank", str(r),
                                   "--world", str(workers), "--init-method", init, *extra_args], env=env)
                 for r in range(workers)]
        log.info("learner group of %d started (%s), pids %s", workers, init, [p.pid for p in procs])
        failed = None
        forwarded = False
        while failed is None:
            if stop_is_set() and not forwarded:
                for p in procs:  # any rank's request stops the group at one step, after a final checkpoint
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                forwarded = True
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is None and all(c == 0 for c in codes):
                log.info("learner group stopped")
                return 0
            time.sleep(0.1)
        log.warning("learner rank %d exited with %s: stopping the group and restarting it from its checkpoint",
                    failed, procs[failed].returncode)
        _stop(procs, grace_s=5.0)
        if stop_is_set():
            return 1
        restarts += 1
        if restarts > settings.learner.max_group_restarts:
            log.error("learner group failed %d times; giving up", restarts)
            return 1
        time.sleep(min(10.0, 0.5 * restarts))
