"""The learner process over a real broker: events in, users store + deltas + checkpoint out, restart-safe."""

from __future__ import annotations

import time

import pytest
import torch

from mfli.deltas import CodebookSnapshot, DeltaBatch
from mfli.kafka.clients import make_producer
from mfli.kafka.offsets import offsets_to_json
from mfli.learner.process import LearnerProcess
from mfli.orchestration.produce import produce_records
from mfli.sources.synthetic import SyntheticStream

from learner_streams import published_updates

pytestmark = pytest.mark.slow


def _settings(kafka_settings, tmp_path):
    s = kafka_settings.model_copy(deep=True)
    s.learner.checkpoint_dir = tmp_path / "learner"
    s.learner.users_path = tmp_path / "users.lmdb"
    s.learner.checkpoint_interval_s = 0.5
    s.learner.flush_interval_ms = 100
    s.model.warmup_events = 500
    s.model.dim = 16
    s.model.members = 1  # LearnerProcess is the single learner; an ensemble runs as a group (learner/group.py)
    return s


def _produce(settings, n: int, seed: int = 0, start_ts: int = 1_700_000_000_000) -> int:
    stream = SyntheticStream(n_users=50, n_items=200, n_topics=5, seed=seed, start_ts=start_ts)
    producer = make_producer(settings.kafka)
    counts = produce_records(producer, settings, stream.records(n), progress=False)
    producer.close()
    return counts["events"]


def _run_until(proc: LearnerProcess, events: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.learner.events_seen < events and time.monotonic() < deadline:
        proc.run_once()
    assert proc.learner.events_seen == events, f"learned {proc.learner.events_seen} of {events} events"


def test_learns_publishes_and_checkpoints_with_offsets(kafka_settings, tmp_path):
    settings = _settings(kafka_settings, tmp_path)
    n = _produce(settings, 3_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    proc = LearnerProcess(settings)
    try:
        assert torch.get_num_threads() == settings.learner.threads == 1  # learner.threads, not the default
        _run_until(proc, n)
        proc.checkpoint()
        users = proc.users.users()
        applied = sum(proc.users.history(u)[2] for u in proc.users.user_ids(1000))
        # the store keeps what answers exclude (model.seen_items), not only the query window
        kept = {u: proc.users.history(u)[0] for u in proc.users.user_ids(1000)}
        assert max(map(len, kept.values())) > settings.model.history
        assert all(ids == proc.learner.user_history(u)[0] for u, ids in kept.items())
        committed = {tp: proc.stream._consumer.committed(tp) for tp in proc.offsets}
        stored = offsets_to_json(proc.offsets)
    finally:
        proc.close()
        torch.set_num_threads(threads)
    assert users == 50
    assert applied == n, "every event reaches the users store exactly once"
    assert {f"{tp.topic}:{tp.partition}": off for tp, off in committed.items()} == stored
    messages = published_updates(settings)
    assert any(isinstance(m, CodebookSnapshot) for m in messages)
    deltas = [m for m in messages if isinstance(m, DeltaBatch)]
    published = {i for b in deltas for i in b.item_ids}
    assert len(published) >= 150, "the items engaged with were published"
    versions = [int(b.versions.max()) for b in deltas]
    assert versions == sorted(versions), "versions only move forward"


def test_restart_resumes_from_checkpoint_without_reapplying(kafka_settings, tmp_path):
    settings = _settings(kafka_settings, tmp_path)
    first = _produce(settings, 2_000, seed=1)
    proc = LearnerProcess(settings)
    try:
        _run_until(proc, first)
        proc.checkpoint()
        step = proc.learner.step
    finally:
        proc.close()
    second = _produce(settings, 1_000, seed=2, start_ts=1_800_000_000_000)  # later than the first
    restarted = LearnerProcess(settings)
    try:
        assert restarted.learner.events_seen == first and restarted.learner.step == step
        _run_until(restarted, first + second)
        applied = sum(restarted.users.history(u)[2] for u in restarted.users.user_ids(1000))
    finally:
        restarted.close()
    assert applied == first + second


def test_duplicate_straddling_a_restart_is_learned_once(kafka_settings, tmp_path):
    settings = _settings(kafka_settings, tmp_path)
    first = _produce(settings, 500, seed=3)
    proc = LearnerProcess(settings)
    try:
        _run_until(proc, first)
        proc.checkpoint()
    finally:
        proc.close()
    # The producer retries an event it already sent before the restart: same event_id, new offset.
    stream = SyntheticStream(n_users=50, n_items=200, n_topics=5, seed=3)
    original = stream.events(1)[0]
    producer = make_producer(settings.kafka)
    producer.send(settings.kafka.events_topic, key=original.user_id.encode(), value=original.model_dump_json().encode())
    producer.flush()
    producer.close()
    extra = _produce(settings, 200, seed=4, start_ts=1_800_000_000_000)
    restarted = LearnerProcess(settings)
    try:
        _run_until(restarted, first + extra)
        for _ in range(5):  # anything left would show up as an extra learned event
            restarted.run_once()
        assert restarted.learner.events_seen == first + extra
    finally:
        restarted.close()


def test_rows_held_by_the_drift_gate_survive_a_crash(kafka_settings, tmp_path, monkeypatch):
    """Rows that drifted too little to publish yet are in the checkpoint's vectors but not in the index:
    a crash right after that checkpoint must not forget that they still owe the index an update."""
    import mfli.learner.publisher as publisher

    monkeypatch.setattr(publisher, "HELD_PER_FLUSH", 0)  # no trickle: held rows stay held
    settings = _settings(kafka_settings, tmp_path)
    settings.learner.publish_min_drift = 0.5  # hold back most moved rows
    n = _produce(settings, 3_000, seed=3)
    proc = LearnerProcess(settings)
    try:
        _run_until(proc, n)
        proc.checkpoint()
        held = set(proc.publisher.held_rows)
    finally:  # a crash: no final checkpoint (which would publish everything)
        proc.stream.close()
        proc.producer.close()
        proc.users.close()
    assert held, "the drift gate held nothing back; the test would prove nothing"
    before = len(published_updates(settings))
    restarted = LearnerProcess(settings)
    try:
        assert set(restarted.publisher.held_rows) == held
    finally:
        restarted.close()  # the clean stop publishes them
    after = published_updates(settings)[before:]
    published = {r for m in after if isinstance(m, DeltaBatch) for r in m.rows.tolist()}
    assert held <= published, f"{len(held - published)} held rows never reached the index after the restart"
