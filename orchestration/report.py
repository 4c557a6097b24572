"""Reports people look at: one self-contained HTML file (PNG plots embedded as base64).

Three views of a model's health, each a PNG rendered with matplotlib (Agg, no display needed):

* **recall over time**: named curves (prequential recall per window for ``mfli eval``; index recall,
  prequential recall and freshness sampled by the demo's status loop);
* **cluster sizes per facet**: histogram of posting-list sizes with the split/merge bounds marked;
* **codebook usage per facet and level**: items per codeword (sorted, so a collapse shows as a cliff)
  with utilisation and perplexity in the legend.

Inputs are plain numbers so both producers can feed it: ``mfli eval --report`` from the in-memory
index and codebook, ``mfli demo --report`` from the LMDB index (:func:`lmdb_index_stats`) and the
status samples it collected. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Curve:
    """One line of a time plot; ``None``/NaN values are gaps."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]


@dataclass
class ReportData:
    title: str
    recall_curves: list[Curve] = field(default_factory=list)
    recall_xlabel: str = "time"
    recall_ylabel: str = "recall"
    extra_curves: list[tuple[str, str, list[Curve]]] = field(default_factory=list)  # (title, ylabel, curves)
    cluster_sizes: dict[int, np.ndarray] = field(default_factory=dict)  # facet -> sizes of its clusters
    size_bounds: tuple[int, int] | None = None  # (B_low, B_upp)
    codeword_counts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (facet, level) -> counts
    codebook_stats: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)  # utilisation, perplexity
    summary: dict[str, object] = field(default_factory=dict)


# --- figures ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


def _vals(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=float)


def curves_png(curves: Sequence[Curve], xlabel: str, ylabel: str, title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for c in curves:
        ax.plot(np.asarray(c.x, dtype=float), _vals(c.y), marker="o" if len(c.x) <= 40 else None,
                markersize=3, label=c.label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def cluster_sizes_png(sizes: Mapping[int, np.ndarray], bounds: tuple[int, int] | None) -> bytes:
    plt = _plt()
    facets = sorted(sizes)
    fig, axes = plt.subplots(1, max(len(facets), 1), figsize=(4 * max(len(facets), 1), 3.2), squeeze=False)
    for ax, f in zip(axes[0], facets, strict=False):
        s = np.asarray(sizes[f])
        s = s[s > 0]
        if s.size:
            ax.hist(s, bins=min(40, max(5, int(np.sqrt(s.size)) * 2)), color="tab:blue", alpha=0.8)
        if bounds is not None:
            for b, name in zip(bounds, ("B_low", "B_upp"), strict=True):
                ax.axvline(b, color="tab:red", linestyle="--", linewidth=1, label=name)
        ax.set_title(f"facet {f}: {s.size} clusters" + (f", max {int(s.max())}" if s.size else ""))
        ax.set_xlabel("items per cluster")
        ax.set_ylabel("clusters")
        ax.grid(alpha=0.3)
        if bounds is not None:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def codebook_png(counts: Mapping[tuple[int, int], np.ndarray],
                 stats: Mapping[tuple[int, int], Mapping[str, float]]) -> bytes:
    """Items per codeword (sorted descending) per facet (panel) and level (line); or, without counts,
    utilisation and perplexity bars per facet/level."""
    plt = _plt()
    if counts:
        facets = sorted({f for f, _ in counts})
        fig, axes = plt.subplots(1, len(facets), figsize=(4 * len(facets), 3.2), squeeze=False)
        for ax, f in zip(axes[0], facets, strict=False):
            for (ff, lv), c in sorted(counts.items()):
                if ff != f:
                    continue
                c = np.sort(np.asarray(c))[::-1]
                st = stats.get((f, lv)) or usage_stats(c)
                ax.plot(np.arange(1, c.size + 1), c, drawstyle="steps-mid",
                        label=f"level {lv}: util {st['utilisation']:.2f}, ppl {st['perplexity']:.1f}/{c.size}")
            ax.set_title(f"facet {f}: items per codeword")
            ax.set_xlabel("codeword (sorted by use)")
            ax.set_ylabel("items")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    else:
        keys = sorted(stats)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        labels = [f"f{f}/l{lv}" for f, lv in keys]
        for ax, name in zip(axes, ("utilisation", "perplexity"), strict=True):
            ax.bar(labels, [stats[k].get(name, math.nan) for k in keys], color="tab:green")
            ax.set_title(f"codebook {name} per facet/level")
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylim(0, 1.05)
    fig.tight_layout()
    return _png(fig)


def usage_stats(counts: np.ndarray) -> dict[str, float]:
    """Utilisation (share of codewords used) and perplexity (exp entropy of usage) of one codebook level."""
    c = np.asarray(counts, dtype=float)
    total = c.sum()
    if c.size == 0 or total <= 0:
        return {"utilisation": 0.0, "perplexity": 0.0}
    p = c[c > 0] / total
    return {"utilisation": float((c > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


# --- sources ---------------------------------------------------------------------------------------------
def lmdb_index_stats(path: str | Path, map_size: int = 8 << 30) -> tuple[dict[int, np.ndarray],
                                                                         dict[tuple[int, int], np.ndarray]]:
    """(cluster sizes per facet from the posting lists, items per codeword per (facet, level) from the
    live records' code paths), read in one transaction of the LMDB index."""
    from mfli.storage.index.reader import LmdbIndex

    index = LmdbIndex(path, map_size)
    try:
        with index.view() as view:
            sizes: dict[int, list[int]] = {f: [] for f in range(view.facets)}
            for f, _, members in view.postings():
                sizes.setdefault(f, []).append(members.size)
            _, rec = view.scan_records()
            codes = rec["codes"][rec["deleted"] == 0]
            try:
                m = int(view.codebooks().shape[2])
            except RuntimeError:  # no codebook yet
                m = int(codes.max(initial=-1)) + 1
            counts = {}
            for f in range(view.facets):
                for lv in range(view.levels):
                    c = codes[:, f, lv]
                    counts[(f, lv)] = np.bincount(c[c >= 0], minlength=m)
    finally:
        index.close()
    return {f: np.asarray(s, dtype=np.int64) for f, s in sizes.items()}, counts


# --- HTML ------------------------------------------------------------------------------------------------
def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _summary_table(summary: Mapping[str, object]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items())
    return f"<table>{rows}</table>"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_CSS = """body{font-family:sans-serif;max-width:1300px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ddd;padding:.2em .6em;text-align:left}
img{max-width:100%}.note{color:#666;font-size:.85em}"""


def render_html(data: ReportData) -> str:
    """The whole report as one HTML document (sections with ids: summary, recall, clusters, codebook)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(data.title)}</h1>",
             f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M:%S')} by mfli</p>"]
    if data.summary:
        parts.append(f"<section id='summary'><h2>Summary</h2>{_summary_table(data.summary)}</section>")
    parts.append("<section id='recall'><h2>Recall over time</h2>")
    if data.recall_curves:
        parts.append(_img(curves_png(data.recall_curves, data.recall_xlabel, data.recall_ylabel,
                                     "recall over time"), "recall over time"))
    else:
        parts.append("<p>no recall samples were collected</p>")
    for title, ylabel, curves in data.extra_curves:
        parts.append(_img(curves_png(curves, data.recall_xlabel, ylabel, title), title))
    parts.append("</section><section id='clusters'><h2>Cluster sizes per facet</h2>")
    if data.cluster_sizes:
        if data.size_bounds:
            parts.append(f"<p class='note'>split above B_upp={data.size_bounds[1]}, merge below "
                         f"B_low={data.size_bounds[0]}</p>")
        parts.append(_img(cluster_sizes_png(data.cluster_sizes, data.size_bounds), "cluster sizes per facet"))
    else:
        parts.append("<p>no clusters</p>")
    parts.append("</section><section id='codebook'><h2>Codebook usage per facet and level</h2>")
    if data.codeword_counts or data.codebook_stats:
        stats = dict(data.codebook_stats)
        for key, c in data.codeword_counts.items():
            stats.setdefault(key, usage_stats(c))
        rows = "".join(f"<tr><td>{f}</td><td>{lv}</td><td>{s['utilisation']:.3f}</td><td>{s['perplexity']:.2f}</td>"
                       f"</tr>" for (f, lv), s in sorted(stats.items()))
        parts.append(f"<table><tr><th>facet</th><th>level</th><th>utilisation</th><th>perplexity</th></tr>{rows}"
                     "</table>")
        parts.append(_img(codebook_png(data.codeword_counts, stats), "codebook usage"))
    else:
        parts.append("<p>no codebook yet</p>")
    parts.append("</section></body></html>")
    return "".join(parts)


def write_report(path: str | Path, data: ReportData) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def snapshot_stats(snapshot, index_settings, seed: int = 0) -> tuple[dict[int, np.ndarray],
                                                                       dict[tuple[int, int], np.ndarray]]:
    """(cluster sizes per facet, items per codeword per (facet, level)) of an in-memory index built
    from a learner snapshot exactly as ``mfli eval`` builds it."""
    from mfli.retrieval.memory import MemoryIndexView

    view = MemoryIndexView.from_settings(snapshot, index_settings, seed=seed)
    sizes = {f: view.cluster_sizes(f) for f in range(view.facets)}
    live = snapshot.live_rows()
    m = int(snapshot.codebooks.shape[2])
    counts = {}
    for f in range(snapshot.facets):
        for lv in range(snapshot.levels):
            c = snapshot.codes[live, f, lv]
            counts[(f, lv)] = np.bincount(c[c >= 0], minlength=m)
    return sizes, counts


def eval_report(result: Mapping, cluster_sizes: Mapping[int, np.ndarray] | None = None,
                size_bounds: tuple[int, int] | None = None,
                codeword_counts: Mapping[tuple[int, int], np.ndarray] | None = None) -> ReportData:
    """ReportData from an ``mfli eval`` result dict (its ``prequential.curve`` and ``codebook``)."""
    data = ReportData(title=f"mfli eval: {result.get('dataset', '?')}", recall_xlabel="event index (test period)",
                      recall_ylabel="prequential recall@100")
    curve = (result.get("prequential") or {}).get("curve")
    if curve:
        x = curve["window_start_event"]
        data.recall_curves = [Curve(name, x, curve[name]) for name in curve if name != "window_start_event"]
    cb = result.get("codebook") or {}
    util, ppl = cb.get("utilisation") or [], cb.get("perplexity") or []
    for f, row in enumerate(util):
        for lv, u in enumerate(row):
            data.codebook_stats[(f, lv)] = {"utilisation": float(u), "perplexity": float(ppl[f][lv])}
    data.cluster_sizes = {int(f): np.asarray(s) for f, s in (cluster_sizes or {}).items()}
    data.size_bounds = size_bounds
    data.codeword_counts = dict(codeword_counts or {})
    static = result.get("static") or {}
    data.summary = {"dataset": result.get("dataset"), "events": result.get("events"),
                    "codewords per level": cb.get("codewords")}
    for method in ("index", "exact", "hnsw", "popularity"):
        if method in static:
            data.summary[f"{method} recall@100"] = static[method].get("recall@100")
    if "index_over_exact@100" in static:
        data.summary["index / exact @100"] = static["index_over_exact@100"]
    preq = result.get("prequential") or {}
    for name in ("mfli", "online_popularity"):
        if name in preq:
            data.summary[f"prequential {name} recall@100"] = preq[name].get("recall@100")
    return data
