"""Generate deploy/grafana/dashboards/mfli.json (run: ``python deploy/grafana/build_dashboard.py``).

Why a generator: a hand-edited Grafana export is thousands of lines of layout noise in which a renamed
metric hides easily. Here each panel is one line of intent (title, PromQL, unit); the test suite checks
that the committed JSON equals this script's output and that every ``mfli_*`` name it uses exists in
``mfli/metrics.py``. Edit panels here, re-run, commit both.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "mfli.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # uid set in provisioning/datasources
RATE = "$__rate_interval"

log = logging.getLogger("build_dashboard")


@dataclass
class Panel:
    """One time-series (or stat) panel: title, unit and (PromQL, legend) targets."""

    title: str
    unit: str
    targets: list[tuple[str, str]]
    description: str = ""
    kind: str = "timeseries"
    width: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


#: joins a per-instance series with the rank of the learner process behind that scrape target
BY_RANK = " * on (instance) group_left (rank) mfli_learner_rank_info"

ROWS: list[tuple[str, list[Panel]]] = [
    ("Throughput", [
        Panel("Events consumed / s", "ops", [
            (f"sum by (topic) (rate(mfli_events_consumed_total[{RATE}]))", "{{topic}}"),
            (f"sum by (reason) (rate(mfli_events_invalid_total[{RATE}]))", "DLQ {{reason}}"),
            (f"sum(rate(mfli_events_duplicate_total[{RATE}]))", "duplicates"),
            (f"sum by (topic) (rate(mfli_events_produced_total[{RATE}]))", "produced {{topic}}"),
        ], "Valid events after validation; DLQ and duplicates for comparison."),
        Panel("Learner events / s", "ops", [
            (f"sum(rate(mfli_learner_events_total[{RATE}]))", "trained"),
            (f"sum(rate(mfli_item_updates_published_total[{RATE}]))", "item deltas published"),
            (f"sum(rate(mfli_index_deltas_applied_total[{RATE}]))", "item deltas applied"),
        ]),
        Panel("Requests / s", "reqps", [
            (f"sum by (route) (rate(mfli_requests_total[{RATE}]))", "{{route}}"),
            (f"sum(rate(mfli_fallbacks_total[{RATE}]))", "fallback"),
        ]),
    ]),
    ("Lag and freshness", [
        Panel("Consumer lag", "short", [
            ("sum by (job, topic) (mfli_consumer_lag_messages)", "{{job}} {{topic}}"),
        ], "High watermark minus position, summed over partitions."),
        Panel("Freshness (event -> visible in index)", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(mfli_index_freshness_seconds_bucket[{RATE}])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(mfli_index_freshness_seconds_bucket[{RATE}])))", "p95"),
        ], "Alert MfliFreshnessP95High fires when p95 > 1 s for 5 m.",
            extra={"thresholds": 1.0}),
        Panel("Ingest batch size", "short", [
            (f"histogram_quantile(0.5, sum by (le) (rate(mfli_ingest_batch_size_bucket[{RATE}])))", "p50"),
            (f"sum(rate(mfli_ingest_batch_size_sum[{RATE}])) / sum(rate(mfli_ingest_batch_size_count[{RATE}]))",
             "mean"),
        ]),
    ]),
    ("Replicas", [
        Panel("Replica lag", "s", [
            ("max by (topic) (mfli_replica_lag_seconds)", "worst replica {{topic}} (s)"),
            ("max by (topic) (mfli_replica_lag_messages)", "worst replica {{topic}} (messages)"),
        ], "Oldest unapplied change per topic on the most lagging replica; not ready above "
           "replication.max_lag_s."),
        Panel("Freshness on replicas (event -> visible)", "s", [
            (f"histogram_quantile(0.5, sum by (kind, le) (rate(mfli_replica_freshness_seconds_bucket[{RATE}])))",
             "p50 {{kind}}"),
            (f"histogram_quantile(0.95, sum by (kind, le) (rate(mfli_replica_freshness_seconds_bucket[{RATE}])))",
             "p95 {{kind}}"),
        ], "Event ingest time to the change committed in a replica's own LMDB copy.", extra={"thresholds": 1.5}),
        Panel("Replication traffic", "ops", [
            (f"sum(rate(mfli_index_changes_published_total[{RATE}]))", "index records published"),
            ("mfli_index_changes_unacked", "index commits unacknowledged"),
            (f"sum(rate(mfli_user_state_published_total[{RATE}]))", "user records published"),
            (f"sum by (topic) (rate(mfli_replica_records_applied_total[{RATE}]))", "applied {{topic}}"),
            (f"sum by (topic) (increase(mfli_replica_bad_records_total[{RATE}]))", "bad {{topic}}"),
            (f"sum(increase(mfli_replica_bootstraps_total[{RATE}]))", "bootstraps"),
            ("min(mfli_replica_index_version) - max(mfli_index_version)", "version gap (slowest replica)"),
        ], "Records per second both ways; a replica at the primary's version shows gap 0."),
    ]),
    ("Drift", [
        Panel("Embedding drift (update size)", "short", [
            ("mfli_embedding_drift", "facet {{facet}}"),
        ], "Mean L2 size of the last update of changed item rows."),
        Panel("Code churn: reassignments / s", "ops", [
            (f"sum by (facet) (rate(mfli_index_reassignments_total[{RATE}]))", "facet {{facet}}"),
        ], "Items moved between clusters per second, per facet."),
        Panel("User interest shift", "short", [
            ("mfli_user_interest_shift", "1 - cos"),
        ]),
    ]),
    ("Codebook health", [
        Panel("Codebook utilisation", "percentunit", [
            ("mfli_codebook_utilisation_ratio", "f{{facet}} l{{level}}"),
        ], "Share of codewords in use; collapse alert below 20 %.", extra={"max": 1, "thresholds": 0.2}),
        Panel("Codebook perplexity", "short", [
            ("mfli_codebook_perplexity", "f{{facet}} l{{level}}"),
        ], "Effective number of codewords in use."),
        Panel("Dead codewords and resets", "short", [
            ("mfli_codebook_dead_codewords", "dead f{{facet}} l{{level}}"),
            (f"sum by (facet, level) (rate(mfli_codebook_resets_total[{RATE}]))", "resets/s f{{facet}} l{{level}}"),
        ]),
    ]),
    ("Clusters", [
        Panel("Cluster size balance", "short", [
            ('mfli_index_cluster_size{stat=~"min|p50|p90|max"}', "f{{facet}} {{stat}}"),
        ], "min / quantiles / max of posting-list sizes per facet."),
        Panel("Clusters and items", "short", [
            ("mfli_index_clusters", "clusters f{{facet}}"),
            ("mfli_index_items", "items in index"),
            ("mfli_learner_items", "items in learner"),
            ("mfli_learner_users", "users in learner"),
        ]),
        Panel("Splits and merges / s", "ops", [
            (f"sum by (facet) (rate(mfli_index_splits_total[{RATE}]))", "split f{{facet}}"),
            (f"sum by (facet) (rate(mfli_index_merges_total[{RATE}]))", "merge f{{facet}}"),
        ]),
    ]),
    ("Recall", [
        Panel("Index recall vs exact", "percentunit", [
            ("mfli_index_recall_ratio", "recall@{{k}}"),
        ], "Sampled: index path result vs brute-force top-k over the same embeddings.",
            width=12, extra={"max": 1}),
        Panel("Prequential recall: MFLI vs popularity", "percentunit", [
            ("mfli_prequential_recall_ratio", "{{source}}"),
        ], "Was the next engaged item in what we would have served? Popularity is the baseline to beat.",
            width=12, extra={"max": 1}),
    ]),
    ("Serving", [
        Panel("Latency per route", "s", [
            (f"histogram_quantile(0.5, sum by (route, le) (rate(mfli_request_seconds_bucket[{RATE}])))",
             "p50 {{route}}"),
            (f"histogram_quantile(0.99, sum by (route, le) (rate(mfli_request_seconds_bucket[{RATE}])))",
             "p99 {{route}}"),
        ]),
        Panel("Errors by status", "reqps", [
            (f'sum by (route, status) (rate(mfli_requests_total{{status!~"2.."}}[{RATE}]))',
             "{{status}} {{route}}"),
        ]),
        Panel("Candidates per request", "short", [
            (f"histogram_quantile(0.5, sum by (le) (rate(mfli_candidates_per_request_bucket[{RATE}])))", "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate(mfli_candidates_per_request_bucket[{RATE}])))", "p99"),
        ]),
        Panel("Encoder inputs computed (share of history items)", "percentunit", [
            (f'sum(rate(mfli_encoder_inputs_total{{result="computed"}}[{RATE}])) / '
             f"sum(rate(mfli_encoder_inputs_total[{RATE}]))", "computed"),
        ], "The server caches each history item's encoder input per weights version; the rest is computed "
           "per request (docs/design.md, Serving).", extra={"max": 1}),
    ]),
    # one series per learner rank (mfli learn --workers N): each rank is its own scrape target, and
    # mfli_learner_rank_info names its rank, so the series are joined on the scrape instance
    ("Learner group (data-parallel ranks)", [
        Panel("Events / s per rank", "ops", [
            (f"sum by (instance) (rate(mfli_learner_events_total[{RATE}]))" + BY_RANK, "rank {{rank}}"),
        ]),
        Panel("Step time p95 per rank", "s", [
            (f"histogram_quantile(0.95, sum by (instance, le) (rate(mfli_learner_step_seconds_bucket"
             f"{{phase=\"total\"}}[{RATE}])))" + BY_RANK, "rank {{rank}}"),
        ]),
        Panel("Collective seconds / s per rank", "s", [
            (f"sum by (instance) (rate(mfli_learner_collective_seconds_sum[{RATE}]))" + BY_RANK, "rank {{rank}}"),
        ], "Share of each rank's wall time spent in the group's collectives (waiting for the slowest rank included)."),
        Panel("Collective bytes per event per rank", "bytes", [
            (f"sum by (instance) (rate(mfli_learner_collective_bytes_total[{RATE}])) / "
             f"sum by (instance) (rate(mfli_learner_events_total[{RATE}]))" + BY_RANK, "rank {{rank}}"),
        ]),
        Panel("Partition lag per rank", "short", [
            ("sum by (instance) (mfli_consumer_lag_messages{topic=\"mfli.events\"})" + BY_RANK, "rank {{rank}}"),
        ], width=24),
    ]),
    ("Processes", [
        Panel("Up / ready", "short", [
            ('up{job=~"mfli-.*"}', "scrape {{job}}"),
            ("mfli_process_up", "up {{process}}"),
            ("mfli_process_ready", "ready {{process}}"),
        ], kind="stat"),
        Panel("Learner step time p95", "s", [
            (f"histogram_quantile(0.95, sum by (phase, le) (rate(mfli_learner_step_seconds_bucket[{RATE}])))",
             "p95 {{phase}}"),
        ]),
        Panel("Learner loss", "short", [
            ("mfli_learner_loss", "f{{facet}} {{objective}} {{kind}}"),
        ]),
        Panel("Full pass, checkpoint time and LMDB errors", "s", [
            (f"rate(mfli_index_full_pass_seconds_sum[{RATE}]) / rate(mfli_index_full_pass_seconds_count[{RATE}])",
             "full pass mean"),
            (f"rate(mfli_checkpoint_seconds_sum[{RATE}]) / rate(mfli_checkpoint_seconds_count[{RATE}])",
             "checkpoint mean"),
            (f"sum by (kind) (increase(mfli_lmdb_errors_total[{RATE}]))", "lmdb errors {{kind}}"),
        ], width=12),
        Panel("Index version and applied offsets", "short", [
            ("mfli_index_version", "version"),
            ("mfli_index_applied_offset", "offset p{{partition}}"),
        ], width=12),
    ]),
]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if "max" in panel.extra:
        defaults["min"], defaults["max"] = 0, panel.extra["max"]
    if "thresholds" in panel.extra:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": panel.extra["thresholds"]}],
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def build() -> dict[str, Any]:
    """The dashboard as a dict (Grafana schema 38, provisioned from a file)."""
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y, x = next_id + 1, y + 1, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel_json(panel, next_id, x, y))
            next_id, x = next_id + 1, x + panel.width
        y += 8
    return {
        "uid": "mfli-overview",
        "title": "mfli: streaming retrieval",
        "description": "Throughput, lag, freshness, drift, codebook health, clusters, recall, latency "
                       "(docs/design.md §Observability).",
        "tags": ["mfli"],
        "timezone": "browser",
        "schemaVersion": 38,
        "version": 1,
        "editable": True,
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.write_text(render())
    log.info("wrote %s (%d panels)", OUT, sum(1 for p in build()["panels"] if p["type"] != "row"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
