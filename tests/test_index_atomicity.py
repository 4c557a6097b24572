"""Full-pass atomicity: readers see the old index or the new one, never a mix."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np

from mfli.deltas import CodebookSnapshot
from mfli.storage.index.writer import IndexWriter

from test_index_writer import SETTINGS, _batch, _catalogue

F = 3


def _consistent(view, rows) -> bool:
    clusters = view.clusters_of(rows)
    for f in range(F):
        for c in np.unique(clusters[:, f]).tolist():
            members = view.members(f, c, 1_000_000)
            if not set(rows[clusters[:, f] == c].tolist()) <= set(members.tolist()):
                return False
    return True


def test_reader_holding_a_txn_keeps_the_old_state_through_a_full_pass(tmp_path):
    cb, v, codes, prior = _catalogue(1500, seed=5)
    writer = IndexWriter(tmp_path / "ix", SETTINGS)
    try:
        writer.apply(_batch(range(1500), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
        index = writer.reader()
        rows = np.arange(1500)
        old_view = index.view()
        before = old_view.clusters_of(rows).copy()
        # a new codebook changes every code path, so the full pass changes the clusters
        cb2 = np.roll(cb, 1, axis=2)
        writer.apply(None, {}, [CodebookSnapshot(2, cb2)])
        writer.full_pass()
        assert np.array_equal(old_view.clusters_of(rows), before)
        assert _consistent(old_view, rows)
        old_view.close()
        with index.view() as new_view:
            after = new_view.clusters_of(rows)
            assert not np.array_equal(after, before)
            assert _consistent(new_view, rows)
    finally:
        writer.close()


READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from mfli.config import IndexSettings
    from mfli.indexer.check import check_index
    from mfli.storage.index.reader import LmdbIndex
    path, done = Path(sys.argv[1]), Path(sys.argv[2])
    index = LmdbIndex(path, 1 << 28)
    checks, bad, versions = 0, [], set()
    while not done.exists() or checks == 0:
        report = check_index(index, IndexSettings(map_size=1 << 28, target_cluster_size=16))
        checks += 1
        if checks == 1:
            (done.parent / "reading").touch()  # the writer starts its passes only now
        versions.add(report.index_version)
        if not report.ok:
            bad.append(report.violations[:3])
    print(json.dumps({"checks": checks, "bad": bad, "versions": len(versions)}))
""")


def test_concurrent_reader_process_never_sees_a_half_applied_pass(tmp_path):
    cb, v, codes, prior = _catalogue(3000, seed=6)
    path, done = tmp_path / "ix", tmp_path / "done"
    writer = IndexWriter(path, SETTINGS)
    try:
        writer.apply(_batch(range(3000), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(done)],
                                  stdout=subprocess.PIPE,
                                  text=True)
        deadline = time.monotonic() + 60
        while not (tmp_path / "reading").exists() and time.monotonic() < deadline and reader.poll() is None:
            time.sleep(0.05)
        rng = np.random.default_rng(0)
        for version in range(2, 10):
            cb_next = np.roll(cb, version, axis=2) if version % 2 else cb
            writer.apply(None, {}, [CodebookSnapshot(version, cb_next)])
            writer.full_pass()
            rows = rng.choice(3000, 300, replace=False)
            writer.apply(_batch(rows, v[::-1], codes[::-1], prior, version=version), {})
        done.touch()
        out = json.loads(reader.communicate(timeout=60)[0])
    finally:
        writer.close()
    assert out["bad"] == []
    assert out["checks"] >= 2 and out["versions"] >= 2


def test_deltas_applied_while_a_pass_computes_are_reconciled(tmp_path):
    from mfli.indexer.check import check_index
    from mfli.storage.index.full_pass import encode

    cb, v, codes, prior = _catalogue(700, seed=8)
    writer = IndexWriter(tmp_path / "ix", SETTINGS)
    try:
        writer.apply(_batch(range(600), v, codes, prior), {}, [CodebookSnapshot(1, cb)])
        cb2 = np.roll(cb, 2, axis=2)
        writer.apply(None, {}, [CodebookSnapshot(2, cb2)])
        prep = writer.prepare_full_pass()  # the snapshot: 600 items, codebook 2
        moved = np.arange(20)
        writer.apply(_batch(moved, v[::-1], codes[::-1], prior, version=2), {})  # far moves
        writer.apply(_batch(range(20, 30), v, codes, prior, version=2, deleted=np.ones(10, bool)), {})
        writer.apply(_batch(range(600, 620), v, codes, prior), {})  # new items
        report = writer.commit_full_pass(prep)
        assert report.reconciled == 40
        index = writer.reader()
        assert check_index(index, SETTINGS).ok
        with index.view() as view:
            live = view.live_rows()
            assert not set(range(20, 30)) & set(live.tolist()) and set(range(600, 620)) <= set(live.tolist())
            assert np.array_equal(view.vectors(moved), v[::-1][moved])  # not the stale snapshot state
            rec = view.records(moved)
            assert np.array_equal(rec["codes"][:, 0], encode(v[::-1][moved, 0], cb2[0]))
            assert rec["version"].tolist() == [2] * 20
    finally:
        writer.close()
