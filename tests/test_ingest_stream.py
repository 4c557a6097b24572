"""End-to-end ingestion through the real broker: valid events exactly once, invalid ones in the DLQ."""

from __future__ import annotations

import random
import time
from collections import Counter

import orjson
from prometheus_client import REGISTRY

from mfli.consumers import EventStream, read_dead_letters
from mfli.events import InteractionEvent
from mfli.kafka.clients import make_producer

N_RECORDS = 10_000
N_INVALID = 500  # 5 %
N_DUPLICATES = 100


def _valid(i: int) -> dict:
    return {"event_id": f"ev-{i}", "user_id": f"u{i % 97}", "item_id": f"i{i % 503}",
            "event_type": "view", "value": float(i % 5), "ts": 1_000 + i}


def _invalid(i: int, kind: str) -> bytes:
    body = _valid(i) | {"event_id": f"bad-{i}"}
    if kind == "malformed_json":
        return orjson.dumps(body)[:-3]
    if kind == "missing":
        body.pop("item_id")
    elif kind == "wrong_type":
        body["ts"] = "yesterday"
    elif kind == "non_finite":
        return orjson.dumps(body)[:-1] + (b',"value":NaN}' if i % 2 else b',"value":-Infinity}')
    elif kind == "oversized":
        body["padding"] = "x" * 20_000
    elif kind == "unknown_event_type":
        body["event_type"] = "teleport"
    return orjson.dumps(body)


KIND_REASON = {"malformed_json": "malformed_json", "missing": "schema", "wrong_type": "schema",
               "non_finite": "non_finite", "oversized": "oversized", "unknown_event_type": "unknown_event_type"}


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_valid_exactly_once_and_every_invalid_in_dlq(kafka_settings):
    k = kafka_settings.kafka
    rng = random.Random(7)
    kinds = list(KIND_REASON)
    n_unique = N_RECORDS - N_INVALID - N_DUPLICATES
    records: list[tuple[bytes, bytes, str | None]] = [
        (f"u{i % 97}".encode(), orjson.dumps(_valid(i)), None) for i in range(n_unique)]
    for _ in range(N_DUPLICATES):  # copies of valid events, at later offsets
        i = rng.randrange(n_unique)
        records.insert(rng.randrange(i + 1, len(records) + 1), (f"u{i % 97}".encode(), orjson.dumps(_valid(i)), None))
    for j in range(N_INVALID):
        kind = kinds[j % len(kinds)]
        records.insert(rng.randrange(len(records) + 1), (b"bad", _invalid(j, kind), kind))
    assert len(records) == N_RECORDS
    item_records = [b'{"item_id":"i1","op":"upsert","tags":["a"]}', b'{"item_id":"i2","op":"vanish"}']

    before_invalid = {r: _sample("mfli_events_invalid_total", {"reason": r}) for r in set(KIND_REASON.values())}
    before_dup = _sample("mfli_events_duplicate_total")
    producer = make_producer(k)
    for key, value, _ in records:
        producer.send(k.events_topic, key=key, value=value, headers=[("origin", b"test")])
    for value in item_records:
        producer.send(k.items_topic, key=b"item", value=value)
    producer.flush()
    producer.close()

    delivered: list[InteractionEvent] = []
    items = []
    offsets = {}
    with EventStream(kafka_settings, group_id=k.learner_group) as stream:
        deadline = time.monotonic() + 60
        covered = 0
        while covered < N_RECORDS + len(item_records) and time.monotonic() < deadline:
            batch = stream.poll_batch(max_records=1_000, timeout_ms=500)
            delivered.extend(batch.events)
            items.extend(batch.items)
            covered += batch.records
            offsets.update(batch.offsets)
            assert stream.commit(batch.offsets)
        lag = stream.lag()

    ids = Counter(e.event_id for e in delivered)
    assert len(ids) == n_unique and max(ids.values()) == 1, "every valid event exactly once"
    assert set(ids) == {f"ev-{i}" for i in range(n_unique)}
    assert not any(e.event_id.startswith("bad-") for e in delivered), "nothing invalid reached the learner"
    assert [i.item_id for i in items] == ["i1"]
    assert sum(offsets.values()) == N_RECORDS + len(item_records)  # offsets cover every record
    assert lag and all(v == 0 for v in lag.values())

    letters = list(read_dead_letters(k, expected=N_INVALID + 1, timeout_s=30))
    assert len(letters) == N_INVALID + 1
    sent_invalid = Counter((v, KIND_REASON[kind]) for _, v, kind in records if kind)
    got = Counter((d.value, d.reason) for d in letters if d.source_topic == k.events_topic)
    assert got == sent_invalid, "each invalid record in the DLQ with its original bytes and reason"
    assert all(d.error and d.source_offset >= 0 and d.headers.get("origin") == b"test"
               for d in letters if d.source_topic == k.events_topic)
    item_letter = [d for d in letters if d.source_topic == k.items_topic]
    assert len(item_letter) == 1 and item_letter[0].reason == "schema" and item_letter[0].value == item_records[1]

    for reason, count in Counter(KIND_REASON[kind] for _, _, kind in records if kind).items():
        extra = 1 if reason == "schema" else 0  # the bad item
        assert _sample("mfli_events_invalid_total", {"reason": reason}) - before_invalid[reason] == count + extra
    assert _sample("mfli_events_duplicate_total") - before_dup == N_DUPLICATES


def test_seek_to_stored_offsets_overrides_committed(kafka_settings):
    """A state that stored offsets resumes there, even when Kafka's committed offset says otherwise."""
    k = kafka_settings.kafka
    producer = make_producer(k)
    for i in range(40):
        producer.send(k.events_topic, key=b"u", value=orjson.dumps(_valid(i)), partition=0)
    producer.flush()
    producer.close()

    def drain(stream: EventStream, want: int) -> list[InteractionEvent]:
        got: list[InteractionEvent] = []
        deadline = time.monotonic() + 30
        while len(got) < want and time.monotonic() < deadline:
            got.extend(stream.poll_batch(max_records=100, timeout_ms=300).events)
        return got

    with EventStream(kafka_settings, group_id=k.learner_group, topics=[k.events_topic]) as stream:
        first = drain(stream, 40)
        assert len(first) == 40
        stream.commit({tp: 40 for tp in stream.assignment() if tp.partition == 0})
    from kafka import TopicPartition
    tp0 = TopicPartition(k.events_topic, 0)
    with EventStream(kafka_settings, group_id=k.learner_group, topics=[k.events_topic]) as stream:
        stream.seek_to({tp0: 25})  # stored state ends at offset 25
        again = drain(stream, 15)
    assert [e.event_id for e in again] == [f"ev-{i}" for i in range(25, 40)]
