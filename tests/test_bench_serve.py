"""``mfli bench serve``'s in-process comparison on a small catalogue: every retriever answers the same
queries with the same score, and each peer's search parameter is bisected to the learned index's recall."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mfli.benchmarks.peers import PEERS, available
from mfli.benchmarks.serve import bisect_param, compare
from mfli.benchmarks.workloads import learned_workload, synthetic_workload
from mfli.config import load_settings
from mfli.retrieval.base import score


@pytest.fixture(scope="module")
def comparison():
    settings = load_settings(model={"dim": 32})
    wl = synthetic_workload(4000, settings, k=20, n_queries=40)
    peers, _ = available(["hnswlib", "faiss-ivf-flat"])
    return wl, compare(wl, settings, 20, peers, churn=False)


def test_learned_and_peer_answers_are_scored_on_the_same_queries_and_score(comparison):
    """Every returned score equals the one exact score of its row under that request's query vector and
    gates: the learned index, each peer and the exact yardstick all saw the identical query and ranked by
    the identical function (a peer searching another query, or scoring without the prior, would fail)."""
    wl, out = comparison
    snap = wl.snapshot
    assert out["peers"], "no peer library installed (hnswlib is a dependency)"
    sources = {"learned": out["learned_answers"], "exact": out["truth"]}
    sources |= {name: p["answers"] for name, p in out["peers"].items()}
    for name, answers in sources.items():
        assert len(answers) == len(wl.queries), name
        for q, rec in zip(wl.queries, answers, strict=True):
            assert rec.rows.size == q.k, name
            want = score(q.vector, snap.vectors[rec.rows], snap.prior[rec.rows], q.log_gates, wl.tau)
            np.testing.assert_allclose(rec.scores, want, atol=2e-5, err_msg=name)
            assert not np.isin(rec.rows, q.exclude).any(), name
            assert np.all(np.diff(rec.scores) <= 1e-6), name  # best first
    # and the recall each reports is the overlap of those very answers with the exact top k
    truth = [r.rows for r in out["truth"]]
    for name, p in out["peers"].items():
        overlap = np.mean([np.intersect1d(a.rows, t).size / t.size
                           for a, t in zip(p["answers"], truth, strict=True)])
        assert p["recall"] == pytest.approx(overlap), name
        # exhaustive settings exist for both peers, so the bisection must reach the learned recall; a peer
        # fed another query than the learned index's would not get there
        assert p["reached"] and p["recall"] >= out["learned_recall"], name
    assert 0.5 < out["learned_recall"] <= 1.0


def test_bisection_finds_the_smallest_parameter_reaching_the_target():
    """Recall rising with the parameter: the grid brackets the target, bisection narrows the bracket."""
    calls = []

    def recall_at(p: int) -> float:
        calls.append(p)
        return min(1.0, p / 100)

    value, r, reached = bisect_param(recall_at, [8, 16, 32, 64, 128], 0.5)
    assert reached and 50 <= value <= 53 and r >= 0.5
    assert set(calls) > {8, 16, 32, 64}  # walked the grid, then bisected inside (32, 64]
    value, r, reached = bisect_param(recall_at, [8, 16], 0.9)
    assert not reached and value == 16


def test_every_peer_is_registered_with_a_library_to_import():
    ok, notes = available(list(PEERS))
    assert set(ok) | {n.split()[1] for n in notes} == set(PEERS)
    assert "hnswlib" in ok


def test_an_ensemble_workload_is_served_and_scored_with_its_linear_pool():
    """``MFLI_MODEL__MEMBERS=2 mfli bench serve``: the learned workload trains an ensemble (each member from
    its own start), its snapshot carries a two-encoder query model that pools linearly, and every answer of
    the learned index and of a peer scores as the mean of the members' dots plus the prior."""
    settings = load_settings(model={"dim": 16, "history": 16, "members": 2, "warmup_events": 500})
    wl = learned_workload(2_000, settings, k=10, n_queries=20, events_per_item=2.0, cache_dir=None)
    qm = wl.snapshot.query_model
    assert qm is not None and qm.members == 2 and qm.pooling == "linear" and math.isinf(wl.tau)
    assert wl.snapshot.vectors.shape[1:] == (2, 16)
    assert not np.allclose(wl.snapshot.vectors[:, 0], wl.snapshot.vectors[:, 1], atol=1e-2)
    peers, _ = available(["hnswlib"])
    out = compare(wl, settings, 10, peers, churn=False)
    sources = {"learned": out["learned_answers"]} | {name: p["answers"] for name, p in out["peers"].items()}
    for name, answers in sources.items():
        for q, rec in zip(wl.queries, answers, strict=True):
            vec = wl.snapshot.vectors[rec.rows]
            want = np.einsum("nfd,fd->nf", vec, q.vector).mean(1) + wl.snapshot.prior[rec.rows]
            np.testing.assert_allclose(rec.scores, want, atol=2e-5, err_msg=name)
