"""The demo's status line from real /metrics text of several processes (fast; no processes started).

Every process imports the one metrics module, so every process exports every unlabelled metric — the
server too reports ``mfli_index_items 0`` and all-zero freshness buckets. The status line must show the
indexer's values, not whichever process was scraped last.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mfli.metrics import _FRESHNESS_BUCKETS
from mfli.orchestration.demo import merge, status_line, status_values


def _process(items: float, freshness: list[float], recall: float | None = None) -> dict[str, float]:
    """A scrape dict (as mfli.orchestration.supervisor.scrape builds it) of one process's exposition text."""
    reg = CollectorRegistry()
    Gauge("mfli_index_items", "", registry=reg).set(items)
    h = Histogram("mfli_index_freshness_seconds", "", buckets=_FRESHNESS_BUCKETS, registry=reg)
    for v in freshness:
        h.observe(v)
    if recall is not None:
        Gauge("mfli_index_recall_ratio", "", ["k"], registry=reg).labels("20").set(recall)
    out = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_status_line_takes_the_owner_values_whatever_the_scrape_order():
    indexer = _process(1234, [0.2, 0.3, 0.4, 0.6])
    server = _process(0, [], recall=0.9)
    for order in ([indexer, server], [server, indexer]):
        v = status_values(merge(order), {}, 1.0)
        assert v["items"] == 1234
        assert 0.5 <= v["freshness_p95_s"] <= 0.75
        assert v["index_recall"] == 0.9
    # what the old overwrite-merge saw with the server scraped last
    overwritten = {**indexer, **server}
    assert math.isnan(status_values(overwritten, {}, 1.0)["freshness_p95_s"])
    assert "freshness p95  0." in status_line(merge([indexer, server]), {}, 1.0)
