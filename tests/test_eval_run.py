"""`mfli eval` end to end on ml-100k: seeded, so two runs print the same numbers; the PNG is written."""

import argparse
from pathlib import Path

import orjson
import pytest

from mfli.config import load_settings
from mfli.learner import evaluate

ML100K = Path("/work/shared/data/ml-100k")


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if not k.endswith("seconds")}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.exists(), reason="shared MovieLens data not present")
def test_eval_is_reproducible_and_writes_json_and_plot(tmp_path):
    reports = []
    for n in range(2):
        args = argparse.Namespace(dataset=str(ML100K), passes=1, batch=1024, json=str(tmp_path / f"r{n}.json"),
                                  plot=str(tmp_path / f"r{n}.png"), ablations=False, no_prequential=False,
                                  beta=None, half_life=None)
        assert evaluate.run(args, load_settings()) == 0
        reports.append(orjson.loads((tmp_path / f"r{n}.json").read_bytes()))
    a, b = (_strip_timings(r) for r in reports)
    assert a == b
    static = a["static"]
    for method in ("index", "exact", "hnsw", "popularity", "recent_popularity_5pct"):
        assert set(static[method]) >= {"recall@20", "recall@50", "recall@100"}
        assert 0 <= static[method]["recall@20"] <= static[method]["recall@50"] <= static[method]["recall@100"] <= 1
    # the protocol's whole-period popularity on ml-100k is DESIGN §7's 0.3234 (catalogue included)
    assert static["popularity"]["recall@100"] == pytest.approx(0.3234, abs=0.01)
    assert a["prequential"]["events_scored"] > 5_000
    assert (tmp_path / "r0.png").stat().st_size > 10_000
