"""IndexWriter over a real LMDB: replay no-op, drift, deletes, checker, equivalence with the memory index."""

import lmdb
import numpy as np
import pytest

from mfli import metrics
from mfli.config import IndexSettings
from mfli.deltas import CodebookSnapshot, DeltaBatch
from mfli.indexer.check import check_index
from mfli.retrieval.base import Query
from mfli.retrieval.learned import LearnedIndexRetriever
from mfli.retrieval.memory import MemoryIndexView
from mfli.retrieval.snapshot import ItemSnapshot
from mfli.storage.index import layout as L
from mfli.storage.index.full_pass import encode
from mfli.storage.index.writer import IndexWriter

F, D, LV, M = 3, 16, 2, 8
SETTINGS = IndexSettings(map_size=1 << 28, target_cluster_size=16)


def _catalogue(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cb = (0.4 * rng.normal(size=(F, LV, M, D))).astype(np.float32)
    centers = rng.normal(size=(20, F, D))
    v = (centers[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, F, D))).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    codes = np.stack([encode(v[:, f], cb[f]) for f in range(F)], axis=1)
    prior = rng.random(n).astype(np.float32)
    return cb, v, codes, prior


def _batch(rows, v, codes, prior, version=1, deleted=None) -> DeltaBatch:
    rows = np.asarray(rows, dtype=np.int64)
    n = rows.size
    return DeltaBatch([f"i{r}" for r in rows.tolist()], rows, np.full(n, version, np.int64),
                      np.full(n, 1_000, np.int64), v[rows], codes[rows], prior[rows],
                      np.zeros(n, bool) if deleted is None else deleted, [])


def _dump(path_or_env) -> dict[str, dict[bytes, bytes]]:
    """Every sub-db except the per-commit counters and change log, for state comparisons."""
    env = path_or_env
    out = {}
    with env.begin() as txn:
        for name in L.DB_NAMES:
            db = env.open_db(name.encode(), txn=txn, create=False)
            out[name] = {k: v for k, v in txn.cursor(db=db)}
    for key in (b"index_version", b"offsets", b"full_pass_ts", b"clusters_version"):  # counters, clocks
        out["meta"].pop(key, None)
    out.pop("chg")  # per-commit change log, like index_version
    for key, value in list(out["rec"].items()):  # update_ts is wall-clock time
        rec = np.frombuffer(value, dtype=L.record_dtype(F, LV)).copy()
        rec["update_ts"] = 0
        out["rec"][key] = rec.tobytes()
    return out


@pytest.fixture
def writer(tmp_path):
    w = IndexWriter(tmp_path / "index", SETTINGS)
    yield w
    w.close()


def test_replay_is_a_no_op(writer):
    cb, v, codes, prior = _catalogue(600)
    writer.apply(_batch(range(600), v, codes, prior), {"t:0": 10}, [CodebookSnapshot(1, cb)])
    before = _dump(writer.env)
    result = writer.apply(_batch(range(600), v, codes, prior), {"t:0": 10}, [CodebookSnapshot(1, cb)])
    assert result.applied == 0 and result.skipped == 600
    assert _dump(writer.env) == before
    assert check_index(writer.reader(), SETTINGS).ok


def test_drift_moves_postings_and_counts_reassignments(writer):
    cb, v, codes, prior = _catalogue(600)
    writer.apply(_batch(range(600), v, codes, prior), {"t:0": 1}, [CodebookSnapshot(1, cb)])
    index = writer.reader()
    with index.view() as view:
        old = view.clusters_of(np.arange(600))
    # items 0..49 take the vectors and codes of items far away in facet 0
    far = np.array([int(np.flatnonzero(old[:, 0] != old[i, 0])[-1]) for i in range(50)])
    v2, codes2 = v.copy(), codes.copy()
    v2[:50], codes2[:50] = v[far], codes[far]
    before = metrics.REGISTRY.get_sample_value("mfli_index_reassignments_total", {"facet": "0"}) or 0.0
    result = writer.apply(_batch(range(50), v2, codes2, prior, version=2), {"t:0": 2})
    assert result.applied == 50 and result.moved[0] > 0
    after = metrics.REGISTRY.get_sample_value("mfli_index_reassignments_total", {"facet": "0"})
    assert after - before == result.moved[0]
    with index.view() as view:
        new = view.clusters_of(np.arange(600))
        moved = np.flatnonzero(new[:, 0] != old[:, 0])
        assert moved.size == result.moved[0]
        for row in moved.tolist():
            assert row in view.members(0, int(new[row, 0]), 10_000)
            assert row not in view.members(0, int(old[row, 0]), 10_000)
    assert check_index(index, SETTINGS).ok


def test_delete_leaves_postings_at_once(writer):
    cb, v, codes, prior = _catalogue(300)
    writer.apply(_batch(range(300), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
    index = writer.reader()
    with index.view() as view:
        cluster = view.clusters_of(np.array([7]))[0]
    writer.apply(_batch([7], v, codes, prior, version=2, deleted=np.array([True])), {"t:0": 3})
    with index.view() as view:
        assert 7 not in view.live_rows()
        assert all(7 not in view.members(f, int(cluster[f]), 10_000) for f in range(F))
        assert view.clusters_of(np.array([7])).tolist() == [[-1, -1, -1]]
        assert view.item("i7").deleted and 7 not in view.trending(1000)
    assert check_index(index, SETTINGS).ok
    # an older delta for the deleted item (a replay) does not resurrect it
    assert writer.apply(_batch([7], v, codes, prior, version=1), {}).skipped == 1


def test_offsets_stored_and_only_move_forward(writer):
    cb, v, codes, prior = _catalogue(50)
    writer.apply(_batch(range(50), v, codes, prior), {"t:0": 5, "t:1": 9}, [CodebookSnapshot(1, cb)])
    writer.apply(None, {"t:0": 3})
    with writer.reader().view() as view:
        assert view.offsets() == {"t:0": 5, "t:1": 9}


def test_checker_catches_corrupted_posting_list(writer):
    cb, v, codes, prior = _catalogue(300)
    writer.apply(_batch(range(300), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
    with writer.reader().view() as view:
        c = int(view.clusters_of(np.array([5]))[0, 1])
    with writer.env.begin(write=True) as txn:
        db = writer.db["post"]
        rows = np.frombuffer(txn.get(L.post_key(1, c), db=db), dtype="<i8")
        txn.put(L.post_key(1, c), rows[rows != 5].tobytes(), db=db)  # row 5 lost from its list
        txn.put(L.post_key(1, 10_000), np.array([5, 5], "<i8").tobytes(), db=db)  # duplicated elsewhere
    report = check_index(writer.reader(), SETTINGS)
    assert not report.ok
    assert any("row 5" in msg for msg in report.violations)


def test_lmdb_index_matches_memory_index_on_the_same_state(writer):
    n = 800
    cb, v, codes, prior = _catalogue(n, seed=3)
    writer.apply(_batch(range(n), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
    writer.full_pass()
    snap = ItemSnapshot(np.array([f"i{i}" for i in range(n)], dtype=object), v, codes, cb, prior,
                        np.ones(n, bool))
    mem = MemoryIndexView.from_settings(snap, SETTINGS)
    with writer.reader().view() as view:
        rows = np.arange(n)
        assert np.array_equal(view.clusters_of(rows), mem.clusters_of(rows))
        for f in range(F):
            for c in range(0, len(mem.clusters[f].centroids), 3):
                assert np.array_equal(view.members(f, c, 20), mem.members(f, c, 20))
            path = tuple(codes[0, f])
            assert np.array_equal(view.path_clusters(f, path), mem.path_clusters(f, path))
        assert np.array_equal(view.trending(50), mem.trending(50))
        lmdb_ret, mem_ret = LearnedIndexRetriever(view), LearnedIndexRetriever(mem)
        for user in range(10):
            q = Query(history=np.arange(user * 7, user * 7 + 5, dtype=np.int64), k=20)
            a, b = lmdb_ret.recommend(q), mem_ret.recommend(q)
            assert np.array_equal(a.rows, b.rows) and np.allclose(a.scores, b.scores)


def test_writer_reopens_from_lmdb(tmp_path):
    cb, v, codes, prior = _catalogue(200)
    w = IndexWriter(tmp_path / "ix", SETTINGS)
    w.apply(_batch(range(200), v, codes, prior), {"t:0": 4}, [CodebookSnapshot(1, cb)])
    sizes = [fc.sizes.copy() for fc in w.clusters]
    w.close()
    w2 = IndexWriter(tmp_path / "ix", SETTINGS)
    try:
        assert w2.offsets == {"t:0": 4} and w2.n_live == 200
        assert all(np.array_equal(a, fc.sizes) for a, fc in zip(sizes, w2.clusters, strict=True))
        assert w2.apply(_batch(range(200), v, codes, prior), {}).skipped == 200
    finally:
        w2.close()
    assert isinstance(lmdb.version(), tuple)


@pytest.mark.slow  # two CLI subprocesses; the CLI imports every subcommand's module
def test_check_cli_exit_status(tmp_path):
    import subprocess
    import sys

    cb, v, codes, prior = _catalogue(300)
    w = IndexWriter(tmp_path / "ix", SETTINGS)
    w.apply(_batch(range(300), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
    w.close()
    cmd = [sys.executable, "-m", "mfli.orchestration.cli", "index", "check", "--path", str(tmp_path / "ix"),
           "--min-in-bounds", "0"]
    env = {"MFLI_INDEX__TARGET_CLUSTER_SIZE": "16", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert '"ok": true' in ok.stdout
    w = IndexWriter(tmp_path / "ix", SETTINGS)
    with w.env.begin(write=True) as txn:  # drop one whole posting list
        key = next(iter(txn.cursor(db=w.db["post"])))[0]
        txn.delete(key, db=w.db["post"])
    w.close()
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and '"ok": false' in bad.stdout


def test_load_snapshot_indexes_a_learner_state_and_exports_cluster_metrics(writer):
    n = 500
    cb, v, codes, prior = _catalogue(n, seed=9)
    live = np.ones(n, bool)
    live[::10] = False
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    snap = ItemSnapshot(ids, v, codes, cb, prior, live, version=4)
    writer.load_snapshot(snap)
    mem = MemoryIndexView.from_settings(snap, SETTINGS)
    with writer.reader().view() as view:
        rows = snap.live_rows()
        assert np.array_equal(view.live_rows(), rows)
        assert np.array_equal(view.clusters_of(rows), mem.clusters_of(rows))
    assert check_index(writer.reader(), SETTINGS).ok
    clusters = metrics.REGISTRY.get_sample_value("mfli_index_clusters", {"facet": "0"})
    assert clusters == len(mem.clusters[0].centroids)


def test_change_log_lists_the_rows_each_commit_changed(writer):
    cb, v, codes, prior = _catalogue(100)
    writer.apply(_batch(range(100), v, codes, prior), {}, [CodebookSnapshot(1, cb)])  # + bootstrap pass
    start = writer.index_version
    writer.apply(_batch([3, 5], v, codes, prior, version=2), {})
    writer.apply(_batch([5, 9], v, codes, prior, version=3), {})
    writer.apply(_batch([9], v, codes, prior, version=3), {})  # replay: version bumps, no rows change
    with writer.reader().view() as view:
        assert view.changed_since(start).tolist() == [3, 5, 9]
        assert view.changed_since(start + 1).tolist() == [5, 9]
        assert view.changed_since(view.version).size == 0
        assert view.oldest_change() == 1
        rows, rec, vec = view.scan_all()
        assert rows.tolist() == list(range(100)) and np.allclose(vec, v)


def test_codebook_growing_keeps_working_and_asks_for_a_full_pass(writer):
    """The learner grows M with the catalogue (seen in the freshness benchmark: 8 -> 11 codewords)."""
    cb, v, codes, prior = _catalogue(300)
    writer.apply(_batch(range(300), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
    rng = np.random.default_rng(1)
    bigger = np.concatenate([cb, (0.4 * rng.normal(size=(F, LV, 3, D))).astype(np.float32)], axis=2)
    new_codes = np.stack([encode(v[:, f], bigger[f]) for f in range(F)], axis=1)
    writer.apply(_batch(range(50), v, new_codes, prior, version=2), {}, [CodebookSnapshot(2, bigger)])
    assert writer.full_pass_wanted
    assert check_index(writer.reader(), SETTINGS).ok  # items on never-seen paths got clusters + path entries
    writer.full_pass()
    assert not writer.full_pass_wanted
    with writer.reader().view() as view:
        assert view.codebooks().shape == (F, LV, M + 3, D)
        rows = np.arange(300)
        assert np.all(view.clusters_of(rows) >= 0)
    assert check_index(writer.reader(), SETTINGS).ok


def test_index_rows_follow_item_ids_when_the_learner_renumbers(tmp_path):
    """After a learner crash between publishing and checkpointing, a replay may number new items
    differently: item ids, not learner rows, decide where an item lives in the index."""
    from mfli.deltas import ItemDelta

    rng = np.random.default_rng(3)
    writer = IndexWriter(tmp_path / "index", SETTINGS)

    def delta(item: str, row: int, version: int) -> ItemDelta:
        v = rng.normal(size=(F, D)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return ItemDelta(item_id=item, row=row, version=version, event_ts=1, vectors=v,
                         codes=rng.integers(0, M, size=(F, LV)).astype(np.int32), prior=0.1, deleted=False)

    before = [delta(f"a{r}", r, 1) for r in range(5)]
    writer.apply(before, {"u:0": 1})
    # the replayed learner gives a3 row 4 and a new item b0 row 3 (a3's row in the index), in one batch
    after = [delta("a3", 4, 2), delta("b0", 3, 2), delta("b1", 4, 2), delta("a4", 3, 2)]
    writer.apply(after, {"u:0": 2})
    writer.close()
    from mfli.storage.index.reader import LmdbIndex

    index = LmdbIndex(tmp_path / "index")
    with index.view() as view:
        rows = view.rows_of(["a0", "a1", "a2", "a3", "a4", "b0", "b1"])
        assert rows.tolist()[:5] == [0, 1, 2, 3, 4], "known ids keep their rows"
        assert rows[5] >= 5 and rows[6] >= 5 and rows[5] != rows[6], "new ids never take an item's row"
        assert view.item_ids(rows) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
        for item, d in [("a3", after[0]), ("b0", after[1]), ("b1", after[2]), ("a4", after[3])]:
            np.testing.assert_array_equal(view.vectors(view.rows_of([item]))[0], d.vectors)
        assert view.n_live() == 7


def test_assign_rows_keeps_known_ids_and_never_shares_a_row():
    from mfli.storage.index.rows import assign_rows

    exists = np.zeros(16, bool)
    exists[:5] = True  # rows 0..4 hold a0..a4
    known = {f"a{r}": r for r in range(5)}
    ids = ["a3", "b0", "b1", "b0", "c0", "a1"]
    learner = np.array([4, 3, 9, 3, 10, 7])  # b0 wants a3's row, b1 and c0 want free rows
    rows = assign_rows(ids, learner, known, exists)
    assert rows.tolist()[0] == 3 and rows.tolist()[5] == 1, "known ids keep their rows"
    assert rows[1] == rows[3] and rows[1] >= 5, "one row per id, never an occupied one"
    assert rows[2] == 9 and rows[4] == 10, "free learner rows are kept"
    assert len({int(rows[i]) for i in (0, 1, 2, 4, 5)}) == 5


def test_readers_get_the_codebook_in_use_while_a_bigger_one_waits_for_its_full_pass(writer):
    """The learner grows M; until the full pass adopts the new codebook, readers must keep using the old
    one, with its own shape (the server once failed to start in that window)."""
    from mfli.storage.index.reader import LmdbIndex

    cb, v, codes, prior = _catalogue(300, seed=9)
    writer.apply(_batch(range(300), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
    writer.full_pass()
    bigger = np.concatenate([cb, cb[:, :, :3]], axis=2)  # M + 3 codewords
    writer.apply(None, {}, [CodebookSnapshot(2, bigger)])
    with LmdbIndex(writer.path, env=writer.env).view() as view:
        np.testing.assert_array_equal(view.codebooks(), cb)
    writer.full_pass()
    with LmdbIndex(writer.path, env=writer.env).view() as view:
        np.testing.assert_array_equal(view.codebooks(), bigger)


def test_public_read_api_and_the_report_see_what_the_writer_wrote(tmp_path):
    """The reader API the checker and the reports use (records, posting lists, path map, versions)
    returns exactly the writer's state, and the demo report's index statistics are derived from it."""
    from mfli.orchestration.report import lmdb_index_stats
    from mfli.retrieval.clusters import path_keys

    cb, v, codes, prior = _catalogue(600, seed=3)
    writer = IndexWriter(tmp_path / "index", SETTINGS)
    writer.apply(_batch(range(600), v, codes, prior), {}, [CodebookSnapshot(4, cb)])  # bootstraps clusters
    gone = np.arange(0, 600, 60)
    writer.apply(_batch(gone, v, codes, prior, version=2, deleted=np.ones(gone.size, bool)), {})
    live = np.setdiff1d(np.arange(600), gone)
    with writer.reader().view() as view:
        assert view.codebook_version() == 4 and view.clusters_version() == 1
        rows, rec = view.scan_records()
        assert rows.tolist() == list(range(600))
        assert np.flatnonzero(rec["deleted"]).tolist() == gone.tolist()
        assert np.allclose(rec["prior"][live], prior[live])
        clusters = view.clusters_of(live)
        lists = list(view.postings())
        for f in range(F):
            members = {int(r): c for ff, c, rs in lists if ff == f for r in rs.tolist()}
            assert sorted(members) == live.tolist()  # every live row in exactly one list, no deleted row
            assert [members[r] for r in live.tolist()] == clusters[:, f].tolist()
            keys, ids = view.path_map(f)
            pairs = set(zip(keys.tolist(), ids.tolist(), strict=True))
            assert set(zip(path_keys(codes[live, f]).tolist(), clusters[:, f].tolist(), strict=True)) <= pairs
    writer.close()
    sizes, counts = lmdb_index_stats(tmp_path / "index", SETTINGS.map_size)
    assert sorted(sizes) == list(range(F)) and all(int(sizes[f].sum()) == live.size for f in range(F))
    for f in range(F):
        for lv in range(LV):
            assert counts[(f, lv)].tolist() == np.bincount(codes[live, f, lv], minlength=M).tolist()
