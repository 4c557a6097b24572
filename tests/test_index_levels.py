"""A codebook level the learner activates later (delayed start) makes the indexer ask for a full pass."""

import numpy as np

from mfli.config import IndexSettings
from mfli.deltas import CodebookSnapshot, ItemDelta
from mfli.storage.index.writer import IndexWriter


def test_new_active_level_requests_a_full_pass(tmp_path):
    rng = np.random.default_rng(0)
    books = rng.normal(size=(2, 2, 4, 8)).astype(np.float32)
    coarse_only = books.copy()
    coarse_only[:, 1] = 0.0  # level 1 not active yet
    writer = IndexWriter(tmp_path / "index", IndexSettings(path=tmp_path / "index"))
    delta = ItemDelta(item_id="a", row=0, version=1, event_ts=1, vectors=np.ones((2, 8), np.float32) / np.sqrt(8),
                      codes=np.zeros((2, 2), np.int32), prior=0.0)
    writer.apply([delta], {"t:0": 1}, [CodebookSnapshot(1, coarse_only)])
    writer.full_pass_wanted = False
    writer.apply([], {"t:0": 2}, [CodebookSnapshot(2, coarse_only * 1.01)])
    assert not writer.full_pass_wanted, "a trained-but-same-shape codebook waits for the periodic pass"
    writer.apply([], {"t:0": 3}, [CodebookSnapshot(3, books)])
    assert writer.full_pass_wanted, "level 1 became active"
