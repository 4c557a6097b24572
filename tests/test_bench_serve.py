"""``mfli bench serve``'s in-process comparison on a small catalogue: the hnswlib yardstick is tuned to the
learned index's recall (grid, then bisection) and both answer the same queries."""

from __future__ import annotations

from mfli.benchmarks.serve import in_process, synthetic_catalogue
from mfli.config import load_settings


def test_in_process_comparison_tunes_hnsw_to_the_learned_recall():
    settings = load_settings(model={"dim": 32})
    snap = synthetic_catalogue(6000, facets=settings.model.facets, dim=32, levels=settings.model.levels)
    out = in_process(snap, settings, k=20, n_queries=60, ef_grid=[10, 40, 160, 640])
    assert out["learned_recall"] > 0.5, out
    assert out["learned_qps"] > 0 and out["hnsw_qps"] > 0 and out["exact_qps"] > 0
    if out["hnsw_reached_recall"]:
        # the smallest ef on the refined grid: a recall at least the learned one, from an ef inside the
        # bracket the grid found (not simply the next grid value)
        assert out["hnsw_recall"] >= out["learned_recall"]
        assert 10 <= out["hnsw_ef"] <= 640
    assert abs(out["ratio_learned_over_hnsw"] - out["learned_qps"] / out["hnsw_qps"]) < 1e-9
