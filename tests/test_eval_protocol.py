"""DESIGN §7 protocol pieces on a tiny hand-made log whose answer is known."""

import numpy as np
import pytest

from mfli.learner.counts import DecayedCounts, decayed_counts
from mfli.learner.offline import tune_prior
from mfli.learner.protocol import build_test_set, rank_excluding, recall_at, temporal_cut
from mfli.learner.streaming import _ranks, _seen_before
from mfli.retrieval.snapshot import ItemSnapshot

# (user, item) in time order: 9 training events, 1 cut, test events after
TRAIN = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u1", "c"), ("u2", "d"), ("u3", "b"), ("u3", "c"),
         ("u2", "b"), ("u1", "e")]
TEST = [("u1", "d"), ("u1", "a"), ("u2", "a"), ("u4", "x"), ("u3", "f"), ("u3", "a")]


def test_temporal_cut_is_ninety_percent_and_validates():
    assert temporal_cut(20) == 18
    assert temporal_cut(1_000_209) == 900_188
    with pytest.raises(ValueError, match="train_fraction"):
        temporal_cut(10, 1.0)


def test_test_users_need_training_history_and_an_unseen_test_item():
    ts = build_test_set(*zip(*TRAIN), *zip(*TEST))
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


def test_prior_tuning_picks_the_popularity_weight_that_helps():
    """The truth item points away from every query, so only a positive beta (it is popular) finds it."""
    n = 300
    vectors = np.tile(np.eye(1, 4, dtype=np.float32)[None], (n, 1, 1))
    vectors[5] *= -1
    snap = ItemSnapshot(item_ids=np.asarray([f"i{i}" for i in range(n)], dtype=object), vectors=vectors,
                        codes=np.zeros((n, 1, 1), np.int32), codebooks=np.zeros((1, 1, 8, 4), np.float32),
                        prior=np.zeros(n, np.float32), live=np.ones(n, bool))
    stream = np.asarray([5] * 50 + list(range(6, 300)))
    hist, excl, truth = [np.asarray([0])] * 3, [np.asarray([0])] * 3, [{5}] * 3
    beta, _, table = tune_prior(snap, stream, hist, excl, truth, 0.9, 10, [0.0, 1.0], [1e9])
    assert beta == 1.0
    assert [row["recall@20"] for row in table] == [0.0, 1.0]


def test_prequential_rank_ignores_items_the_user_already_engaged_with():
    scores = np.asarray([[0.9, 0.5, 0.7, 0.1]])
    # item 0 (seen) and item 2 score above the target 1: only item 2 counts
    assert _ranks(scores, np.asarray([1]), [np.asarray([0])]).tolist() == [1]
    assert _ranks(scores, np.asarray([1]), [np.empty(0, np.int64)]).tolist() == [2]


def test_prequential_seen_sets_include_earlier_events_of_the_same_batch():
    users, items = np.asarray([0, 0, 1, 0]), np.asarray([5, 6, 5, 5])
    out = _seen_before(users, items, np.asarray([0, 1, 2, 3]), {0: {1}})
    # a re-engagement (event 3, item 5 again) is not excluded as its own target
    assert [sorted(o.tolist()) for o in out] == [[1], [1, 5], [], [1, 6]]
