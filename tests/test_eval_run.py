"""`mfli eval` end to end on ml-100k: seeded, so two runs print the same numbers; the PNG is written."""

import argparse
from pathlib import Path

import orjson
import pytest

from mfli.config import load_settings
from mfli.evaluation import run as evaluate

ML100K = Path("/work/shared/data/ml-100k")


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if not k.endswith("seconds")}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.exists(), reason="shared MovieLens data not present")
def test_eval_is_reproducible_and_reports_every_anchor_on_the_same_events(tmp_path):
    reports = []
    for n in range(2):
        args = argparse.Namespace(dataset=str(ML100K), batch=1024, json=str(tmp_path / f"r{n}.json"),
                                  plot=str(tmp_path / f"r{n}.png"), report=None, ablations=False,
                                  no_static=n == 1, sasrec_epochs=1, bootstrap=200, beta=None if n == 0 else 0.02,
                                  half_life=None if n == 0 else 900.0)
        assert evaluate.run(args, load_settings()) == 0
        reports.append(orjson.loads((tmp_path / f"r{n}.json").read_bytes()))
    a = reports[0]
    static = a["static"]
    for method in ("index", "exact", "hnsw", "popularity", "recent_popularity_5pct", "ease", "als"):
        assert 0 <= static[method]["recall@20"] <= static[method]["recall@50"] <= static[method]["recall@100"] <= 1
    # the protocol's whole-period popularity on ml-100k is 0.3234, the protocol's reference figure (catalogue included)
    assert static["popularity"]["recall@100"] == pytest.approx(0.3234, abs=0.01)
    tuned = a["prior_tuning"]
    assert {(row["beta"], row["half_life"]) for row in tuned["grid"]} >= {(tuned["beta"], tuned["half_life"])}
    stream = a["streaming"]
    assert stream["events_scored"] == 9924  # every test event whose user has an earlier event
    methods = stream["methods"]
    assert set(methods) == {"mfli index", "mfli exact", "online popularity", "online Markov", "SASRec (frozen)"}
    # the online Markov chain, computed here, reproduces the figure on ml-100k
    assert methods["online Markov"]["HR@20"] == pytest.approx(0.2105, abs=0.002)
    for name, comp in stream["vs_anchors"].items():
        c = comp["HR@20"]
        assert c["lo"] <= c["diff"] <= c["hi"], name
        assert c["diff"] == pytest.approx(methods["mfli index"]["HR@20"] - methods[name]["HR@20"], abs=1e-9)
    assert stream["index_over_exact_hr@20"] > 0.97
    assert (tmp_path / "r0.png").stat().st_size > 10_000
    # seeded: the same prior gives the same streaming numbers; --seeds 2 adds a retrained seed beside them
    b = reports[1]
    rerun = dict(args.__dict__, json=str(tmp_path / "r2.json"), plot=None, seeds=2)
    assert evaluate.run(argparse.Namespace(**rerun), load_settings()) == 0
    c = orjson.loads((tmp_path / "r2.json").read_bytes())
    seeds = c["streaming"].pop("seeds")
    text_b, text_c = b["streaming"]["comparisons_text"], c["streaming"]["comparisons_text"]
    assert text_c[:len(text_b)] == text_b and len(text_c) > len(text_b)
    c["streaming"]["comparisons_text"] = text_b
    assert _strip_timings(b["streaming"]) == _strip_timings(c["streaming"])
    per = seeds["per_seed"]
    assert [p["seed"] for p in per] == [0, 1] and seeds["count"] == 2
    assert per[0]["HR@20"] == b["streaming"]["methods"]["mfli index"]["HR@20"]
    assert per[1]["HR@20"] != per[0]["HR@20"]  # another seed is another model
    assert seeds["mean_model"]["HR@20"] == pytest.approx((per[0]["HR@20"] + per[1]["HR@20"]) / 2, abs=1e-12)
    rows_b = b["streaming"]["methods"]
    best = b["streaming"]["best_anchor"]
    assert per[1]["ratio_to_best_anchor"] == pytest.approx(per[1]["HR@20"] / rows_b[best]["HR@20"], rel=1e-9)
    for name, comp in seeds["vs_anchors"].items():
        d = comp["HR@20"]
        assert d["lo"] <= d["diff"] <= d["hi"], name
        assert d["diff"] == pytest.approx(seeds["mean_model"]["HR@20"] - rows_b[name]["HR@20"], abs=1e-9)
