"""Unit tests of the ingest building blocks: validation reasons, the dedupe window, lag arithmetic."""

from __future__ import annotations

import orjson
import pytest

from mfli.config import load_settings
from mfli.consumers.dedupe import DedupeWindow
from mfli.consumers.validation import Rejection, Validator
from mfli.events import InteractionEvent, ItemEvent
from mfli.kafka.offsets import lag_of, offset_key, offsets_from_json, offsets_to_json, parse_offset_key

SETTINGS = load_settings()
VALIDATE = Validator.for_events(SETTINGS.ingest.max_event_bytes, SETTINGS.ingest.event_types)
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "view", "value": 1.0, "ts": 5}


def _with(**changes: object) -> bytes:
    body = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    return orjson.dumps(body)


def test_valid_event_passes_with_its_fields():
    result = VALIDATE(orjson.dumps(GOOD))
    assert isinstance(result, InteractionEvent)
    assert result.model_dump() == GOOD


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe\x00", "malformed_json"),
        (b"", "empty"),
        (None, "empty"),
        (b"[1, 2]", "schema"),
        (_with(user_id=...), "schema"),
        (_with(event_id=17), "schema"),
        (_with(ts="12"), "schema"),  # strict: no string-to-int coercion at the wire boundary
        (_with(ts=True), "schema"),
        (_with(ts=-1), "schema"),
        (_with(user_id=""), "schema"),
        (_with(value="3.5"), "schema"),
        (orjson.dumps(GOOD)[:-1] + b',"value":NaN}', "non_finite"),
        (orjson.dumps(GOOD)[:-1] + b',"value":Infinity}', "non_finite"),
        (orjson.dumps(GOOD)[:-1] + b',"value":-1e999}', "non_finite"),
        (orjson.dumps(GOOD)[:-1] + b',"value":1e308}', "non_finite"),  # finite, but inf as float32
        (_with(event_type="teleport"), "unknown_event_type"),
        (_with(item_id="x" * 200, user_id="y" * 200, event_id="z" * 200) + b" " * 20_000, "oversized"),
    ],
)
def test_rejections_carry_the_right_reason(raw, reason):
    result = VALIDATE(raw)
    assert isinstance(result, Rejection), result
    assert result.reason == reason
    assert result.message


def test_item_validator_accepts_items_and_rejects_bad_ops():
    items = Validator.for_items(SETTINGS.ingest.max_event_bytes)
    ok = items(b'{"item_id":"i9","op":"delete","created_ts":3,"tags":["a"]}')
    assert isinstance(ok, ItemEvent) and ok.op == "delete"
    bad = items(b'{"item_id":"i9","op":"explode"}')
    assert isinstance(bad, Rejection) and bad.reason == "schema" and "op" in bad.message


def test_dedupe_window_is_bounded_and_forgets_oldest_first():
    window = DedupeWindow(3)
    assert [window.seen(x) for x in "abc"] == [False, False, False]
    assert window.seen("a") and window.seen("c")
    assert not window.seen("d")  # evicts "a"
    assert len(window) == 3
    assert "a" not in window and "b" in window
    assert not window.seen("a")  # new again once it left the window
    assert window.seen("d")


def test_dedupe_window_zero_disables_and_negative_is_rejected():
    window = DedupeWindow(0)
    assert not window.seen("a") and not window.seen("a")
    with pytest.raises(ValueError, match="capacity"):
        DedupeWindow(-1)


def test_lag_is_highwater_minus_position_and_never_negative():
    assert lag_of(100, 40) == 60
    assert lag_of(100, 100) == 0
    assert lag_of(90, 100) == 0  # position can briefly run ahead of a stale high watermark


def test_offset_keys_round_trip() -> None:
    from kafka import TopicPartition

    assert offset_key("mfli.events", 3) == "mfli.events:3"
    assert parse_offset_key("mfli.events:3") == TopicPartition("mfli.events", 3)
    offsets = {TopicPartition("a.b-c", 0): 5, TopicPartition("a.b-c", 11): 7}
    assert offsets_to_json(offsets) == {"a.b-c:0": 5, "a.b-c:11": 7}
    assert offsets_from_json(offsets_to_json(offsets)) == offsets
