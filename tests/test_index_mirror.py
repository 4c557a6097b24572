"""The server's dense mirror of the index follows deltas and full passes exactly (DESIGN §4 readers)."""

from __future__ import annotations

import numpy as np

from mfli.config import IndexSettings
from mfli.deltas import ItemDelta
from mfli.indexer.writer import IndexWriter
from mfli.storage.index_lmdb import LmdbIndex

F, D, L, M = 2, 8, 2, 4


def _delta(row: int, version: int, rng, deleted: bool = False) -> ItemDelta:
    v = rng.normal(size=(F, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return ItemDelta(item_id=f"i{row}", row=row, version=version, event_ts=1, vectors=v,
                     codes=rng.integers(0, M, size=(F, L)).astype(np.int32), prior=float(rng.uniform()),
                     deleted=deleted)


def _same(mirrored, plain, rows) -> None:
    with mirrored.view() as a, plain.view() as b:
        assert a._m is not None, "the mirror must serve this view"
        assert a.version == b.version
        np.testing.assert_array_equal(a.vectors(rows), b.vectors(rows))
        np.testing.assert_array_equal(a.prior(rows), b.prior(rows))
        np.testing.assert_array_equal(a.clusters_of(rows), b.clusters_of(rows))
        np.testing.assert_array_equal(a.live_rows(), b.live_rows())


def test_mirror_tracks_deltas_deletes_growth_and_full_passes(tmp_path):
    from mfli.deltas import CodebookSnapshot

    rng = np.random.default_rng(0)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=4)
    writer = IndexWriter(settings.path, settings)
    books = rng.normal(size=(F, L, M, D)).astype(np.float32)
    writer.apply([_delta(r, 1, rng) for r in range(40)], {"u:0": 1}, [CodebookSnapshot(1, books)])
    mirrored = LmdbIndex(settings.path, env=writer.env, mirror=True)
    plain = LmdbIndex(settings.path, env=writer.env)
    _same(mirrored, plain, np.arange(40))
    loads = mirrored.mirror.full_loads
    # deltas: changed rows, a delete, and rows beyond the mirror's capacity
    writer.apply([_delta(r, 2, rng) for r in (3, 5)] + [_delta(7, 2, rng, deleted=True)]
                 + [_delta(r, 2, rng) for r in range(2000, 2003)], {"u:0": 2})
    _same(mirrored, plain, np.array([3, 5, 7, 2000, 2001, 2002, 0]))
    assert mirrored.mirror.full_loads == loads and mirrored.mirror.delta_syncs >= 1
    with mirrored.view() as view:
        assert 7 not in view.live_rows() and 2002 in view.live_rows()
    writer.full_pass()
    _same(mirrored, plain, np.arange(40))
    assert mirrored.mirror.full_loads == loads + 1, "a full pass swaps in freshly loaded arrays"
