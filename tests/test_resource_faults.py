"""Resource faults: LMDB map full in the indexer, and a slow consumer (lag reported, memory bounded).

* Map full: a real index in a 1 MB LMDB map, a real ``mfli serve`` over it, and the indexer loop fed a delta
  batch that cannot fit. The write aborts as a whole: ``mfli_lmdb_errors_total{kind="map_full"}`` counts it,
  a clear error is logged, the indexer loop stays up (no crash loop: it rewinds and retries with backoff),
  the index keeps its last committed version and passes the invariant checker, and the server keeps
  answering from it.
* Slow consumer: 30k events produced while an EventStream reads 50 records at a time: the lag it reports
  (and exports as ``mfli_consumer_lag_messages``) grows to what is unread, and what the stream buffers in
  memory never exceeds ``max_poll_records``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from mfli.benchmarks.serve import write_lmdb
from mfli.benchmarks.workloads import synthetic_catalogue, synthetic_histories
from mfli.consumers import EventStream
from mfli.deltas import DeltaBatch, encode_deltas
from mfli.indexer.check import check_index
from mfli.indexer.process import IndexerLoop
from mfli.kafka.clients import make_producer
from mfli.storage.index.reader import LmdbIndex

from test_server_harness import serve_process

pytestmark = pytest.mark.slow


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _index_version(s) -> int:
    idx = LmdbIndex(s.index.path, map_size=s.index.map_size)
    try:
        with idx.view() as view:
            assert view.row_of(f"new{10_000}") is None  # a row of the failing batch
            return view.version
    finally:
        idx.close()


def _big_delta(start_row: int, n: int, facets: int, dim: int, levels: int, m: int, seed: int = 0) -> DeltaBatch:
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n, facets, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=2, keepdims=True)
    rows = np.arange(start_row, start_row + n, dtype=np.int64)
    return DeltaBatch([f"new{r}" for r in rows], rows, np.full(n, 10**15, np.int64),
                      np.full(n, int(time.time() * 1000), np.int64), vec,
                      rng.integers(0, m, (n, facets, levels)).astype(np.int32), np.zeros(n, np.float32),
                      np.zeros(n, bool))


def test_map_full_aborts_cleanly_and_server_keeps_answering(kafka_settings, tmp_path, caplog):
    s = kafka_settings.model_copy(deep=True)
    s.index.path = tmp_path / "index.lmdb"
    s.index.map_size = 1 << 20  # the smallest the settings allow: a few hundred items fit, 8000 do not
    s.index.metrics_port = 0
    s.index.target_cluster_size = 16
    s.learner.users_path = tmp_path / "users.lmdb"
    snap = synthetic_catalogue(300, facets=3, dim=16, seed=3)
    write_lmdb(snap, s.index.path, s.learner.users_path, synthetic_histories(snap, users=10, history=20, seed=4), s)
    version_before = _index_version(s)
    assert check_index(s.index.path, s.index).ok

    # the server maps the index read-only with room to spare: the indexer below is the one that runs out
    with serve_process(s.index.path, s.learner.users_path, map_size=1 << 28) as client:
        answer_before = client.get("/v1/recommend", params={"user_id": "u1", "k": 10}).json()

        # 8000 new items (~1.8 MB of vectors) in 4 messages: one poll, one transaction that cannot fit
        big = _big_delta(snap.n_items, 8000, 3, 16, snap.codes.shape[2], snap.codewords)
        producer = make_producer(s.kafka)
        for i in range(0, 8000, 2000):
            part = DeltaBatch(big.item_ids[i:i + 2000], *(getattr(big, f)[i:i + 2000] for f in
                              ("rows", "versions", "event_ts", "vectors", "codes", "prior", "deleted")))
            producer.send(s.kafka.item_updates_topic, encode_deltas(part), partition=0)
        producer.flush()
        producer.close()

        errors_before = _sample("mfli_lmdb_errors_total", {"kind": "map_full"})
        caplog.set_level(logging.ERROR, logger="mfli.indexer.process")
        t0 = time.monotonic()
        rc = IndexerLoop(s, s.index.path).run(max_batches=3)  # three failed polls, then it stops on request
        assert rc == 0, "the indexer loop did not crash"
        assert time.monotonic() - t0 >= 1.0, "it backed off between retries instead of spinning"
        assert _sample("mfli_lmdb_errors_total", {"kind": "map_full"}) - errors_before >= 2
        assert any("map full" in r.getMessage() and "MFLI_INDEX__MAP_SIZE" in r.getMessage()
                   for r in caplog.records), "a clear error names the setting to raise"

        assert _index_version(s) == version_before, "nothing of the failed batch was committed"
        report = check_index(s.index.path, s.index)
        assert report.ok, report.to_dict()

        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["index_version"] == version_before
        after = client.get("/v1/recommend", params={"user_id": "u1", "k": 10})
        assert after.status_code == 200 and after.json() == answer_before, "last good state served"


def test_slow_consumer_lag_grows_and_buffer_stays_bounded(kafka_settings):
    s = kafka_settings.model_copy(deep=True)
    s.kafka.max_poll_records = 500
    k = s.kafka
    n = 30_000
    producer = make_producer(k)
    for i in range(n):
        producer.send(k.events_topic, key=b"u%d" % (i % 50), value=orjson.dumps(
            {"event_id": f"slow-{i}", "user_id": f"u{i % 50}", "item_id": f"i{i % 700}", "event_type": "view",
             "ts": 1_000 + i}))
    producer.flush()
    producer.close()

    consumed, max_buffered, lags, position = 0, 0, [], {}
    with EventStream(s, group_id=k.learner_group, topics=[k.events_topic]) as stream:
        deadline = time.monotonic() + 60
        while consumed < 3_000 and time.monotonic() < deadline:  # the slow consumer: 50 records, then "work"
            batch = stream.poll_batch(max_records=50, timeout_ms=500)
            consumed += len(batch.events)
            position.update(batch.offsets)
            buffered = sum(len(recs) for _, recs in stream._leftover)
            max_buffered = max(max_buffered, buffered)
            if consumed and consumed % 500 == 0:
                lags.append(sum(stream.lag().values()))
            time.sleep(0.002)
        lag = stream.lag()
        high = {tp: stream._consumer.highwater(tp) for tp in lag}
        exported = {tp: _sample("mfli_consumer_lag_messages", {"topic": tp.topic, "partition": str(tp.partition)})
                    for tp in lag}
    assert consumed >= 3_000
    # Partitions the client has not fetched from yet have no known high watermark and are left out (the
    # stream's documented behaviour): a slow consumer may report one partition only at first.
    assert lag, "lag is reported while the consumer is behind"
    for tp, value in lag.items():
        assert value == high[tp] - position.get(tp, 0) > 0, (tp, value, high[tp], position.get(tp))
        assert exported[tp] == value, "the gauge reports the same lag"
    assert sum(lag.values()) >= (n - 3_000) // 4 and max(lags) >= min(lags)
    assert max_buffered <= k.max_poll_records, f"stream buffered {max_buffered} records > max_poll_records"
    print(f"\nslow consumer: consumed {consumed} of {n}, lag {dict((t.partition, v) for t, v in lag.items())}, "
          f"max buffered {max_buffered} (max_poll_records {k.max_poll_records})")
