"""Compare two prequential probe logs (``learner.probe_path``, :mod:`mfli.learner.probe`): the same
events scored by two learner runs that read them from Kafka (e.g. ``mfli learn`` against ``mfli learn
--workers 2``), paired by event id, HR@K and NDCG@20 with a paired bootstrap interval over users.

Run as ``mfli eval --compare-probes 'A*.jsonl' 'B*.jsonl' [--from-row N]``; a group writes one file per
rank (``<probe_path>.rank<r>``), so each side is a glob.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from pathlib import Path

import numpy as np

from mfli.evaluation.bootstrap import hits_at, paired_bootstrap, rank_metrics

log = logging.getLogger(__name__)

_ROW = re.compile(r"(\d+)$")


def load(pattern: str) -> dict[str, tuple[str, int]]:
    """event id -> (user, rank) from every file matching ``pattern``; a replayed event keeps its first
    score (the one taken before it was first learned)."""
    paths = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
    if not paths:
        raise FileNotFoundError(f"no probe file matches {pattern!r}")
    out: dict[str, tuple[str, int]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                out.setdefault(rec["id"], (rec["user"], int(rec["rank"])))
    return out


def compare(a_pattern: str, b_pattern: str, from_row: int = 0, n_boot: int = 1000) -> dict:
    """Metrics of A and B on the events both scored (with a trailing row number >= ``from_row``), and
    A - B for HR@20/50/100 with paired bootstrap intervals over users."""
    a, b = load(a_pattern), load(b_pattern)
    ids = sorted(set(a) & set(b))
    if from_row:
        ids = [i for i in ids if (m := _ROW.search(i)) is not None and int(m.group(1)) >= from_row]
    if not ids:
        raise ValueError("the two probe logs share no events (after --from-row)")
    users = np.asarray([a[i][0] for i in ids])
    ra = np.asarray([a[i][1] for i in ids], np.int64)
    rb = np.asarray([b[i][1] for i in ids], np.int64)
    report: dict = {"events": len(ids), "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a)),
                    "users": int(np.unique(users).size), "a": rank_metrics(ra), "b": rank_metrics(rb), "diff": {}}
    for k in (20, 50, 100):
        report["diff"][f"HR@{k}"] = paired_bootstrap(hits_at(ra, k), hits_at(rb, k), users, n_boot=n_boot)
    return report


def format_report(report: dict, a_name: str, b_name: str) -> str:
    lines = [f"{report['events']} events scored by both ({report['users']} users; only A {report['only_a']}, "
             f"only B {report['only_b']})",
             f"{'':8}{'HR@20':>9}{'HR@50':>9}{'HR@100':>9}{'NDCG@20':>9}"]
    for name, key in ((a_name, "a"), (b_name, "b")):
        m = report[key]
        lines.append(f"{name[:8]:8}{m['HR@20']:9.4f}{m['HR@50']:9.4f}{m['HR@100']:9.4f}{m['NDCG@20']:9.4f}")
    for k, d in report["diff"].items():
        lines.append(f"A - B {k}: {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}], "
                     f"ratio {d['ratio']:.3f} [{d['ratio_lo']:.3f}, {d['ratio_hi']:.3f}]")
    return "\n".join(lines)
