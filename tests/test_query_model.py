"""No train/serve skew: the server's numpy query encoder equals the learner's torch one (to 1e-5), also
after the weights travel the wire into the LMDB index, and the compiled rerank ranks by the same facet
mixture as the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from mfli.config import IndexSettings, ModelSettings
from mfli.deltas import decode_message, encode_model
from mfli.learner.learner import MFLILearner
from mfli.retrieval.base import Query, resolve_query
from mfli.retrieval.learned import LearnedIndexParams, LearnedIndexRetriever, finish, finish_numpy
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.query_model import combine, gap_buckets
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.writer import IndexWriter


def _trained(facets: int = 3, steps: int = 12, encoder_dim: int = 0) -> MFLILearner:
    learner = MFLILearner(ModelSettings(members=1, facets=facets, dim=16, encoder_dim=encoder_dim, history=8,
                                        warmup_events=500, level_interval_events=500, uniform_negatives=64,
                                        full_softmax_items=0, negatives=32,
                                        objective_weights=[[1.0, 0.0, 0.0], [0.3, 1.0, 0.0], [0.3, 0.0, 1.0]][:facets]))
    rng = np.random.default_rng(0)
    for step in range(steps):
        users = [f"u{u}" for u in rng.integers(0, 40, 256)]
        items = [f"i{i}" for i in rng.integers(0, 300, 256)]
        ts = step * 3_600_000 + np.sort(rng.integers(0, 3_600_000, 256))
        learner.learn_columns(users, items, rng.uniform(1, 5, 256).astype(np.float32), ts.astype(np.int64))
    return learner


@pytest.mark.parametrize("facets,encoder_dim", [(1, 0), (3, 0), (1, 8), (3, 24)])
def test_numpy_encoder_equals_the_learners_for_the_same_history(facets, encoder_dim):
    """Also with an encoder narrower or wider than the item vectors (``encoder_dim``)."""
    learner = _trained(facets, encoder_dim=encoder_dim)
    model = learner.query_model()
    users = np.arange(20)
    q, g, has = learner.user_queries(users)
    assert has.all()
    vectors = learner.serving_vectors()  # what the server holds: the published (averaged) vectors
    for u in users.tolist():
        rows, ts = learner.users.items_of(u)
        nq, ng = model.query(vectors[rows].reshape(len(rows), -1), np.asarray(ts))
        np.testing.assert_allclose(nq, q[u], atol=1e-5)
        np.testing.assert_allclose(ng, g[u], atol=1e-5)
    # the queries depend on order: reversing a history changes them (a mean would not)
    rows, ts = learner.users.items_of(0)
    rq, _ = model.query(vectors[rows[::-1]].reshape(len(rows), -1), np.asarray(ts))
    assert not np.allclose(rq, q[0], atol=1e-3)


def test_gap_buckets_are_log2_seconds_before_the_newest_event():
    ts = np.array([0, 1_000, 7_000, 10_000], np.int64)
    assert gap_buckets(ts).tolist() == [3, 3, 2, 0]  # 10 s, 9 s, 3 s, 0 s
    assert gap_buckets(np.array([[0, 2_000], [5_000, 5_000]])).tolist() == [[1, 0], [0, 0]]  # per row
    assert gap_buckets(np.array([0, 10**13])).tolist() == [31, 0]  # capped


def test_query_model_survives_the_wire_and_the_index(tmp_path):
    learner = _trained()
    model = learner.query_model()
    back = decode_message(encode_model(model))
    assert back.version == model.version and back.tau == model.tau and set(back.weights) == set(model.weights)
    for name, w in model.weights.items():
        np.testing.assert_array_equal(back.weights[name], w)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=8)
    writer = IndexWriter(settings.path, settings)
    snap = learner.snapshot()
    writer.load_snapshot(snap)
    index = LmdbIndex(settings.path, env=writer.env)
    q, g, _ = learner.user_queries(np.arange(5))
    with index.view() as view:
        served = view.query_model()
        assert served is not None and set(served.weights) == set(model.weights)
        for u in range(5):
            ids, ts = learner.user_history(learner.users.users.id_of(u))
            rows = view.rows_of(ids)  # the index owns its rows: map by item id, as the server does
            sq, sg, tau = resolve_query(view, Query(history=rows, k=5, history_ts=np.asarray(ts)), served, 8, 0.97)
            np.testing.assert_allclose(sq, q[u], atol=1e-5)
            np.testing.assert_allclose(sg, g[u], atol=1e-5)
            assert tau == learner.settings.temperature


def test_compiled_rerank_ranks_by_the_facet_mixture():
    learner = _trained()
    view = MemoryIndexView.from_settings(learner.snapshot(), IndexSettings(target_cluster_size=8))
    q, g, _ = learner.user_queries(np.arange(10))
    retriever = LearnedIndexRetriever(view, LearnedIndexParams(clusters_per_request=64, members_per_cluster=64))
    live = view.live_rows()
    tau = learner.settings.temperature
    for u in range(10):
        hist = np.asarray(learner.users.items_of(u)[0])
        # the compiled rerank over the whole catalogue is the exact top 10 of the mixture score
        rec = finish(view, q[u], live, None, np.zeros(1, np.int64), np.full(1, -1, np.int64), np.asarray([live.size]),
                     hist, 10, g[u], tau)
        ref = finish_numpy(view, q[u], live, np.zeros(live.size, np.int64), np.zeros(live.size, np.int64), hist,
                           10, g[u], tau)
        np.testing.assert_array_equal(rec.rows, ref.rows)
        np.testing.assert_allclose(rec.scores, ref.scores, rtol=1e-5, atol=1e-5)
        # and the index path's answer (a subset of the catalogue as candidates) carries the same exact scores
        rec = retriever.recommend(Query(history=hist, k=10, exclude=hist, vector=q[u], log_gates=g[u]))
        assert rec.rows.size == 10 and not np.isin(rec.rows, hist).any()
        vec = view.vectors(rec.rows)
        expect = combine(np.einsum("nfd,fd->nf", vec, q[u]), g[u], learner.settings.temperature) + view.prior(rec.rows)
        np.testing.assert_allclose(rec.scores, expect, rtol=1e-5, atol=1e-5)


def test_random_model_has_the_encoders_parameters():
    """Warm-up and the serving benchmark use QueryModel.random (no torch): same names and shapes."""
    from mfli.learner.encoder import QueryEncoder
    from mfli.retrieval.query_model import QueryModel

    real = QueryEncoder(3 * 16, 16, 3, 8, 2).weights()
    fake = QueryModel.random(3, 16, 8, 2).weights
    assert {k: v.shape for k, v in fake.items()} == {k: v.shape for k, v in real.items()}


def test_the_fused_window_attention_has_autograd_s_gradients():
    """The encoder's hand-written backward (learner/encoder.py ``WindowAttention``) against autograd on the
    plain expression, in float64 (gradcheck's finite differences) and with padded positions."""
    import torch

    from mfli.learner.encoder import WindowAttention

    gen = torch.Generator().manual_seed(0)
    u, b, h, heads, d = 7, 5, 6, 2, 4
    x = torch.randn(u, d, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.randint(0, u, (b, h), generator=gen)
    r = torch.randn(b, heads, d, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(b, heads, h, dtype=torch.float64, generator=gen)
    bias[:, :, :2] = -1e9  # left padding
    bias.requires_grad_(True)
    assert torch.autograd.gradcheck(WindowAttention.apply, (x, idx, r, bias))

    def plain(x, idx, r, bias):
        xg = x[idx]
        att = (torch.bmm(r, xg.transpose(1, 2)) + bias).softmax(2)
        return att, torch.bmm(att, xg)

    w_att, w_xs = torch.randn(b, heads, h, dtype=torch.float64), torch.randn(b, heads, d, dtype=torch.float64)
    grads = []
    for f in (WindowAttention.apply, plain):
        att, xs = f(x, idx, r, bias)
        grads.append(torch.autograd.grad((att * w_att).sum() + (xs * w_xs).sum(), (x, r, bias)))
    for fused, ref in zip(*grads, strict=True):
        assert torch.allclose(fused, ref, atol=1e-10)
    assert float(grads[0][0].abs().sum()) > 0  # the window's rows do get a gradient
