"""The HTML report renders from a real run and holds real plots.

``mfli eval --report`` runs on a tiny MovieLens-format dataset written from the synthetic stream (so no
download is needed and it takes seconds): the report must parse as HTML, have the summary, recall,
cluster and codebook sections, and every ``<img>`` must be an embedded base64 PNG that decodes to a
non-trivial image (checked by decoding it with matplotlib, not just by its signature).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import orjson
import pytest

from mfli.config import load_settings
from mfli.orchestration.report import PNG_SIGNATURE, Curve, ReportData, render_html, usage_stats


class _Doc(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.headings: list[str] = []
        self._in_h = False
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a)
        if tag in ("h1", "h2"):
            self._in_h = True
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("h1", "h2"):
            self._in_h = False
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        if self._in_h:
            self.headings.append(data)


def parse_report(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    doc.close()
    assert doc.stack == [], f"unclosed tags {doc.stack}"
    return doc


def decode_png(src: str) -> np.ndarray:
    """The image behind a ``data:image/png;base64,`` URL, decoded (H x W x channels)."""
    import matplotlib.image as mpimg

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    raw = base64.b64decode(src[len(prefix):], validate=True)
    assert raw.startswith(PNG_SIGNATURE)
    assert len(raw) > 5_000, f"suspiciously small PNG ({len(raw)} bytes)"
    img = mpimg.imread(io.BytesIO(raw), format="png")
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert float(img[..., :3].std()) > 0.02, "blank image"
    return img


def check_report(path: Path, expected_sections=("summary", "recall", "clusters", "codebook"), min_images=3) -> _Doc:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    doc = parse_report(text)
    assert set(expected_sections) <= set(doc.sections), doc.sections
    assert len(doc.images) >= min_images, len(doc.images)
    for img in doc.images:
        decode_png(img["src"])
        assert img.get("alt")
    return doc


def _write_synthetic_movielens(root: Path, events: int) -> None:
    """ml-latest-small layout (ratings.csv, movies.csv) from the seeded synthetic stream."""
    from mfli.events import InteractionEvent, ItemEvent
    from mfli.sources.synthetic import SyntheticStream

    stream = SyntheticStream(n_users=150, n_items=300, n_topics=10, seed=3, new_item_rate=0.0, delete_rate=0.0)
    root.mkdir(parents=True)
    tags: dict[str, list[str]] = {}
    with open(root / "ratings.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for r in stream.records(events):
            if isinstance(r, ItemEvent):
                tags[r.item_id] = list(r.tags)
            elif isinstance(r, InteractionEvent):
                w.writerow([r.user_id, r.item_id, 4.0, r.ts // 1000])
    with open(root / "movies.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["movieId", "title", "genres"])
        for item, t in tags.items():
            w.writerow([item, item, "|".join(t) or "(no genres listed)"])


def test_render_html_embeds_valid_pngs_for_every_section():
    rng = np.random.default_rng(0)
    data = ReportData(
        title="unit <report>",
        recall_curves=[Curve("index", list(range(10)), [0.5 + 0.04 * i for i in range(9)] + [None])],
        cluster_sizes={0: rng.integers(1, 80, 50), 1: rng.integers(1, 40, 90)},
        size_bounds=(8, 256),
        codeword_counts={(0, 0): rng.integers(0, 30, 16), (0, 1): np.r_[np.zeros(8), rng.integers(1, 9, 8)]},
        summary={"events": 123, "recall": 0.25},
    )
    html = render_html(data)
    assert "unit &lt;report&gt;" in html  # titles are escaped
    doc = parse_report(html)
    assert doc.sections == ["summary", "recall", "clusters", "codebook"]
    assert len(doc.images) == 3
    for img in doc.images:
        decode_png(img["src"])


def test_usage_stats():
    assert usage_stats(np.array([5, 5, 0, 0])) == {"utilisation": 0.5, "perplexity": pytest.approx(2.0)}
    assert usage_stats(np.zeros(4)) == {"utilisation": 0.0, "perplexity": 0.0}


@pytest.mark.slow
def test_eval_writes_an_html_report(tmp_path):
    from mfli.evaluation import run as evaluate

    data = tmp_path / "synthetic-ml"
    _write_synthetic_movielens(data, 6_000)
    out = tmp_path / "report.html"
    args = argparse.Namespace(dataset=str(data), batch=512, json=str(tmp_path / "r.json"), plot=None,
                              report=str(out), ablations=False, no_static=False, sasrec_epochs=1, bootstrap=100,
                              beta=0.1, half_life=1e6)
    settings = load_settings(model={"warmup_events": 1_000, "level_interval_events": 1_000, "dim": 16})
    assert evaluate.run(args, settings) == 0
    doc = check_report(out)
    result = orjson.loads((tmp_path / "r.json").read_bytes())
    # the recall plot is the prequential curve of the JSON; the summary carries the same numbers
    assert result["prequential"]["curve"]["mfli"]
    text = out.read_text()
    assert "prequential mfli recall@100" in text and "index recall@100" in text
    assert "Cluster sizes per facet" in doc.headings and "Codebook usage per facet and level" in doc.headings
    # codebook table: one row per facet and level
    assert text.count("<tr><td>") == settings.model.served_facets * settings.model.levels
