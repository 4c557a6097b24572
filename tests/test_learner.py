"""MFLILearner on seeded synthetic streams: codebooks, growth, deletes, cold start, deltas."""

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from mfli.config import ModelSettings
from mfli.events import ItemEvent
from mfli.learner.history import UserHistories
from mfli.learner.learner import MFLILearner
from mfli.learner.quantizer import auto_codewords
from mfli.retrieval.base import pool_query

from learner_streams import as_events, clustered_stream


def small_settings(**kw) -> ModelSettings:
    base = dict(members=1, facets=3, dim=16, history=20, warmup_events=2_000, level_interval_events=1_000,
                negatives=128, usage_interval_steps=5, dead_code_window=3, seed=3)
    base.update(kw)
    return ModelSettings(**base)


def feed(learner, cols, lo, hi, batch=256):
    users, items, values, ts, _ = cols
    for s in range(lo, hi, batch):
        e = min(hi, s + batch)
        learner.learn_columns(users[s:e], items[s:e], values[s:e], ts[s:e])


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(2)
    cols = clustered_stream(n_events=16_000)
    # temperature 0.05: on this 3-facet synthetic stream the default 0.1 (chosen for answer quality) draws
    # each cluster's items tighter, and the level-1 residual codes get less even (largest code 169-212 of 320
    # items, perplexity 3.2-4.5 of 8, against 95-123 at 0.05); the upkeep mechanisms are tested where the
    # residuals are spread enough for balance to be meaningful
    learner = MFLILearner(small_settings(temperature=0.05))
    learner.upsert_items(cols[4])
    feed(learner, cols, 0, len(cols[0]))
    return learner, cols


def test_codebooks_are_fully_used_at_every_level_of_every_facet(trained):
    learner, _ = trained
    rq = learner.rq
    assert rq.active == 2
    assert rq.m == auto_codewords(320, 2) == 8
    # utilisation and perplexity are recomputed over all live items right now
    live = torch.from_numpy(np.flatnonzero(learner.items.live[: len(learner.items)]))
    codes = rq.encode(learner.items.vectors(live))
    for f in range(3):
        for lv in range(2):
            used = np.unique(codes[:, f, lv].numpy())
            assert len(used) / rq.m >= 0.9, (f, lv, used)
            counts = np.bincount(codes[:, f, lv].numpy(), minlength=rq.m)
            assert counts.max() <= 0.5 * len(live), f"level {lv} of facet {f} collapsed: {counts}"
    assert (rq.utilisation >= 0.9).all()
    assert (rq.perplexity > 4).all()
    # the same numbers are exported as gauges
    for f in range(3):
        for lv in range(2):
            labels = {"facet": str(f), "level": str(lv)}
            assert REGISTRY.get_sample_value("mfli_codebook_utilisation_ratio", labels) == rq.utilisation[f, lv]
            assert REGISTRY.get_sample_value("mfli_codebook_perplexity", labels) == pytest.approx(rq.perplexity[f, lv])


def test_level0_codes_recover_the_planted_clusters(trained):
    """Engagement facet: items of one planted cluster should share a level-0 codeword mostly."""
    learner, _ = trained
    snap = learner.snapshot()
    cluster = np.asarray([int(i[1:]) // 40 for i in snap.item_ids])
    purity = []
    for c in range(8):
        codes = snap.codes[cluster == c, 0, 0]
        purity.append(np.bincount(codes).max() / len(codes))
    assert np.mean(purity) > 0.6, purity


def test_history_queries_rank_the_users_cluster_first(trained):
    learner, cols = trained
    snap = learner.snapshot()
    hist, _ = learner.user_history("u0")
    row_of = snap.row_of()
    rows = np.asarray([row_of[i] for i in hist])
    q = pool_query(snap.vectors[rows], learner.settings.recency_decay)
    top = np.argsort(-(snap.vectors.reshape(snap.n_items, -1) @ q.reshape(-1)))[:20]
    home = np.bincount([int(i[1:]) // 40 for i in hist]).argmax()
    share = np.mean([int(snap.item_ids[r][1:]) // 40 == home for r in top])
    assert share >= 0.7, share


def test_tables_grow_and_new_items_get_rows_on_first_sight():
    learner = MFLILearner(small_settings())
    cap = learner.items.emb.shape[0]
    ids = [f"x{n}" for n in range(cap + 5)]
    learner.learn_columns(["u"] * len(ids), ids, np.ones(len(ids), np.float32), np.arange(len(ids)))
    assert len(learner.items) == cap + 5
    assert learner.items.emb.shape[0] == 2 * cap
    norms = learner.items.vectors().norm(dim=2)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert learner.snapshot().live.all()


def test_deleted_items_leave_the_live_set_at_once_and_are_not_trained():
    learner = MFLILearner(small_settings())
    learner.learn_columns(["u1", "u1", "u2"], ["a", "b", "a"], np.ones(3, np.float32), np.arange(3))
    learner.drain_changed()
    assert learner.delete_items(["a"]) == 1
    snap = learner.snapshot()
    assert not snap.live[snap.row_of()["a"]]
    deltas = learner.drain_changed()
    assert [(d.item_id, d.deleted) for d in deltas] == [("a", True)]
    before = learner.items.vectors(np.asarray([0])).clone()
    learner.learn_columns(["u1", "u2"], ["a", "b"], np.ones(2, np.float32), np.arange(3, 5))
    assert torch.equal(learner.items.vectors(np.asarray([0])), before)
    assert "a" not in {d.item_id for d in learner.drain_changed()}
    learner.upsert_items([ItemEvent(item_id="a", tags=["t"])])
    assert learner.snapshot().live[0]


def test_cold_items_start_near_items_sharing_their_tags(trained):
    learner, _ = trained
    learner.upsert_items([ItemEvent(item_id="new-c3", tags=["c3"])])
    snap = learner.snapshot()
    row = snap.row_of()["new-c3"]
    cluster = np.asarray([int(i[1:]) // 40 if i.startswith("i") else -1 for i in snap.item_ids])
    sims = (snap.vectors.reshape(snap.n_items, -1) @ snap.vectors[row].reshape(-1))
    assert sims[cluster == 3].mean() > sims[(cluster >= 0) & (cluster != 3)].mean() + 0.5


def test_drain_changed_reports_each_touched_row_once_with_current_state():
    cols = clustered_stream(n_events=3_000, seed=5)
    learner = MFLILearner(small_settings())
    feed(learner, cols, 0, 3_000)
    deltas = learner.drain_changed()
    rows = [d.row for d in deltas]
    assert len(rows) == len(set(rows)) == len(learner.items)
    snap = learner.snapshot()
    for d in deltas[:10]:
        np.testing.assert_allclose(d.vectors, snap.vectors[d.row], atol=1e-6)
        np.testing.assert_array_equal(d.codes, snap.codes[d.row])
        assert d.prior == pytest.approx(float(snap.prior[d.row]), rel=1e-5)
        assert d.version >= 1 and d.event_ts > 0
    assert learner.drain_changed() == []


def test_event_objects_and_columns_train_identically():
    cols = clustered_stream(n_events=1_500, seed=7)
    a, b = MFLILearner(small_settings()), MFLILearner(small_settings())
    feed(a, cols, 0, 1_500, batch=500)
    users, items, values, ts, _ = cols
    for s in range(0, 1_500, 500):
        b.learn(as_events(users, items, values, ts, s, s + 500))
    assert torch.equal(a.items.emb, b.items.emb)
    assert a.user_history("u1") == b.user_history("u1")


def test_user_history_keeps_the_seen_items_and_queries_read_the_last_h():
    learner = MFLILearner(small_settings(history=3, seen_items=4))
    learner.learn_columns(["u"] * 6, list("abcdef"), np.ones(6, np.float32), np.arange(6) * 10)
    assert learner.user_history("u") == (["c", "d", "e", "f"], [20, 30, 40, 50])  # what the users store keeps
    window, times = learner.users.items_of(learner.users.users.get("u"))
    assert [learner.items.ids.id_of(r) for r in window] == ["d", "e", "f"] and times == [30, 40, 50]
    assert learner.user_history("nobody") == ([], [])
    assert MFLILearner(small_settings(history=3, seen_items=0)).users.keep == 3  # never fewer than H


def test_advance_windows_reports_every_kept_item_before_each_event():
    """Events of one call see the same user's earlier ones; seen items come as (event, item row) pairs."""
    h = UserHistories(horizon=2, keep=3)
    h.rows_for(["u", "v"])
    win, _, has, seen = h.advance_windows(np.array([0, 0, 1, 0, 0]), np.array([10, 11, 20, 12, 13]),
                                          np.arange(5), with_seen=True)
    assert seen is not None
    pairs = list(zip(seen[0].tolist(), seen[1].tolist(), strict=True))
    assert pairs == [(1, 10), (3, 10), (3, 11), (4, 10), (4, 11), (4, 12)]
    assert win.tolist() == [[-1, -1], [-1, 10], [-1, -1], [10, 11], [11, 12]] and has.tolist() == [0, 1, 0, 1, 1]
    assert h.seen_of(0)[0] == [11, 12, 13] and h.items_of(0)[0] == [12, 13]
    assert h.advance_windows(np.array([1]), np.array([21]), np.array([9]))[3] is None


@pytest.mark.parametrize("seen_items", [10, 0])
def test_an_event_leaves_every_item_its_user_saw_out_of_its_softmax(seen_items):
    """Answers exclude the kept seen items, so training must not push them down: an item the user engaged
    with before the query window gets no gradient from the user's event (with ``seen_items`` 0 only the
    window is left out, and the older item is an ordinary negative)."""
    learner = MFLILearner(small_settings(facets=1, objective_weights=[[1.0, 0.0, 0.0]], history=1,
                                         seen_items=seen_items, replay_ratio=0.0, serving_average=0.0))
    learner.upsert_items([ItemEvent(item_id=i) for i in "abcdefgh"])
    learner.learn_columns(["u", "u"], ["a", "b"], np.ones(2, np.float32), np.array([0, 10]))
    a = learner.items.ids.get("a")
    before = learner.items.emb[a].clone()
    learner.learn_columns(["u"], ["c"], np.ones(1, np.float32), np.array([20]))  # window [b], seen [a, b]
    moved = float((learner.items.emb[a] - before).norm())
    assert (moved < 1e-6) if seen_items else (moved > 1e-4), moved


def test_separate_input_table_trains_and_checkpoints():
    """The 'separate input embeddings' ablation: the encoder reads a context table of its own, which
    moves under training and survives a checkpoint round trip; the indexed vectors still train."""
    cols = clustered_stream(n_events=3_000)
    learner = MFLILearner(small_settings(facets=1, encoder_input="separate"))
    learner.upsert_items(cols[4])
    ctx0, emb0 = learner.items.ctx[: len(learner.items)].clone(), learner.items.emb[: len(learner.items)].clone()
    feed(learner, cols, 0, 3_000)
    n0 = len(ctx0)
    assert (learner.items.ctx[:n0] - ctx0).norm(dim=1).gt(1e-4).float().mean() > 0.5
    assert (learner.items.emb[:n0] - emb0).norm(dim=1).gt(1e-4).float().mean() > 0.5
    again = MFLILearner(small_settings(facets=1, encoder_input="separate"))
    again.load_state_dict(learner.state_dict())
    rows = np.arange(20)
    assert np.allclose(again.user_queries(rows)[0], learner.user_queries(rows)[0], atol=1e-6)
    assert torch.equal(again.items.ctx[: len(learner.items)], learner.items.ctx[: len(learner.items)])


def test_seen_pairs_finds_every_history_item_among_repeated_negatives():
    from mfli.learner.loss import seen_columns, seen_pairs, window_pairs

    window = np.array([[-1, 3, 5, 7], [2, 2, 9, 1]])
    ev, col = seen_pairs(*window_pairs(window), np.array([7, 4]), np.array([1, 3, 5, 7, 9, 3]))
    # event 0: 3 (columns 1 and 5) and 5 (column 2), never its own item 7; event 1: 9 and 1
    assert sorted(zip(ev.tolist(), col.tolist(), strict=True)) == [(0, 1), (0, 2), (0, 5), (1, 0), (1, 4)]
    # distinct sorted negatives (the full softmax): the same pairs from the row -> column table
    ev, col = seen_columns(*window_pairs(window), np.array([7, 4]), np.array([1, 3, 5, 7, 9]))
    assert sorted(zip(ev.tolist(), col.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 0), (1, 4)]
    assert window_pairs(window, first_event=5)[0].tolist() == [5, 5, 5, 6, 6, 6, 6]


@pytest.mark.parametrize("facets", [1, 3])
def test_masked_history_negatives_do_not_move_the_loss(facets):
    """A masked item's score has no influence on the loss; an unmasked one does."""
    from mfli.learner.loss import full_softmax

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, facets, 8, generator=g), dim=2)
    items = torch.nn.functional.normalize(torch.randn(10, facets, 8, generator=g), dim=2)
    gates = torch.log_softmax(torch.randn(4, facets, generator=g), dim=1)
    target = torch.tensor([0, 1, 2, 3])
    masked = (np.array([0, 0]), np.array([5, 6]))
    base, _ = full_softmax(q, gates, items, target, 0.1, masked)
    moved = items.clone()
    moved[5] = q[0]  # item 5 now scores highest for event 0 in every facet
    again, _ = full_softmax(q, gates, moved, target, 0.1, masked)
    assert torch.allclose(base[0], again[0])
    unmasked, _ = full_softmax(q, gates, moved, target, 0.1, None)
    assert unmasked[0] > base[0] + 0.1


def test_the_fused_masked_cross_entropy_has_autograd_s_values_and_gradients():
    """learner/loss.py ``MaskedCrossEntropy`` (logits, softmax and their gradient in one buffer) against
    autograd on the plain expression, with masked pairs, in float64."""
    from mfli.learner.loss import MaskedCrossEntropy

    g = torch.Generator().manual_seed(1)
    qs = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    items = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.tensor([0, 3, 3, 8, 1, 2])
    ev, col = torch.tensor([0, 0, 2, 5]), torch.tensor([4, 7, 1, 8])
    w = torch.randn(6, dtype=torch.float64, generator=g)
    fused = MaskedCrossEntropy.apply(qs, items, target, ev, col)
    logits = (qs @ items.t()).index_put((ev, col), torch.tensor(-1.0e4, dtype=torch.float64))
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(fused, plain, atol=1e-10)
    got = torch.autograd.grad((fused * w).sum(), (qs, items))
    want = torch.autograd.grad((plain * w).sum(), (qs, items))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: MaskedCrossEntropy.apply(a, b, target, ev, col), (qs, items))
    # with a bound on |logit| the row-max pass is skipped: the same values
    bounded = MaskedCrossEntropy.apply(qs, items, target, ev, col, float((qs @ items.t()).abs().max()) + 1)
    assert torch.allclose(bounded, plain, atol=1e-10)


def _smoothed_reference(logits: torch.Tensor, target: torch.Tensor, eps: float, left_out: torch.Tensor
                        ) -> torch.Tensor:
    """Cross-entropy against an explicit ``(1 - eps) * one-hot + eps * uniform over the columns left in``."""
    soft = (~left_out).to(logits.dtype)
    soft = eps * soft / soft.sum(1, keepdim=True)
    soft[torch.arange(len(target)), target] += 1.0 - eps
    return -(soft * logits.log_softmax(1)).sum(1)


def test_label_smoothing_spreads_the_target_over_the_items_left_in_on_both_softmax_paths():
    """``model.label_smoothing``: the fused one-facet op and the multi-facet path train against
    ``(1 - eps) * one-hot + eps * uniform`` over the columns left in (a left-out pair, even listed twice,
    gets neither target mass nor gradient), matching autograd on an explicit soft target in float64."""
    from mfli.learner.loss import MaskedCrossEntropy, full_softmax

    g = torch.Generator().manual_seed(3)
    qs = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    items = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.tensor([0, 3, 3, 8, 1, 2])
    ev, col = torch.tensor([0, 0, 2, 5, 0]), torch.tensor([4, 7, 1, 8, 4])  # (0, 4) twice
    left_out = torch.zeros(6, 9, dtype=torch.bool)
    left_out[ev, col] = True
    w = torch.randn(6, dtype=torch.float64, generator=g)
    fused = MaskedCrossEntropy.apply(qs, items, target, ev, col, None, False, 0.2)
    logits = (qs @ items.t()).masked_fill(left_out, -1.0e4)
    plain = _smoothed_reference(logits, target, 0.2, left_out)
    assert torch.allclose(fused, plain, atol=1e-10)
    got = torch.autograd.grad((fused * w).sum(), (qs, items))
    want = torch.autograd.grad((plain * w).sum(), (qs, items))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: MaskedCrossEntropy.apply(a, b, target, ev, col, None, False, 0.2),
                                    (qs, items))
    # smoothing moves the loss (it is not plain cross-entropy) and 0 is plain cross-entropy
    assert not torch.allclose(fused, MaskedCrossEntropy.apply(qs, items, target, ev, col))
    # the multi-facet path (torch's kernels) agrees facet by facet with the same reference
    q3 = torch.nn.functional.normalize(torch.randn(6, 2, 5, dtype=torch.float64, generator=g), dim=2)
    it3 = torch.nn.functional.normalize(torch.randn(9, 2, 5, dtype=torch.float64, generator=g), dim=2)
    gates = torch.log_softmax(torch.randn(6, 2, dtype=torch.float64, generator=g), dim=1)
    _, per = full_softmax(q3, gates, it3, target, 0.1, (ev.numpy(), col.numpy()), smoothing=0.2)
    for f in range(2):
        z = (q3[:, f] @ it3[:, f].t() / 0.1).masked_fill(left_out, -1.0e4)
        assert torch.allclose(per[:, f], _smoothed_reference(z, target, 0.2, left_out), atol=1e-8)


def test_the_bfloat16_softmax_stays_within_bfloat16_rounding_of_float32():
    """``model.softmax_precision = bfloat16``: the three products of :class:`MaskedCrossEntropy` in bfloat16
    (float32 accumulation), the rest in float32. Loss and gradients stay within bfloat16's rounding
    (8 significant bits) of the float32 op's, at the learner's scale (unit vectors over tau 0.1)."""
    from mfli.learner.loss import MaskedCrossEntropy

    g = torch.Generator().manual_seed(2)
    qs = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1) / 0.1
    items = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    target = torch.randint(0, 300, (64,), generator=g)
    ev, col = torch.tensor([0, 1, 5]), torch.tensor([7, 8, 9])
    out = []
    for bf16 in (False, True):
        a, b = qs.clone().requires_grad_(True), items.clone().requires_grad_(True)
        loss = MaskedCrossEntropy.apply(a, b, target, ev, col, 10.0, bf16)
        loss.sum().backward()
        out.append((loss.detach(), a.grad, b.grad))
    (l32, q32, i32), (l16, q16, i16) = out
    # ``auto`` (the default) is bfloat16 exactly where the CPU has native bfloat16 dot products
    from mfli.config import native_bf16

    flags = open("/proc/cpuinfo").read().split()
    assert native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert ModelSettings().softmax_bf16 == native_bf16()
    assert ModelSettings(softmax_precision="bfloat16").softmax_bf16
    assert not ModelSettings(softmax_precision="float32").softmax_bf16
    assert not torch.equal(q16, q32), "the bfloat16 path ran"
    assert torch.allclose(l16, l32, atol=0.05, rtol=0.01)
    for lo, hi in ((q16, q32), (i16, i32)):
        assert float((lo - hi).norm() / hi.norm()) < 0.01


def test_a_row_no_step_touched_can_still_be_marked_and_drained():
    """Found by the fuzz test on a loaded machine: an item created by an event whose user had no history
    yet is never touched by a step, yet the publisher's prior refresh may mark it changed."""
    lr = MFLILearner(ModelSettings(members=1, facets=1, dim=8, history=4, warmup_events=10_000))
    for i in range(5):
        lr.learn_columns([f"new-user-{i}"], [f"item-{i}"], np.ones(1, np.float32), np.asarray([i], np.int64))
    assert lr.step == 5 and len(lr.items) == 5
    lr.drain_changed()
    lr.mark_changed([4], event_ts=-1)
    (delta,) = lr.drain_changed()
    assert delta.item_id == "item-4" and delta.version == 0


def test_a_micro_batch_larger_than_step_events_is_learned_as_consecutive_steps():
    """step_events splits a micro-batch into ceil(n / step_events) near-equal steps in stream order: the
    same state, step for step, as handing the learner those parts one by one (the stats add up)."""
    users, items, values, ts, tags = clustered_stream(n_events=900)
    split = MFLILearner(small_settings(step_events=200))
    whole = MFLILearner(small_settings(step_events=0))
    for learner in (split, whole):
        learner.upsert_items(tags)
    stats = split.learn_columns(users, items, values, ts)
    parts = [whole.learn_columns(users[a:a + 180], items[a:a + 180], values[a:a + 180], ts[a:a + 180])
             for a in range(0, 900, 180)]
    assert split.step == whole.step == 5
    assert stats.events == 900 and stats.trained == sum(p.trained for p in parts) > 0
    assert stats.loss == parts[-1].loss
    assert torch.equal(split.items.emb, whole.items.emb)
    for a, b in zip(split.tower.encoder.parameters(), whole.tower.encoder.parameters(), strict=True):
        assert torch.equal(a, b)


def test_answers_come_from_a_moving_average_of_the_trained_weights():
    """``model.serving_average``: steps move the raw rows and encoder; what is published, indexed and
    queried is their per-step moving average (rows normalised per facet); 0 serves the raw weights."""
    cols = clustered_stream(n_events=2_000, seed=5)
    # sampled negatives, so that a step leaves some rows untouched
    learner = MFLILearner(small_settings(serving_average=0.9, full_softmax_items=0, uniform_negatives=32))
    feed(learner, cols, 0, 1_000)
    cat, tower = learner.items, learner.tower
    avg0, enc0 = cat.avg[: len(cat)].clone(), {k: v.clone() for k, v in tower.average.state_dict().items()}
    step0 = learner.step
    feed(learner, cols, 1_000, 1_256)
    assert learner.step == step0 + 1
    n = len(avg0)  # rows created by the step start their average at their first vector
    touched = torch.from_numpy(learner.row_version[:n] == learner.step)
    assert 0 < int(touched.sum()) < n
    expect = torch.where(touched[:, None], 0.9 * avg0 + 0.1 * cat.emb[:n], avg0)
    torch.testing.assert_close(cat.avg[:n], expect, rtol=0, atol=1e-6)
    raw = tower.encoder.state_dict()
    for k, v in tower.average.state_dict().items():
        torch.testing.assert_close(v, 0.9 * enc0[k] + 0.1 * raw[k], rtol=0, atol=1e-6)
    # (wk.bias never gets a gradient: a constant over the window's positions, the softmax ignores it)
    moved = [k for k, v in tower.average.state_dict().items() if not torch.equal(v, raw[k])]
    assert len(moved) >= len(raw) - 1
    n = len(cat)
    served = cat.normalise(cat.avg[:n]).view(n, learner.settings.facets, -1).numpy()
    snap = learner.snapshot()
    np.testing.assert_allclose(snap.vectors, served, atol=1e-6)
    assert not np.allclose(snap.vectors, cat.vectors().numpy(), atol=1e-3)
    for d in learner.drain_changed()[:10]:
        np.testing.assert_allclose(d.vectors, served[d.row], atol=1e-6)
    weights = learner.query_model().weights
    for k, v in tower.average.state_dict().items():
        np.testing.assert_array_equal(weights[k], v.numpy())
    off = MFLILearner(small_settings(serving_average=0.0))
    feed(off, cols, 0, 1_000)
    assert off.items.avg.shape[0] == 0 and off.tower.average is None
    np.testing.assert_array_equal(off.snapshot().vectors, off.items.vectors().numpy())
