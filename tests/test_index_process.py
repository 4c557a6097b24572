"""The `mfli index` process on a real broker: resume from LMDB offsets, SIGKILL mid-stream, same index."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from kafka import KafkaProducer

from mfli.config import IndexSettings
from mfli.deltas import CodebookSnapshot, DeltaBatch, decode_message, encode_codebook, encode_deltas
from mfli.indexer.check import check_index
from mfli.storage.index.full_pass import encode
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.writer import IndexWriter

from test_index_writer import _dump

F, D, LV, M = 3, 16, 2, 8
SETTINGS = IndexSettings(map_size=1 << 28, target_cluster_size=16)


def _messages(n_items=400, n_messages=80, per_message=40, seed=0) -> list[tuple[int, bytes]]:
    """(partition, payload): a codebook, then deltas with unique increasing versions and some deletes."""
    rng = np.random.default_rng(seed)
    cb = (0.4 * rng.normal(size=(F, LV, M, D))).astype(np.float32)
    out = [(0, encode_codebook(CodebookSnapshot(1, cb)))]
    version = 0
    for _ in range(n_messages):
        rows = np.sort(rng.choice(n_items, per_message, replace=False)).astype(np.int64)
        partition = int(rng.integers(0, 2))
        rows = rows[rows % 2 == partition]  # an item always lives on one partition
        v = rng.normal(size=(rows.size, F, D)).astype(np.float32)
        v /= np.linalg.norm(v, axis=2, keepdims=True)
        codes = np.stack([encode(v[:, f], cb[f]) for f in range(F)], axis=1)
        versions = version + 1 + np.arange(rows.size)
        version += rows.size
        out.append((partition, encode_deltas(DeltaBatch(
            [f"item-{r}" for r in rows.tolist()], rows, versions.astype(np.int64),
            np.full(rows.size, int(time.time() * 1000)), v, codes, rng.random(rows.size).astype(np.float32),
            rng.random(rows.size) < 0.05, []))))
    return out


def _reference(tmp_path, messages) -> dict:
    writer = IndexWriter(tmp_path / "reference", SETTINGS)
    for _, payload in messages:
        msg = decode_message(payload)
        if isinstance(msg, CodebookSnapshot):
            writer.apply(None, {}, [msg])
        else:
            writer.apply(msg, {})
    writer.full_pass()
    dump = _dump(writer.env)
    writer.close()
    return dump


def _start(kafka_env, settings, path) -> subprocess.Popen:
    env = kafka_env(settings)
    env.update({"MFLI_INDEX__PATH": str(path), "MFLI_INDEX__METRICS_PORT": "0",
                "MFLI_INDEX__FULL_PASS_INTERVAL_S": "0.3", "MFLI_INDEX__MAP_SIZE": str(1 << 28),
                "MFLI_INDEX__TARGET_CLUSTER_SIZE": "16", "MFLI_KAFKA__MAX_POLL_RECORDS": "3",
                "MFLI_LOG_LEVEL": "WARNING"})
    return subprocess.Popen([sys.executable, "-m", "mfli.orchestration.cli", "index"], env=env, start_new_session=True)


def _applied(path, topic) -> int:
    try:
        with LmdbIndex(path, 1 << 28).view() as view:
            return sum(v for k, v in view.offsets().items() if k.startswith(topic))
    except Exception:  # noqa: BLE001 - not created yet / empty
        return 0


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_gives_the_same_index(kafka_settings, kafka_env, tmp_path):
    topic = kafka_settings.kafka.item_updates_topic
    messages = _messages()
    producer = KafkaProducer(bootstrap_servers=kafka_settings.kafka.bootstrap_servers, acks="all")
    for partition, payload in messages:
        producer.send(topic, payload, partition=partition)
    producer.flush()
    producer.close()
    total = len(messages)
    path = tmp_path / "killed"
    kills = 0
    for target in (total // 4, total // 2, 3 * total // 4):
        proc = _start(kafka_env, kafka_settings, path)
        deadline = time.monotonic() + 60
        while _applied(path, topic) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # at an arbitrary point, most likely inside a batch
        proc.wait(10)
        kills += 1
        assert 0 < _applied(path, topic) < total, "the kill should land mid-stream"
    proc = _start(kafka_env, kafka_settings, path)
    deadline = time.monotonic() + 60
    while _applied(path, topic) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert _applied(path, topic) == total
    writer = IndexWriter(path, SETTINGS)
    writer.full_pass()  # same state -> same clusters; background passes ran at timing-dependent points
    killed = _dump(writer.env)
    writer.close()
    assert killed == _reference(tmp_path, messages)
    assert check_index(path, SETTINGS).ok and kills == 3
