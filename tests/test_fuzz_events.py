"""Property-based bad input through the real broker: every malformed record ends in the DLQ, nothing else.

Hypothesis generates mixes of valid events and malformed records (wrong types, missing fields, NaN/inf,
huge strings, deep JSON, invalid UTF-8, binary garbage, empty values and tombstones, oversized records,
non-object JSON, unknown event types). Each example is produced to the events topic of the session broker
and consumed by ONE long-lived :class:`EventStream` (the consumer must survive every example), then

* every valid event reaches a batch, once, unchanged;
* every malformed record is in the DLQ with a reason header from the documented set, its original value,
  key and headers byte for byte, and the source partition/offset it was produced at;
* the batches' offsets cover every record (nothing stuck behind a bad one).

A second test feeds such a stream to a real :class:`LearnerProcess`: it keeps running and learns
exactly the valid events. Counts per category and where each record ended up are written to
``reports/bad_input.json`` (and printed with ``-s``) for the issue's closing note.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

from mfli.config import load_settings
from mfli.consumers import EventStream
from mfli.consumers.dlq import _parse
from mfli.consumers.validation import MAX_ID_BYTES, REASONS
from mfli.kafka.clients import make_producer

from conftest import make_kafka_settings

pytestmark = pytest.mark.slow

EVENT_TYPES = load_settings().ingest.event_types
MAX_BYTES = load_settings().ingest.max_event_bytes
REPORT = Path(__file__).resolve().parent.parent / "reports" / "bad_input.json"
_ids = itertools.count()
#: category -> destination ("batch", "dlq:<reason>", "lost") -> count, over every example of the session
TALLY: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))

# Which reasons each malformed category may legitimately get (the validator's first failure wins).
EXPECTED_REASONS: dict[str, set[str]] = {
    "wrong_type": {"schema"},
    "missing_field": {"schema"},
    "non_finite": {"non_finite", "schema"},  # NaN in "value" is non_finite; NaN in "ts" is a wrong type
    "huge_string": {"schema", "oversized"},
    "deep_json": {"malformed_json", "oversized"},
    "invalid_utf8": {"malformed_json"},
    "binary_garbage": {"malformed_json", "schema"},  # random bytes may happen to be a JSON scalar
    "empty": {"empty"},
    "tombstone": {"empty"},
    "oversized": {"oversized"},
    "not_an_object": {"schema"},
    "unknown_event_type": {"unknown_event_type"},
    "bad_bounds": {"schema"},
    "id_too_many_bytes": {"schema"},  # <= 256 characters (the schema) but > 511 bytes (LMDB's key limit)
}

# --- strategies -------------------------------------------------------------------------------------------
# any code point UTF-8 can carry, short or up to the schema's 256 characters (up to 1 KB of UTF-8)
# (ids become LMDB keys: at most MAX_ID_BYTES of UTF-8 is valid; longer ones are a malformed category).
# Long ids repeat a short drawn text: cheap for hypothesis' buffer, so examples stay large.
_long_text = st.builds(lambda t, n: (t * n)[:n], st.text(st.characters(codec="utf-8", min_codepoint=0x80),
                                                           min_size=1, max_size=4), st.integers(120, 256))
_id_text = st.one_of(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
                     _long_text.filter(lambda t: len(t.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES))


@st.composite
def valid_event(draw) -> dict:
    value = draw(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32),
                           st.integers(-10**6, 10**6)))
    event = {"event_id": f"fz-{next(_ids)}-{os.getpid()}", "user_id": draw(_id_text), "item_id": draw(_id_text),
             "event_type": draw(st.sampled_from(EVENT_TYPES)), "ts": draw(st.integers(0, 10**14 - 1))}
    if value is not None or draw(st.booleans()):
        event["value"] = value
    return event


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=10))
_WRONG = {  # per field, JSON values of the wrong type under strict validation
    "event_id": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                          st.lists(st.text(max_size=3), max_size=3),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "ts": st.one_of(st.text(max_size=10), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not float(x).is_integer())),
    "value": st.one_of(st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "event_type": st.one_of(st.integers(), st.booleans(), st.none(),
                            st.lists(st.sampled_from(EVENT_TYPES), max_size=2)),
}
_WRONG["user_id"] = _WRONG["item_id"] = _WRONG["event_id"]


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def malformed(draw) -> tuple[str, bytes | None]:
    """(category, raw value) of a record that must be rejected."""
    cat = draw(st.sampled_from(sorted(EXPECTED_REASONS)))
    base = draw(valid_event())
    if cat == "wrong_type":
        field = draw(st.sampled_from(sorted(_WRONG)))
        base[field] = draw(_WRONG[field])
        return cat, _dumps(base)
    if cat == "missing_field":
        for field in draw(st.sets(st.sampled_from(["event_id", "user_id", "item_id", "event_type", "ts"]), min_size=1)):
            del base[field]
        return cat, _dumps(base)
    if cat == "non_finite":
        base[draw(st.sampled_from(["value", "ts"]))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        raw = _dumps(base)  # NaN / Infinity / -Infinity literals
        return cat, raw.replace(b"Infinity", b"1e999") if draw(st.booleans()) and b"NaN" not in raw else raw
    if cat == "huge_string":
        field = draw(st.sampled_from(["event_id", "user_id", "item_id", "event_type"]))
        base[field] = draw(st.sampled_from(["x", "é", "\U0001f600"])) * draw(st.integers(300, 3 * MAX_BYTES))
        return cat, _dumps(base)
    if cat == "deep_json":
        depth = draw(st.integers(201, 20_000))
        open_, close = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        nested = open_ * depth + b"1" + close * depth
        if draw(st.booleans()):
            return cat, nested
        return cat, _dumps(base)[:-1] + b',"extra":' + nested + b"}"
    if cat == "invalid_utf8":
        raw = _dumps(base)
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80",
                                    b"\\ud800", b"\\udc00x", b"\xef\xbf"]))
        field = draw(st.sampled_from(["event_id", "user_id", "item_id"]))
        marker = f'"{field}": "'.encode()
        assert marker in raw
        return cat, raw.replace(marker, marker + bad, 1)
    if cat == "binary_garbage":
        raw = draw(st.binary(min_size=1, max_size=200))
        return cat, raw
    if cat == "empty":
        return cat, b""
    if cat == "tombstone":
        return cat, None
    if cat == "oversized":
        base["padding"] = "p" * draw(st.integers(MAX_BYTES, 4 * MAX_BYTES))
        return cat, _dumps(base)
    if cat == "not_an_object":
        return cat, _dumps(draw(st.one_of(_json_scalar, st.lists(_json_scalar, max_size=4),
                                          st.just([base]))))
    if cat == "unknown_event_type":
        base["event_type"] = draw(st.text(min_size=1, max_size=32).filter(lambda t: t not in EVENT_TYPES))
        return cat, _dumps(base)
    if cat == "id_too_many_bytes":
        field = draw(st.sampled_from(["event_id", "user_id", "item_id"]))
        char = draw(st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, codec="utf-8"))
        base[field] = char * draw(st.integers(128, 256))
        return cat, _dumps(base)
    assert cat == "bad_bounds"
    field, value = draw(st.sampled_from([("ts", -1), ("ts", 10**14), ("event_id", ""), ("user_id", ""),
                                         ("item_id", ""), ("event_type", ""), ("event_type", "v" * 33)]))
    base[field] = value
    return cat, _dumps(base)


@st.composite
def record(draw) -> tuple[str, bytes | None, dict | None]:
    """(category, value, the valid event or None)."""
    if draw(st.integers(0, 2)) == 0:
        event = draw(valid_event())
        return "valid", _dumps(event), event
    cat, raw = draw(malformed())
    return cat, raw, None


def _key(i: int, raw: bytes | None) -> bytes | None:
    """Some records without a key (Kafka needs one for a tombstone)."""
    return None if i % 5 == 0 and raw is not None else f"k{i}".encode()


# --- broker plumbing ---------------------------------------------------------------------------------------
class Harness:
    """One producer, one long-lived EventStream and one group-less DLQ reader for the whole module."""

    def __init__(self, broker, name: str) -> None:
        self.settings = make_kafka_settings(broker.bootstrap, lambda role: f"{name}-{role}")
        k = self.settings.kafka
        self.producer = make_producer(k, max_request_size=8 << 20)
        self.stream = EventStream(self.settings, group_id=k.learner_group, topics=[k.events_topic])
        self.dlq = KafkaConsumer(bootstrap_servers=k.bootstrap_servers, enable_auto_commit=False,
                                 auto_offset_reset="earliest", max_partition_fetch_bytes=16 << 20)
        self.dlq.assign([TopicPartition(k.dlq_topic, p) for p in range(k.partitions)])
        self.covered: dict[TopicPartition, int] = {}  # next offset per partition the stream handed out

    def produce(self, records: list[tuple[str, bytes | None, dict | None]]) -> list[tuple[TopicPartition, int]]:
        k = self.settings.kafka
        futures = []
        for i, (cat, raw, _) in enumerate(records):
            key = _key(i, raw)
            futures.append(self.producer.send(k.events_topic, value=raw, key=key, partition=i % k.partitions,
                                              headers=[("fuzz.category", cat.encode()), ("fuzz.i", b"%d" % i)]))
        self.producer.flush()
        return [(TopicPartition(k.events_topic, m.partition), m.offset) for m in (f.get(10) for f in futures)]

    def consume_until(self, ends: dict[TopicPartition, int], timeout_s: float = 30.0):
        events, invalid = [], 0
        deadline = time.monotonic() + timeout_s
        while any(self.covered.get(tp, 0) < end for tp, end in ends.items()):
            assert time.monotonic() < deadline, f"stream stuck at {self.covered}, want {ends}"
            batch = self.stream.poll_batch(max_records=500, timeout_ms=300)
            events.extend(batch.events)
            invalid += batch.invalid
            self.covered.update(batch.offsets)
            self.stream.commit(batch.offsets)
        return events, invalid

    def dead_letters(self, want: int, timeout_s: float = 30.0) -> list:
        out = []
        deadline = time.monotonic() + timeout_s
        while len(out) < want and time.monotonic() < deadline:
            for recs in self.dlq.poll(timeout_ms=200).values():
                out.extend(_parse(r) for r in recs)
        return out

    def close(self) -> None:
        self.stream.close()
        self.producer.close()
        self.dlq.close()


@pytest.fixture(scope="module")
def harness(broker):
    h = Harness(broker, f"fuzz-ev-{os.getpid()}-{int(time.time())}")
    yield h
    h.close()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not TALLY:
        return
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    table = {cat: {test: dict(dest) for test, dest in per.items()} for cat, per in sorted(TALLY.items())}
    REPORT.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    lines = [f"{'category':<20} {'test':<8} destinations"]
    for cat, per in sorted(table.items()):
        for test, dest in sorted(per.items()):
            lines.append(f"{cat:<20} {test:<8} " + ", ".join(f"{d}={n}" for d, n in sorted(dest.items())))
    print("\nbad input -> destination (also in reports/bad_input.json)\n" + "\n".join(lines))


# --- tests ---------------------------------------------------------------------------------------------------
# no shrinking: each example is a broker round trip, and the failing example is printed whole anyway
@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.large_base_example])
@given(st.lists(record(), min_size=1, max_size=30))
def test_every_malformed_record_lands_in_the_dlq(harness, records):
    k = harness.settings.kafka
    positions = harness.produce(records)
    ends: dict[TopicPartition, int] = {}
    for tp, off in positions:
        ends[tp] = max(ends.get(tp, 0), off + 1)
    events, invalid = harness.consume_until(ends)
    n_bad = sum(1 for _, _, ev in records if ev is None)
    letters = harness.dead_letters(n_bad)

    by_pos = {(tp.partition, off): i for i, (tp, off) in enumerate(positions)}
    got_valid = {e.event_id: e for e in events}
    assert len(got_valid) == len(events), "no valid event twice"
    seen_letters = set()
    for d in letters:
        assert d.source_topic == k.events_topic
        i = by_pos.get((d.source_partition, d.source_offset))
        assert i is not None, f"dead letter for a record this example did not produce: {d}"
        cat, raw, event = records[i]
        assert event is None, f"valid event sent to the DLQ ({d.reason}: {d.error}): {raw[:200]!r}"
        assert d.reason in REASONS and d.reason in EXPECTED_REASONS[cat], (cat, d.reason, d.error, raw[:200])
        assert d.error, "a human-readable error header"
        assert d.value == raw, "original bytes kept"
        assert d.key == _key(i, raw)
        assert d.headers["fuzz.category"] == cat.encode() and d.headers["fuzz.i"] == b"%d" % i
        seen_letters.add(i)
        TALLY[cat]["stream"][f"dlq:{d.reason}"] += 1

    for i, (cat, raw, event) in enumerate(records):
        if event is None:
            if i not in seen_letters:
                TALLY[cat]["stream"]["lost"] += 1
            assert i in seen_letters, f"malformed {cat} record not in the DLQ: {raw if raw is None else raw[:200]!r}"
            continue
        got = got_valid.pop(event["event_id"], None)
        TALLY[cat]["stream"]["batch" if got is not None else "lost"] += 1
        assert got is not None, f"valid event lost: {raw[:300]!r}"
        assert got.model_dump(exclude_none=True) == {k_: v for k_, v in event.items() if v is not None} | (
            {"value": float(event["value"])} if event.get("value") is not None else {})
    assert not got_valid, f"events nobody produced in this example: {list(got_valid)[:5]}"
    assert invalid == n_bad == len(letters)


def test_learner_keeps_running_and_learns_exactly_the_valid_events(broker, tmp_path):
    """A real LearnerProcess on a hypothesis-generated mix: it learns the valid events and nothing else."""
    from mfli.learner.process import LearnerProcess

    s = make_kafka_settings(broker.bootstrap, lambda role: f"fuzz-learn-{os.getpid()}-{int(time.time())}-{role}")
    s.learner.checkpoint_dir = tmp_path / "learner"
    s.learner.users_path = tmp_path / "users.lmdb"
    s.learner.checkpoint_interval_s = 0.5
    s.learner.flush_interval_ms = 100
    s.model.warmup_events = 200
    s.model.dim = 16
    s.model.members = 1  # LearnerProcess is the single learner; an ensemble runs as a group (learner/group.py)
    k = s.kafka
    producer = make_producer(k, max_request_size=8 << 20)
    proc = LearnerProcess(s)
    try:
        valid_total = bad_total = 0
        histories: dict[str, list[str]] = defaultdict(list)

        @settings(max_examples=10, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(record(), min_size=10, max_size=40))
        def feed(records):
            nonlocal valid_total, bad_total
            futures = [producer.send(k.events_topic, value=raw, key=b"u%d" % (i % 7), headers=[("c", cat.encode())])
                       for i, (cat, raw, _) in enumerate(records)]
            producer.flush()
            ends: dict[TopicPartition, int] = {}
            for m in (f.get(10) for f in futures):
                tp = TopicPartition(k.events_topic, m.partition)
                ends[tp] = max(ends.get(tp, 0), m.offset + 1)
            before = proc.events_received
            deadline = time.monotonic() + 60
            while any(proc.offsets.get(tp, 0) < end for tp, end in ends.items()):
                assert time.monotonic() < deadline, f"learner stuck at {proc.offsets}, want {ends}"
                proc.run_once()
            valid = [ev for _, _, ev in records if ev is not None]
            assert proc.events_received - before == len(valid), "exactly the valid events are learned"
            for cat, _, ev in records:
                TALLY[cat]["learner"]["learned" if ev is not None else "not learned"] += 1
                if ev is not None:
                    histories[ev["user_id"]].append(ev["item_id"])
            valid_total += len(valid)
            bad_total += len(records) - len(valid)

        feed()
        assert valid_total and bad_total
        proc.checkpoint()  # the state with these ids (NUL, emoji, surrogate pairs...) is durable
        assert proc.learner.events_seen == valid_total
        for user, items in list(histories.items())[:50]:
            stored, _, _ = proc.users.history(user)
            assert stored[-len(items[-s.model.history:]):] == items[-s.model.history:] or set(items) <= set(stored)
    finally:
        proc.close()
        producer.close()
