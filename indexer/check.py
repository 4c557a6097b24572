"""Invariant checker for the index LMDB (``mfli index check``), reusable by tests.

Checked from ONE read transaction (so a concurrent writer cannot produce false alarms):

* every live item sits in exactly one posting list per facet, and that list is the cluster its record
  names; no posting list holds a deleted, unknown or duplicated row;
* each live item's cluster is one of the clusters its code path maps to (``paths``);
* balance: the share of live items in clusters with B_low <= size <= B_upp is reported and, when
  ``min_in_bounds`` is given, required (docs/design.md §Index: >= 95 % after a full pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mfli.config import IndexSettings
from mfli.retrieval.clusters import path_keys
from mfli.storage.index.reader import LmdbIndex


@dataclass
class CheckReport:
    items: int = 0
    index_version: int = 0
    clusters: list[int] = field(default_factory=list)
    size_stats: list[dict[str, float]] = field(default_factory=list)  # per facet: min, p50, max, mean
    in_bounds: list[float] = field(default_factory=list)  # per facet: share of items in bounded clusters
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"ok": self.ok, "items": self.items, "index_version": self.index_version,
                "clusters": self.clusters, "size_stats": self.size_stats, "in_bounds": self.in_bounds,
                "violations": self.violations[:50], "violation_count": len(self.violations)}


def check_index(
    path: str | Path | LmdbIndex, settings: IndexSettings | None = None, min_in_bounds: float | None = None
) -> CheckReport:
    """Verify the invariants above; violations are listed in the report (``report.ok``)."""
    s = settings or IndexSettings()
    index = path if isinstance(path, LmdbIndex) else LmdbIndex(path, s.map_size)
    report = CheckReport()
    with index.view(buffers=False) as view:
        report.index_version = view.version
        rows, rec = view.scan_records()
        live = rec["deleted"] == 0
        report.items = int(live.sum())
        clustered = view.clusters_version() > 0
        post_rows, post_facet, post_cluster = [], [], []
        for f, c, members in view.postings():
            post_rows.append(members)
            post_facet.append(np.full(members.size, f))
            post_cluster.append(np.full(members.size, c))
        p_rows = np.concatenate(post_rows) if post_rows else np.empty(0, np.int64)
        p_facet = np.concatenate(post_facet) if post_facet else np.empty(0, np.int64)
        p_cluster = np.concatenate(post_cluster) if post_cluster else np.empty(0, np.int64)
        live_rows = rows[live]
        for f in range(view.facets):
            _check_facet(report, f, view, rows, rec, live, live_rows, p_rows[p_facet == f],
                         p_cluster[p_facet == f], clustered, s)
    if min_in_bounds is not None:
        for f, share in enumerate(report.in_bounds):
            if share < min_in_bounds:
                report.violations.append(
                    f"facet {f}: only {share:.1%} of items in clusters within [{s.b_low}, {s.b_upp}] "
                    f"(need {min_in_bounds:.0%})")
    return report


def _check_facet(report, f, view, rows, rec, live, live_rows, p_rows, p_cluster, clustered, s) -> None:
    v = report.violations
    assigned = rec["clusters"][live, f].astype(np.int64)
    if clustered and np.any(assigned < 0):
        v.append(f"facet {f}: {int((assigned < 0).sum())} live items have no cluster")
    uniq, counts = np.unique(p_rows, return_counts=True)
    for row in uniq[counts > 1][:10].tolist():
        v.append(f"facet {f}: row {row} is in {int(counts[uniq == row][0])} posting lists")
    stray = np.setdiff1d(uniq, live_rows)
    for row in stray[:10].tolist():
        v.append(f"facet {f}: posting lists hold row {row}, which is deleted or unknown")
    # each live item's posting cluster equals its record's cluster
    order = np.argsort(p_rows, kind="stable")
    pos = np.searchsorted(p_rows[order], live_rows)
    pos = np.minimum(pos, max(p_rows.size - 1, 0))
    found = (p_rows[order][pos] == live_rows) if p_rows.size else np.zeros(live_rows.size, bool)
    should = assigned >= 0
    for row in live_rows[should & ~found][:10].tolist():
        v.append(f"facet {f}: live row {row} is in no posting list")
    mismatch = should & found & (p_cluster[order][pos] != assigned)
    for i in np.flatnonzero(mismatch)[:10].tolist():
        v.append(f"facet {f}: row {live_rows[i]} record says cluster {assigned[i]}, posting list "
                 f"{int(p_cluster[order][pos][i])}")
    # path map: the item's cluster is among its path's clusters
    codes = rec["codes"][live, f]
    if clustered:
        keys = path_keys(codes)
        map_keys, map_ids = view.path_map(f)
        width = int(max(assigned.max(initial=0), map_ids.max(initial=0))) + 1
        pairs = map_keys * width + map_ids
        bad = int((~np.isin(keys * width + assigned, pairs) & should).sum())
        if bad:
            v.append(f"facet {f}: {bad} items sit in a cluster their code path does not map to")
    sizes = np.bincount(assigned[should]) if should.any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    report.clusters.append(int(sizes.size))
    if sizes.size:
        report.size_stats.append({"min": float(sizes.min()), "p50": float(np.median(sizes)),
                                  "max": float(sizes.max()), "mean": float(sizes.mean())})
        ok = (sizes >= s.b_low) & (sizes <= s.b_upp)
        report.in_bounds.append(float(sizes[ok].sum() / sizes.sum()))
    else:
        report.size_stats.append({})
        report.in_bounds.append(0.0)
