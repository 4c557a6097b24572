"""An ensemble (``model.members`` > 1) is one model: members numbered alike, facets side by side, and the
server's query equal to the ensemble's (learner/ensemble.py)."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest

from mfli.config import IndexSettings, ModelSettings, Settings
from mfli.deltas import decode_message, encode_model
from mfli.evaluation.prequential import prequential
from mfli.evaluation.run import fresh
from mfli.learner.ensemble import Ensemble, learner_for
from mfli.learner.learner import MFLILearner
from mfli.retrieval.base import Query, resolve_query
from mfli.retrieval.learned import finish, finish_numpy
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.query_model import combine
from mfli.sources.movielens import Interactions
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.writer import IndexWriter

SMALL = dict(dim=16, history=8, warmup_events=500, level_interval_events=500, replay_ratio=0.5)


def _log(n: int = 3_000, seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    users = np.asarray([f"u{u}" for u in rng.integers(0, 40, n)], dtype=object)
    items = np.asarray([f"i{i}" for i in (rng.zipf(1.3, n) % 200)], dtype=object)
    ts = np.sort(rng.integers(0, 30 * 86_400_000, n)).astype(np.int64)
    return Interactions("synthetic", users, items, rng.uniform(1, 5, n).astype(np.float32), ts,
                        item_tags={f"i{i}": [] for i in range(200)})


def _trained(members: int = 2) -> Ensemble:
    data = _log()
    ens = fresh(ModelSettings(members=members, **SMALL), data)
    assert isinstance(ens, Ensemble)
    for start in range(0, len(data), 256):
        ens.learn_columns(data.users[start:start + 256], data.items[start:start + 256],
                          data.values[start:start + 256], data.ts[start:start + 256])
    return ens


def test_members_are_one_model_with_a_facet_each():
    ens = _trained()
    a, b = ens.members
    assert a.items.ids.ids() == b.items.ids.ids() and len(a.users) == len(b.users)
    assert (a.settings.seed, b.settings.seed) == (0, 1)  # member j of seed s has seed s * K + j
    snap = ens.snapshot()
    n = len(a.items)
    assert snap.vectors.shape == (n, 2, 16) and snap.codes.shape[:2] == (n, 2)
    assert snap.codebooks.shape[0] == 2 and snap.query_model.members == 2 and snap.query_model.facets == 2
    np.testing.assert_array_equal(snap.vectors[:, 0], a.serving_vectors()[:, 0])
    np.testing.assert_array_equal(snap.vectors[:, 1], b.serving_vectors()[:, 0])
    # independently seeded: the members learned different vectors
    assert not np.allclose(snap.vectors[:, 0], snap.vectors[:, 1], atol=1e-2)
    q, g, has = ens.user_queries(np.arange(10))
    assert has.all() and q.shape == (10, 2, 16)
    np.testing.assert_allclose(g, np.log(0.5), atol=1e-6)  # uniform gates over the members


def test_the_servers_query_is_the_ensembles_through_the_wire_and_the_index(tmp_path):
    ens = _trained()
    model = ens.query_model()
    back = decode_message(encode_model(model))
    assert back.members == 2 and set(back.weights) == set(model.weights)
    assert all(name.startswith(("m0.", "m1.")) for name in back.weights)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=8)
    writer = IndexWriter(settings.path, settings)
    writer.load_snapshot(ens.snapshot())
    index = LmdbIndex(settings.path, env=writer.env)
    q, g, _ = ens.user_queries(np.arange(8))
    with index.view() as view:
        served = view.query_model()
        assert served is not None and served.members == 2
        for u in range(8):
            ids, ts = ens.members[0].user_history(ens.users.users.id_of(u))
            rows = view.rows_of(ids)
            sq, sg, _ = resolve_query(view, Query(history=rows, k=5, history_ts=np.asarray(ts)), served, 8, 0.97)
            np.testing.assert_allclose(sq, q[u], atol=1e-5)
            np.testing.assert_allclose(sg, g[u], atol=1e-5)


def test_the_streaming_protocol_scores_an_ensemble_through_the_index():
    data = _log(2_500, seed=1)
    ens = fresh(ModelSettings(members=2, **SMALL), data)
    for start in range(0, 2_000, 256):
        end = min(2_000, start + 256)
        ens.learn_columns(data.users[start:end], data.items[start:end], data.values[start:end], data.ts[start:end])
    res = prequential(ens, data, 2_000, 128, Settings())
    assert res.ranks["index"].size == res.ranks["exact"].size > 0
    hits = (res.ranks["exact"] < 20).mean()
    assert hits > 0 and (res.ranks["index"] < 20).mean() >= 0.9 * hits
    # both members learned the scored events
    assert ens.members[0].events_seen == ens.members[1].events_seen == len(data)


def test_members_are_single_facet_models_and_the_single_learner_refuses_an_ensemble():
    with pytest.raises(pydantic.ValidationError, match="facets=1"):
        ModelSettings(members=2, facets=3)
    with pytest.raises(ValueError, match="ensemble"):
        MFLILearner(ModelSettings(members=2))
    assert isinstance(learner_for(ModelSettings(members=1, **SMALL)), MFLILearner)


def test_an_ensemble_pools_its_members_scores_linearly_on_every_path():
    """``model.ensemble_pooling`` = linear (the default): the score is the mean of the members' dots plus the
    prior, the mixture's limit as tau -> inf; it survives the wire, and the compiled rerank (which runs it as
    one dot with the gate-scaled queries) equals the numpy reference and the formula."""
    ens = _trained()
    model = ens.query_model()
    assert model.pooling == "linear" and math.isinf(model.score_tau) and math.isinf(ens.settings.score_tau)
    assert decode_message(encode_model(model)).pooling == "linear"
    mixture = ModelSettings(members=2, ensemble_pooling="mixture", **SMALL)
    single = ModelSettings(members=1, **SMALL)
    assert mixture.score_tau == mixture.temperature and single.score_tau == mixture.temperature
    assert fresh(mixture, _log()).query_model().pooling == "mixture"
    s = np.random.default_rng(0).uniform(-1, 1, (5, 7, 2)).astype(np.float32)
    g = np.full((5, 7, 2), np.log(0.5), np.float32)
    np.testing.assert_allclose(combine(s, g, math.inf), s.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(combine(s, g, 1e4), s.mean(-1), atol=1e-3)  # the limit it is
    assert not np.allclose(combine(s, g, 0.1), s.mean(-1), atol=1e-2)

    snap = ens.snapshot()
    assert snap.query_model is not None and snap.query_model.pooling == "linear"
    view = MemoryIndexView.from_settings(snap, IndexSettings(target_cluster_size=8))
    q, gates, _ = ens.user_queries(np.arange(6))
    live = view.live_rows()
    for u in range(6):
        hist = np.asarray(ens.members[0].users.items_of(u)[0])
        rec = finish(view, q[u], live, None, np.zeros(1, np.int64), np.full(1, -1, np.int64),
                     np.asarray([live.size]), hist, 10, gates[u], math.inf)
        ref = finish_numpy(view, q[u], live, np.zeros(live.size, np.int64), np.zeros(live.size, np.int64), hist,
                           10, gates[u], math.inf)
        np.testing.assert_array_equal(rec.rows, ref.rows)
        expect = np.einsum("nfd,fd->nf", view.vectors(rec.rows), q[u]).mean(1) + view.prior(rec.rows)
        np.testing.assert_allclose(rec.scores, expect, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref.scores, expect, rtol=1e-5, atol=1e-5)
