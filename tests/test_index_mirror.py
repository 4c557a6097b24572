"""The server's dense mirror of the index follows deltas and full passes exactly (docs/design.md §Index, readers)."""

from __future__ import annotations

import numpy as np

from mfli.config import IndexSettings
from mfli.deltas import ItemDelta
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.writer import IndexWriter

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


def _slots_point_at_current_codes(index: LmdbIndex, expect_cluster_ordered: bool | None = None) -> None:
    """Every posting-list member's code slot holds that row's current int8 codes and prior."""
    from mfli.retrieval.base import quantize_rows

    with index.view() as view:
        dense = view.dense()
        assert dense is not None
        pairs = [(f, c) for f in range(F) for c in range(64)]
        facets = np.array([f for f, _ in pairs] + [0])
        clusters = np.array([c for _, c in pairs] + [10_000])  # the last one has no posting list
        rows, counts, slots = view.members_many(facets, clusters, 256)
        assert counts[-1] == 0 and counts.sum() == rows.size == slots.size > 0
        codes, scale = quantize_rows(view.vectors(rows, use_mirror=False).reshape(rows.size, -1))
        np.testing.assert_array_equal(dense.codes[slots], codes)
        np.testing.assert_allclose(dense.scale[slots], scale)
        np.testing.assert_array_equal(dense.bias[slots], view.records(rows)["prior"])
        ordered = slots < dense.row_slot
        if expect_cluster_ordered is not None:
            assert ordered.all() == expect_cluster_ordered, ordered.mean()


def test_code_slots_follow_deltas_moves_and_full_passes(tmp_path):
    """The rerank reads codes by slot: cluster-ordered copies of the posting lists loaded at the last full
    pass, or a row's own slot. After deltas (vectors change in place, items move, get deleted, arrive)
    every slot must still hold the row's current codes, and a posting list that changed in LMDB must not be
    read from its stale copy."""
    from mfli.deltas import CodebookSnapshot

    rng = np.random.default_rng(4)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=4)
    writer = IndexWriter(settings.path, settings)
    books = rng.normal(size=(F, L, M, D)).astype(np.float32)
    writer.apply([_delta(r, 1, rng) for r in range(60)], {"u:0": 1}, [CodebookSnapshot(1, books)])
    writer.full_pass()
    mirrored = LmdbIndex(settings.path, env=writer.env, mirror=True)
    _slots_point_at_current_codes(mirrored, expect_cluster_ordered=True)
    for version in range(2, 6):  # moves, in-place drift, deletes, new rows
        batch = [_delta(int(r), version, rng) for r in rng.choice(60, 12, replace=False)]
        batch += [_delta(int(r), version, rng, deleted=True) for r in rng.choice(60, 2, replace=False)]
        batch += [_delta(100 + 10 * version + i, version, rng) for i in range(3)]
        writer.apply(batch, {"u:0": version})
        _slots_point_at_current_codes(mirrored)
    writer.full_pass()
    _slots_point_at_current_codes(mirrored, expect_cluster_ordered=True)


def test_id_row_caches_answer_like_lmdb_as_items_arrive(tmp_path):
    """The server caches id <-> row lookups (an id never changes rows); an id unknown at one moment must
    still be found once it arrives, and cached answers must equal uncached ones."""
    from mfli.deltas import CodebookSnapshot

    rng = np.random.default_rng(5)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=4)
    writer = IndexWriter(settings.path, settings)
    writer.apply([_delta(r, 1, rng) for r in range(30)], {"u:0": 1},
                 [CodebookSnapshot(1, rng.normal(size=(F, L, M, D)).astype(np.float32))])
    mirrored = LmdbIndex(settings.path, env=writer.env, mirror=True)
    plain = LmdbIndex(settings.path, env=writer.env)
    ids = [f"i{r}" for r in (3, 7, 29, 40, 41)]
    with mirrored.view() as view:
        assert view.rows_of(ids).tolist() == [3, 7, 29, -1, -1]
        assert view.rows_of(ids).tolist() == [3, 7, 29, -1, -1]  # from the cache this time
        assert view.item_ids(np.array([7, 3])) == ["i7", "i3"]
    writer.apply([_delta(r, 2, rng) for r in (40, 41)], {"u:0": 2})
    with mirrored.view() as view, plain.view() as ref:
        assert view.rows_of(ids).tolist() == ref.rows_of(ids).tolist() == [3, 7, 29, 40, 41]
        assert view.item_ids(np.array([41, 3])) == ref.item_ids(np.array([41, 3])) == ["i41", "i3"]
    assert mirrored.mirror.id_rows["i41"] == 41 and mirrored.mirror.row_ids[41] == "i41"


def test_mirror_serves_posting_lists_and_paths_exactly_as_lmdb(tmp_path):
    """The server reads posting lists not edited since its last full load, and the whole path map, from
    its mirror instead of LMDB. After every commit (moves, deletes, arrivals on paths never seen, drift in
    place) and after full passes, both must answer exactly as LMDB does, in the same order."""
    from mfli.deltas import CodebookSnapshot

    rng = np.random.default_rng(11)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=4)
    writer = IndexWriter(settings.path, settings)
    books = rng.normal(size=(F, L, 8, D)).astype(np.float32)

    def delta(row: int, version: int, codewords: int, deleted: bool = False):
        d = _delta(row, version, rng, deleted)
        d.codes[:] = rng.integers(0, codewords, size=(F, L))
        return d

    writer.apply([delta(r, 1, 4) for r in range(80)], {"u:0": 1}, [CodebookSnapshot(1, books)])
    writer.full_pass()
    mirrored = LmdbIndex(settings.path, env=writer.env, mirror=True)
    plain = LmdbIndex(settings.path, env=writer.env)
    every_path = np.array([[(a, b) for a in range(8) for b in range(8)]] * F)  # [F, 64, L]

    def same() -> None:
        with mirrored.view() as a, plain.view() as b:
            assert a._m is not None and b._m is None
            facets = np.repeat(np.arange(F), 40)
            clusters = np.tile(np.arange(40), F)
            rows_a, counts_a, slots_a = a.members_many(facets, clusters, 256)
            rows_b, counts_b, _ = b.members_many(facets, clusters, 256)
            np.testing.assert_array_equal(rows_a, rows_b)
            np.testing.assert_array_equal(counts_a, counts_b)
            np.testing.assert_array_equal(a.dense().codes[slots_a],
                                          quantize_rows(b.vectors(rows_b).reshape(rows_b.size, -1))[0])
            for got, want in zip(a.paths_clusters(every_path), b.paths_clusters(every_path), strict=True):
                np.testing.assert_array_equal(got, want)

    from mfli.retrieval.base import quantize_rows

    same()
    for version in range(2, 8):
        batch = [delta(int(r), version, 4) for r in rng.choice(80, 10, replace=False)]  # moves + drift
        batch += [delta(int(r), version, 4, deleted=True) for r in rng.choice(80, 2, replace=False)]
        batch += [delta(200 + 10 * version + i, version, 8) for i in range(4)]  # arrivals, new paths
        writer.apply(batch, {"u:0": version})
        same()
        if version == 5:
            writer.full_pass()
            same()
    assert mirrored.mirror.delta_syncs >= 5 and mirrored.mirror.arrays.dirty.any()


def test_encoder_input_cache_follows_item_updates_and_weights_versions(tmp_path):
    """The server's per-item encoder inputs (mfli.retrieval.inputs) give exactly the uncached query, and
    are recomputed for an item whose vector a delta changed, after a full pass, and for new weights."""
    from mfli.deltas import CodebookSnapshot
    from mfli.retrieval.base import Query, resolve_query
    from mfli.retrieval.query_model import QueryModel

    rng = np.random.default_rng(1)
    settings = IndexSettings(path=tmp_path / "index", target_cluster_size=4)
    writer = IndexWriter(settings.path, settings)
    books = rng.normal(size=(F, L, M, D)).astype(np.float32)
    parts = [QueryModel.random(facets=1, dim=D, horizon=6, heads=2, seed=s) for s in (0, 1)]
    model = QueryModel.ensemble(parts, version=1)
    writer.apply([_delta(r, 1, rng) for r in range(40)], {"u:0": 1}, [CodebookSnapshot(1, books)], models=[model])
    index = LmdbIndex(settings.path, env=writer.env, mirror=True)
    history = np.array([3, 9, 3, 12, 5, 30, 7], np.int64)  # longer than the horizon, with a repeat
    ts = np.arange(history.size, dtype=np.int64) * 45_000

    def check(expect_misses: int) -> None:
        with index.view() as view:
            served = view.query_model()
            assert served is not None
            old = index.mirror._inputs
            before = old.misses if old is not None else 0
            q, g, _ = resolve_query(view, Query(history=history, k=5, history_ts=ts), served, 6, 0.97)
            cache = index.mirror._inputs
            assert cache is not None and cache.misses - before == expect_misses
            recent = history[-6:]
            rq, rg = served.query(view.vectors(recent, use_mirror=False).reshape(recent.size, -1), ts[-6:])
            np.testing.assert_allclose(q, rq, atol=1e-6)
            np.testing.assert_allclose(g, rg, atol=1e-6)

    check(expect_misses=6)  # every row of the window is new to the cache (row 3 only once before: 9,3,12,5,30,7)
    check(expect_misses=0)
    writer.apply([_delta(12, 2, rng)], {"u:0": 2})  # one history item's vector changes
    check(expect_misses=1)
    writer.full_pass()  # a full reload stamps every row afresh
    check(expect_misses=6)
    parts = [QueryModel.random(facets=1, dim=D, horizon=6, heads=2, seed=s) for s in (2, 3)]
    writer.apply(None, {"u:0": 3}, models=[QueryModel.ensemble(parts, version=2)])
    check(expect_misses=6)  # new weights: every entry is recomputed
