"""The one table and JSON format every ``mfli bench`` module reports in.

A benchmark module's ``run(args, settings)`` returns :func:`result` (a plain dict, so it serialises
as is): rows of measurements, each optionally compared with a baseline measured *in the same process
and run* (absolute numbers on a shared 2-core machine drift; ratios against a same-run baseline
do not), the parameters used, and named targets with pass/fail.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measured quantity: median over runs, p95 if there were enough runs, and a ratio vs baseline."""

    name: str
    median: float
    unit: str
    p95: float | None = None
    runs: int = 1
    baseline: str | None = None  # name of the row this one is compared with
    ratio: float | None = None  # median / baseline median
    note: str = ""

    @classmethod
    def from_samples(cls, name: str, samples: list[float], unit: str, **kwargs: Any) -> Row:
        if not samples:
            raise ValueError(f"row {name!r} has no samples")
        return cls(name=name, median=statistics.median(samples), unit=unit, p95=percentile(samples, 95),
                   runs=len(samples), **kwargs)

    def against(self, baseline: Row) -> Row:
        """Set ``ratio`` to this median over the baseline's (same unit required)."""
        if baseline.unit != self.unit:
            raise ValueError(f"cannot compare {self.unit} with {baseline.unit}")
        self.baseline = baseline.name
        self.ratio = self.median / baseline.median if baseline.median else None
        return self


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy."""
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def result(name: str, rows: list[Row], *, params: dict[str, Any] | None = None,
           targets: dict[str, bool] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """What a benchmark module returns: ``{"name", "rows", "params", "targets", "notes"}``."""
    return {"name": name, "rows": [asdict(r) for r in rows], "params": params or {},
            "targets": targets or {}, "notes": notes or []}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render(res: dict[str, Any]) -> str:
    """A fixed-width text table of one benchmark result, targets and notes below it."""
    header = ("benchmark / row", "median", "p95", "unit", "runs", "ratio", "vs")
    lines = [(f"{res['name']} / {r['name']}", _fmt(r["median"]), _fmt(r["p95"]), r["unit"], str(r["runs"]),
              "-" if r["ratio"] is None else f"{r['ratio']:.3f}", r["baseline"] or "-") for r in res["rows"]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) if i in (0, 3, 6) else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    for table in res.get("tables", []):
        out += ["", table["title"], *_grid(table["header"], table["rows"])]
    for target, ok in res.get("targets", {}).items():
        out.append(f"target {target}: {'PASS' if ok else 'FAIL'}")
    out += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(out) + "\n"


def _grid(header: list[str], rows: list[list]) -> list[str]:
    """A fixed-width table (first column left-aligned, numbers right-aligned)."""
    cells = [[h for h in header]] + [[_fmt(c) if isinstance(c, (int, float)) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 or not rows or not isinstance(rows[0][i], (int, float)) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def write_json(path: str | Path, results: list[dict[str, Any]]) -> None:
    """Write results to ``path`` (parents created), one object keyed by benchmark name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({r["name"]: r for r in results}, indent=2, sort_keys=True) + "\n")
