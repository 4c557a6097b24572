"""Anchors (mfli.evaluation) on toy data with known answers: Markov, popularity, SASRec, EASE, ALS,
the streaming harness and the paired user-level bootstrap."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mfli.evaluation.anchors import OnlineMarkov, OnlinePopularity, SASRecAnchor, SASRecSettings
from mfli.evaluation.bootstrap import paired_bootstrap, rank_metrics
from mfli.evaluation.sasrec import training_windows
from mfli.evaluation.static_baselines import ALS, EASE
from mfli.evaluation.streaming_anchors import dense_rows, score_stream

A, B, C = 0, 1, 2


def test_markov_cycle_scores_the_successor_first_and_is_asymmetric() -> None:
    m = OnlineMarkov(window=100)
    m.observe(np.zeros(9, dtype=np.int64), np.array([A, B, C] * 3))  # one user, several events per call
    m.observe(np.array([1, 2]), np.array([A, B]))
    sc = m.scores(np.array([1, 2, 0]), n_items=4)
    assert sc.shape == (3, 4) and sc.dtype == np.float32
    assert sc[0].argmax() == B  # after A comes B
    assert sc[1].argmax() == C  # after B comes C, not A: the chain is directed
    assert sc[2].argmax() == A  # user 0's last item is C
    assert m.transitions(A)[1].sum() == 3 and m.transitions(B)[0].tolist() == [C]
    np.testing.assert_array_equal(m.last_item(np.array([0, 1, 2, 3, 99])), [C, A, B, -1, -1])


def test_markov_one_call_equals_event_by_event() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 5, 200), rng.integers(0, 20, 200)
    bulk, single = OnlineMarkov(window=30), OnlineMarkov(window=30)
    bulk.observe(users, items)
    for u, i in zip(users, items, strict=True):
        single.observe(np.array([u]), np.array([i]))
    q = np.arange(6)
    np.testing.assert_array_equal(bulk.scores(q, 20, np.float64), single.scores(q, 20, np.float64))


def test_markov_popularity_window_slides_and_only_breaks_ties() -> None:
    m = OnlineMarkov(window=3)
    m.observe(np.arange(3), np.array([5, 5, 5]))  # three new users: no transitions, only popularity
    assert m.scores(np.array([99]), 8, np.float64)[0, 5] == pytest.approx(3e-6)
    m.observe(np.arange(3, 6), np.array([7, 7, 6]))  # the window slides: 5 drops out
    pop = m.scores(np.array([99]), 8, np.float64)[0]
    assert pop[5] == 0 and pop[7] == pytest.approx(2e-6) and pop[6] == pytest.approx(1e-6)


def test_markov_transition_beats_popularity() -> None:
    m = OnlineMarkov(window=10)
    m.observe(np.array([1, 2, 3, 0, 0]), np.array([7, 7, 7, 5, 3]))  # 7 is popular; 5 -> 3 seen once
    m.observe(np.array([9]), np.array([5]))
    assert m.scores(np.array([9]), 8)[0].argmax() == 3  # one transition outweighs any popularity
    assert m.scores(np.array([42]), 8)[0].argmax() == 7  # no last item: popularity only


def test_online_popularity_half_life_and_no_overflow() -> None:
    p = OnlinePopularity(half_life=10)
    p.observe(np.zeros(1), np.array([0]))
    p.observe(np.zeros(10), np.full(10, 1))
    v = p.values(3)
    assert v[0] == pytest.approx(0.5) and v[2] == 0
    p.observe(np.zeros(100_000), np.full(100_000, 2))  # 10k half-lives: must renormalise, not overflow
    v = p.values(3)
    assert np.all(np.isfinite(v)) and v.argmax() == 2 and v[2] == pytest.approx(1 / (1 - 2 ** -0.1), rel=1e-6)
    assert p.scores(np.arange(4), 3).shape == (4, 3)


def test_training_windows_use_every_transition_once() -> None:
    w = training_windows([np.arange(120), np.arange(2), np.arange(1)], max_len=50)
    assert w.shape == (4, 51)  # 120 events -> windows ending at 120, 70, 20; 2 events -> one; 1 -> none
    targets = np.concatenate([row[1:][row[:-1] > 0] for row in w])  # targets that have an input
    assert sorted(targets.tolist()) == sorted(list(range(2, 121)) + [2])


def test_sasrec_learns_a_cycle_and_scores_unseen_rows_low() -> None:
    n = 30
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(n) + np.arange(rng.integers(6, 16))) % n for _ in range(600)]
    train = [s[:-1] for s in seqs]
    val = ([s[:-2] for s in seqs[:100]], np.array([s[-2] for s in seqs[:100]]))
    # one thread: on a shared 2-core box two OpenMP threads make these tiny batches ~10x slower
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the model's count in the same run: the anchor must hand it back
        model = SASRecAnchor(n, SASRecSettings(max_len=10, epochs=10, patience=2, val_k=1, threads=1))
        t0 = time.perf_counter()
        stats = model.fit(train, val=val)
        assert time.perf_counter() - t0 < 30
        assert torch.get_num_threads() == 2
        assert stats["val_hr"] and stats["best_epoch"] == int(np.argmax(stats["val_hr"])) + 1
        histories, targets = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])
        assert model.hit_rate(histories, targets, k=1) > 0.9, stats  # seen items excluded, as in the protocol
        sc = model.scores(histories, n_items=n + 5)
        assert sc.shape == (600, n + 5) and sc.dtype == np.float32
        assert np.all(np.isneginf(sc[:, n:]))
        odd = model.scores([np.array([3, n + 2, 4]), np.array([], dtype=np.int64)], n_items=n + 5)
        assert np.all(odd[1, :n] == 0)  # empty history: no preference
        np.testing.assert_allclose(odd[0], model.scores([np.array([3, 4])], n_items=n + 5)[0], rtol=1e-5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _blocks() -> tuple[np.ndarray, np.ndarray]:
    """20 users, 10 items: users 0-9 engage with 3 of items 0-4, users 10-19 with 3 of items 5-9."""
    rng = np.random.default_rng(1)
    users, items = [], []
    for u in range(20):
        base = 0 if u < 10 else 5
        for i in rng.choice(5, 3, replace=False):
            users.append(u), items.append(base + i)
    return np.array(users), np.array(items)


@pytest.mark.parametrize("model", [EASE(lam=1.0), ALS(factors=4, alpha=10.0, reg=0.1, iterations=10)])
def test_static_baselines_rank_the_same_block_first(model: EASE | ALS) -> None:
    users, items = _blocks()
    model.fit(users, items, 20, 10)
    sc = model.scores(np.arange(21)).astype(np.float64)
    assert sc.shape == (21, 10) and np.all(sc[20] == 0)  # unknown user: zero row
    sc[users, items] = -np.inf
    best = sc[:20].argmax(axis=1)
    assert np.all((best < 5) == (np.arange(20) < 10))
    hist = model.scores_histories([np.array([0, 1]), np.array([7])], n_items=12)
    assert hist.shape == (2, 12) and np.all(np.isneginf(hist[:, 10:]))
    assert hist[0, 2:5].max() > hist[0, 5:10].max() and hist[1, 5:10].max() > hist[1, :5].max()


def test_score_stream_markov_protocol() -> None:
    # two users walk the cycle 0 -> 1 -> 2 -> 0; a third arrives in the test period
    users = np.array([0, 0, 0, 1, 1, 1, 0, 1, 2, 2, 0])
    items = np.array([0, 1, 2, 1, 2, 0, 0, 1, 1, 2, 1])
    results = []
    for batch in (1, 64):
        m = OnlineMarkov(window=4)
        results.append(score_stream(lambda u, h, m=m: m.scores(u, 3), users, items, 6, 3, observe=m.observe,
                                    batch=batch))
    r = results[0]
    np.testing.assert_array_equal(r.positions, [6, 7, 9, 10])  # user 2's first event is not scored
    assert r.metrics(ks=(1,))["HR@1"] == 1.0
    assert r.ranks[-1] == 0 and r.ties[-1] == 0  # user 0 had seen 0, 1, 2: only the target is a candidate
    np.testing.assert_array_equal(results[1].ranks, r.ranks)  # chunks never hold a user twice
    rows, n = dense_rows(np.array(["b", "a", "b", "c"], dtype=object))
    assert rows.tolist() == [0, 1, 0, 2] and n == 3


def test_rank_metrics() -> None:
    out = rank_metrics(np.array([0, 19, 20, 99, 100]))
    assert out["HR@20"] == pytest.approx(0.4) and out["HR@100"] == pytest.approx(0.8) and out["n"] == 5
    assert out["NDCG@20"] == pytest.approx((1 + 1 / np.log2(21)) / 5)


def test_bootstrap_identical_and_clear_difference() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 50, 5000)
    a = (rng.random(5000) < 0.3).astype(float)
    same = paired_bootstrap(a, a, groups, n_boot=200)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and same["ratio"] == 1
    better = np.maximum(a, rng.random(5000) < 0.2)
    clear = paired_bootstrap(better, a, groups, n_boot=200)
    assert 0 < clear["lo"] < clear["diff"] < clear["hi"] and clear["ratio_lo"] > 1


def test_bootstrap_resamples_users_not_events() -> None:
    # user 0 holds a tenth of the events, all won by A; elsewhere A == B. Resampling events would give
    # a tight interval around 0.1; resampling users leaves user 0 out of a third of the resamples.
    groups = np.repeat(np.arange(10), 100)
    b = np.zeros(1000)
    a = np.where(groups == 0, 1.0, 0.0)
    out = paired_bootstrap(a, b, groups, n_boot=2000)
    assert out["diff"] == pytest.approx(0.1)
    assert out["lo"] == 0 and out["hi"] > 0.2


def test_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    groups = rng.integers(0, 1000, n)
    a, b = rng.random(n) < 0.3, rng.random(n) < 0.25
    t0 = time.perf_counter()
    paired_bootstrap(a, b, groups, n_boot=1000)
    assert time.perf_counter() - t0 < 1.0
