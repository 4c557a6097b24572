"""Train -> checkpoint -> restore -> continue equals uninterrupted training, bit for bit."""

import numpy as np
import torch

from mfli.config import ModelSettings
from mfli.learner.checkpoint import load_checkpoint, save_checkpoint
from mfli.learner.learner import MFLILearner

from learner_streams import clustered_stream


def _settings() -> ModelSettings:
    # warm-up and level activation fall inside the run, so codebook state crosses the checkpoint
    return ModelSettings(members=1, dim=16, history=10, warmup_events=1_500, level_interval_events=1_000,
                         negatives=64, usage_interval_steps=3, dead_code_window=2, seed=11)


def _feed(learner, cols, lo, hi, batch=250):
    users, items, values, ts, _ = cols
    for s in range(lo, hi, batch):
        learner.learn_columns(users[s:s + batch], items[s:s + batch], values[s:s + batch], ts[s:s + batch])


def test_restore_and_continue_equals_never_stopping(tmp_path):
    torch.set_num_threads(2)
    cols = clustered_stream(n_events=4_000, seed=2)
    straight = MFLILearner(_settings())
    straight.upsert_items(cols[4])
    _feed(straight, cols, 0, 4_000)

    first = MFLILearner(_settings())
    first.upsert_items(cols[4])
    _feed(first, cols, 0, 2_000)
    path = save_checkpoint(first, tmp_path / "learner.ckpt", offsets={"mfli.events": {"0": 2_000}})
    assert not list(tmp_path.glob("*.tmp"))
    del first
    resumed, offsets = load_checkpoint(path)
    assert offsets == {"mfli.events": {"0": 2_000}}
    _feed(resumed, cols, 2_000, 4_000)

    a, b = straight.state_dict(), resumed.state_dict()
    assert straight.rq.active == 2
    for key in ("emb", "acc", "codes", "avg"):
        assert torch.equal(a["items"][key], b["items"][key]), key
    assert a["items"]["avg"].shape == a["items"]["emb"].shape  # the served average crosses the checkpoint
    for key, value in a["tower"]["average"].items():
        assert torch.equal(value, b["tower"]["average"][key]), key
    assert torch.equal(straight.rq.codebooks, resumed.rq.codebooks)
    assert torch.equal(straight.rq.adagrad, resumed.rq.adagrad)
    np.testing.assert_array_equal(straight.prior(), resumed.prior())
    np.testing.assert_array_equal(straight.freq.values(), resumed.freq.values())
    assert a["users"] == b["users"]
    assert a["rng"] == b["rng"]
    assert [(d.row, d.version) for d in straight.drain_changed()] == \
        [(d.row, d.version) for d in resumed.drain_changed()]


def test_checkpoint_replaces_the_old_file_atomically(tmp_path):
    learner = MFLILearner(_settings())
    learner.learn_columns(["u", "u"], ["a", "b"], np.ones(2, np.float32), np.arange(2))
    path = save_checkpoint(learner, tmp_path / "c.ckpt", offsets={"p": 1})
    save_checkpoint(learner, path, offsets={"p": 2})
    assert load_checkpoint(path)[1] == {"p": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]
