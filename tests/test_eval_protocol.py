"""Static protocol pieces (docs/design.md §Evaluation protocol) on a tiny hand-made log whose answer is known."""

import numpy as np
import pytest

from mfli.evaluation.protocol import build_test_set, rank_excluding, recall_at, temporal_cut, validation_slice
from mfli.learner.counts import DecayedCounts, decayed_counts
from mfli.sources.movielens import Interactions

# (user, item) in time order: 9 training events, 1 cut, test events after
TRAIN = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u1", "c"), ("u2", "d"), ("u3", "b"), ("u3", "c"),
         ("u2", "b"), ("u1", "e")]
TEST = [("u1", "d"), ("u1", "a"), ("u2", "a"), ("u4", "x"), ("u3", "f"), ("u3", "a")]


def test_temporal_cut_is_ninety_percent_and_validates():
    assert temporal_cut(20) == 18
    assert temporal_cut(1_000_209) == 900_188
    with pytest.raises(ValueError, match="train_fraction"):
        temporal_cut(10, 1.0)


def test_validation_slice_lies_inside_the_training_period():
    """The tuning slice: the events after 90 % of the training period, never past the test cut."""
    n = 1_000
    data = Interactions("t", np.arange(n) % 7, np.arange(n) % 11, np.ones(n, np.float32), np.arange(n, dtype=np.int64),
                        {}, {})
    sub, lo, hi = validation_slice(data, 50)
    assert (lo, hi) == (810, 860) and len(sub) == 860 and np.array_equal(sub.items, data.items[:860])
    assert validation_slice(data, 10_000)[2] == temporal_cut(n) == 900  # capped at the training period's end


def test_test_users_need_training_history_and_an_unseen_test_item():
    ts = build_test_set(*zip(*TRAIN, strict=True), *zip(*TEST, strict=True))
    # u2's only test item was seen in training; u4 has no training event
    assert ts.users == ["u1", "u3"]
    assert ts.truth == {"u1": {"d"}, "u3": {"f", "a"}}
    assert ts.seen["u1"] == {"a", "b", "c", "e"}


def test_recall_is_hits_over_truth_size_averaged_over_users():
    ranked = [["d", "z"] + ["q"] * 98, ["y"] * 30 + ["f"] + ["a"] * 69]
    truth = [{"d"}, {"f", "a"}]
    r = recall_at(ranked, truth)
    # user 1: hit at rank 0; user 2: f at rank 30 (so not @20), a after it
    assert r["recall@20"] == pytest.approx((1.0 + 0.0) / 2)
    assert r["recall@50"] == pytest.approx((1.0 + 1.0) / 2)
    with pytest.raises(ValueError):
        recall_at(ranked, truth[:1])


def test_rank_excluding_drops_seen_rows_and_keeps_order():
    scores = np.asarray([0.9, 0.1, 0.8, 0.7, 0.2])
    assert rank_excluding(scores.copy(), np.asarray([0]), 3).tolist() == [2, 3, 4]
    assert rank_excluding(scores.copy(), np.asarray([0, 2, 3]), 5).tolist() == [4, 1]


def test_decayed_counts_match_the_closed_form():
    items = np.asarray([0, 1, 0, 2, 0, 1])
    c = DecayedCounts(half_life=2.0, capacity=2)
    c.add(items[:4])
    c.add(items[4:])
    want = decayed_counts(items, 3, 2.0)
    np.testing.assert_allclose(c.values(3), want)
    # newest event weighs 1, one half-life earlier 0.5: item 1 seen at ages 4 and 0
    assert want[1] == pytest.approx(1 + 0.25)
