"""SIGKILL a consuming process mid-stream, restart it: it resumes at the committed offsets, losing nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from mfli.kafka.clients import make_producer

N_EVENTS = 3_000
WORKER = Path(__file__).with_name("ingest_worker.py")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigkill_mid_stream_resumes_from_committed_offsets(kafka_settings, kafka_env, tmp_path):
    k = kafka_settings.kafka
    producer = make_producer(k)
    for i in range(N_EVENTS):
        event = {"event_id": f"ev-{i}", "user_id": f"u{i % 31}", "item_id": f"i{i % 101}",
                 "event_type": "view", "ts": 1_000 + i}
        producer.send(k.events_topic, key=f"u{i % 31}".encode(), value=orjson.dumps(event))
    producer.flush()
    producer.close()

    out = tmp_path / "delivered.txt"
    env = kafka_env(kafka_settings)
    cmd = [sys.executable, str(WORKER), str(out), k.learner_group]
    first = subprocess.Popen([*cmd, "0.05"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: len(_lines(out)) >= 600, 60), "worker never got going"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    before = _lines(out)
    assert 0 < len(before) < N_EVENTS, "the kill must land mid-stream"

    second = subprocess.Popen([*cmd, "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: len(set(_lines(out))) >= N_EVENTS, 90), "restart did not finish the stream"
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=10)
        except subprocess.TimeoutExpired:
            second.kill()

    lines = _lines(out)
    assert set(lines) == {f"ev-{i}" for i in range(N_EVENTS)}, "no valid event lost"
    after = lines[len(before):]
    duplicates = Counter(lines) - Counter(set(lines))
    # Only records written but not yet committed when the kill landed come back: at most one batch
    # (200 records) per partition, and they must be re-deliveries of what the first run wrote last.
    assert sum(duplicates.values()) <= 200 * kafka_settings.kafka.partitions
    assert set(duplicates) <= set(before)
    assert len(after) < N_EVENTS, "the restart resumed at the committed offsets, not from the beginning"
