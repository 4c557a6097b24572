"""The learner's prequential probe (learner/probe.py) and ``mfli eval --compare-probes``."""

import json

import numpy as np
import torch

from mfli.config import ModelSettings
from mfli.evaluation.probes import compare
from mfli.learner.learner import MFLILearner
from mfli.learner.probe import MISS, PrequentialProbe
from mfli.orchestration.cli import main as cli_main

from learner_streams import clustered_stream


def _oracle_ranks(learner, users, items, ts, seen):
    """Per event, one at a time: the window from the user's history, the score of every live item, the
    count of live items the user has not seen scored above the target."""
    out = []
    vec = learner.serving_vectors()[:, 0, :]  # what answers are scored with (model.serving_average)
    prior = learner.prior()
    live = learner.items.live[: len(learner.items)]
    windows: dict[str, list[tuple[int, int]]] = {}
    for u, i, t in zip(users, items, ts, strict=True):
        if u not in learner.users.users or i not in learner.items.ids:
            out.append(MISS)
        else:
            urow = learner.users.users.get(u)
            hist_items, hist_ts = learner.users.items_of(urow)
            hist = list(zip(hist_items, hist_ts, strict=True)) + windows.get(u, [])
            hist = [(r, x) for r, x in hist if live[r]][-learner.settings.history:]
            if not hist:
                out.append(MISS)
            else:
                h = learner.settings.history
                win = np.full((1, h), -1, np.int64)
                wts = np.zeros((1, h), np.int64)
                win[0, h - len(hist):] = [r for r, _ in hist]
                wts[0, h - len(hist):] = [x for _, x in hist]
                q, _ = learner.window_queries(win, wts)
                scores = vec @ q[0, 0] + prior
                target = learner.items.ids.get(i)
                excluded = {learner.items.ids.get(x) for x in seen.get(u, set()) if x != i}
                out.append(sum(1 for r in np.flatnonzero(live)
                               if r not in excluded and r != target and scores[r] > scores[target]))
        if i in learner.items.ids:
            windows.setdefault(u, []).append((learner.items.ids.get(i), int(t)))
        seen.setdefault(u, set()).add(i)
    return out


def test_probe_ranks_each_event_with_the_model_before_the_step(tmp_path):
    torch.set_num_threads(1)
    users, items, values, ts, catalogue = clustered_stream(n_events=3_000)
    learner = MFLILearner(ModelSettings(members=1, dim=16, history=10, warmup_events=1_000, seed=1))
    learner.upsert_items(catalogue)
    probe = PrequentialProbe(tmp_path / "p.jsonl")
    seen: dict[str, set[str]] = {}
    checked = 0
    for lo in range(0, 3_000, 250):
        hi = lo + 250
        ids = [f"e-{j}" for j in range(lo, hi)]
        got = probe.score(learner, ids, list(users[lo:hi]), list(items[lo:hi]), np.asarray(ts[lo:hi]))
        if lo >= 2_000:  # a trained model; the oracle is slow, so only the last batches
            expected = _oracle_ranks(learner, list(users[lo:hi]), list(items[lo:hi]), list(ts[lo:hi]), seen)
            assert got.tolist() == expected
            checked += int((got != MISS).sum())
        else:
            for u, i in zip(users[lo:hi], items[lo:hi], strict=True):
                seen.setdefault(u, set()).add(i)
        learner.learn_columns(users[lo:hi], items[lo:hi], values[lo:hi], ts[lo:hi])
    probe.close()
    assert checked > 500
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 3_000 and json.loads(lines[-1])["id"] == "e-2999"


def _write(path, ranks, users, prefix="ml-1m-"):
    with open(path, "w") as f:
        for row, (r, u) in enumerate(zip(ranks, users, strict=True)):
            f.write(json.dumps({"id": f"{prefix}{row}", "user": u, "rank": r}) + "\n")


def test_compare_pairs_events_by_id_across_rank_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 4_000
    users = [f"u{j % 200}" for j in range(n)]
    a = rng.integers(0, 60, n)
    b = a + 30  # B ranks every target 30 places lower: fewer hits at 20 and 50
    _write(tmp_path / "a.jsonl", a.tolist(), users)
    half = n // 2  # B came from two ranks: two files, each with half the events
    _write(tmp_path / "b.jsonl.rank0", b[:half].tolist(), users[:half])
    with open(tmp_path / "b.jsonl.rank1", "w") as f:
        for row in range(half, n):
            f.write(json.dumps({"id": f"ml-1m-{row}", "user": users[row], "rank": int(b[row])}) + "\n")
    rep = compare(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.rank*"), from_row=1_000)
    assert rep["events"] == 3_000 and rep["only_a"] == 0 and rep["only_b"] == 0
    expected = float((a[1_000:] < 20).mean() - (b[1_000:] < 20).mean())
    d = rep["diff"]["HR@20"]
    assert abs(d["diff"] - expected) < 1e-12 and d["lo"] > 0
    assert rep["diff"]["HR@100"]["diff"] == float((a[1_000:] < 100).mean() - (b[1_000:] < 100).mean())
    out = tmp_path / "cmp.json"
    assert cli_main(["eval", "--compare-probes", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.rank*"),
                     "--from-row", "1000", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["events"] == 3_000
