"""Round trips of the learner -> indexer wire encoding (mfli.deltas)."""

import numpy as np
import pytest

from mfli.deltas import CodebookSnapshot, DeltaBatch, ItemDelta, decode_message, encode_codebook, encode_deltas


def _delta(i: int, deleted: bool = False) -> ItemDelta:
    rng = np.random.default_rng(i)
    return ItemDelta(
        item_id=f"item-é{i}", row=i, version=10 + i, event_ts=1_700_000_000_000 + i,
        vectors=rng.normal(size=(3, 8)).astype(np.float32),
        codes=rng.integers(0, 50, (3, 2)).astype(np.int32),
        prior=0.5 * i, deleted=deleted, tags=["a", f"t{i}"],
    )


def test_delta_batch_round_trip_is_exact():
    deltas = [_delta(i, deleted=(i == 2)) for i in range(5)]
    out = decode_message(encode_deltas(deltas))
    assert isinstance(out, DeltaBatch)
    back = out.to_deltas()
    for a, b in zip(deltas, back, strict=True):
        assert (a.item_id, a.row, a.version, a.event_ts, a.deleted, a.tags) == (
            b.item_id, b.row, b.version, b.event_ts, b.deleted, b.tags)
        assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.codes, b.codes)
        assert np.float32(a.prior) == np.float32(b.prior)


def test_payload_is_binary_not_json():
    payload = encode_deltas([_delta(i) for i in range(100)])
    # 3 x 8 float32 + 3 x 2 int32 + fixed fields per item: well under JSON's decimal floats
    assert len(payload) < 100 * (3 * 8 * 4 + 3 * 2 * 4 + 29 + 4 + 10 + 20) + 64


def test_codebook_round_trip_and_type_header():
    cb = np.random.default_rng(0).normal(size=(3, 2, 4, 8)).astype(np.float32)
    out = decode_message(encode_codebook(CodebookSnapshot(version=7, codebooks=cb)))
    assert isinstance(out, CodebookSnapshot) and out.version == 7
    assert np.array_equal(out.codebooks, cb)


def test_foreign_bytes_are_rejected():
    with pytest.raises(ValueError, match="not an mfli"):
        decode_message(b'{"json": "not ours"}')
    with pytest.raises(ValueError, match="shorter"):
        decode_message(b"MF")
