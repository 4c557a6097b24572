"""Every Prometheus metric mfli exports, defined in one place (docs/design.md §Observability).

Rules this module enforces by construction: base units (seconds, bytes), ``_total`` on counters
(prometheus_client appends it), and no per-user or per-item labels — labels are bounded sets only
(facet, level, objective, partition, reason, route, status, source). Tests read values with
``REGISTRY.get_sample_value``; dashboards and alert rules reference only names defined here.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000)

# --- ingest (consumers) ---------------------------------------------------------------------------
EVENTS_CONSUMED = Counter("mfli_events_consumed", "Valid events handed on after validation", ["topic"])
EVENTS_INVALID = Counter("mfli_events_invalid", "Records sent to the dead-letter topic", ["reason"])
EVENTS_DUPLICATE = Counter("mfli_events_duplicate", "Events dropped as duplicates of a recent event_id")
CONSUMER_LAG = Gauge("mfli_consumer_lag_messages", "High watermark minus position", ["topic", "partition"])
INGEST_BATCH_SIZE = Histogram("mfli_ingest_batch_size", "Events per validated micro-batch", buckets=_BATCH_BUCKETS)
PRODUCED = Counter("mfli_events_produced", "Records produced by mfli produce", ["topic"])

# --- learner ----------------------------------------------------------------------------------------
LEARNER_STEP_SECONDS = Histogram("mfli_learner_step_seconds", "Wall time of one learner step", ["phase"])
LEARNER_EVENTS = Counter("mfli_learner_events", "Events the learner has trained on")
LEARNER_LOSS = Gauge("mfli_learner_loss", "Last step's loss", ["facet", "objective", "kind"])
CODEBOOK_UTILISATION = Gauge(
    "mfli_codebook_utilisation_ratio", "Share of codewords used by at least one item", ["facet", "level"]
)
CODEBOOK_PERPLEXITY = Gauge("mfli_codebook_perplexity", "exp(entropy) of codeword usage", ["facet", "level"])
CODEBOOK_DEAD = Gauge("mfli_codebook_dead_codewords", "Codewords unused over the reset window", ["facet", "level"])
CODEBOOK_RESETS = Counter("mfli_codebook_resets", "Dead codewords reset to a recent residual", ["facet", "level"])
EMBEDDING_DRIFT = Gauge("mfli_embedding_drift", "Mean L2 size of the last update of changed item rows", ["facet"])
USER_INTEREST_SHIFT = Gauge(
    "mfli_user_interest_shift", "Mean 1 - cosine between a user's query vector before and after a batch"
)
LEARNER_ITEMS = Gauge("mfli_learner_items", "Item rows known to the learner")
LEARNER_USERS = Gauge("mfli_learner_users", "User rows known to the learner")
LEARNER_COLLECTIVE_SECONDS = Histogram(
    "mfli_learner_collective_seconds", "Wall time of one collective of the data-parallel learner group", ["kind"]
)
LEARNER_COLLECTIVE_BYTES = Counter(
    "mfli_learner_collective_bytes", "Payload bytes this learner rank contributed to the group's collectives",
    ["kind"]
)
LEARNER_RANK = Gauge("mfli_learner_rank_info", "1, labelled with this learner's rank and group size", ["rank", "world"])
CHECKPOINT_SECONDS = Histogram("mfli_checkpoint_seconds", "Time to write a checkpoint")
ITEM_UPDATES_PUBLISHED = Counter("mfli_item_updates_published", "Item deltas published to the indexer")
USER_STATE_PUBLISHED = Counter("mfli_user_state_published", "User-state records sent to replicas (mfli.user-state)")

# --- indexer ----------------------------------------------------------------------------------------
INDEX_ITEMS = Gauge("mfli_index_items", "Items in the LMDB index")
INDEX_CLUSTERS = Gauge("mfli_index_clusters", "Clusters per facet", ["facet"])
CLUSTER_SIZE = Gauge("mfli_index_cluster_size", "Cluster size statistic per facet", ["facet", "stat"])
REASSIGNMENTS = Counter("mfli_index_reassignments", "Items moved between clusters (code churn)", ["facet"])
DELTAS_APPLIED = Counter("mfli_index_deltas_applied", "Item deltas applied to LMDB")
SPLITS = Counter("mfli_index_splits", "Clusters split", ["facet"])
MERGES = Counter("mfli_index_merges", "Clusters merged", ["facet"])
FULL_PASS_SECONDS = Histogram("mfli_index_full_pass_seconds", "Duration of a full re-encode and rebalance")
FRESHNESS_SECONDS = Histogram(
    "mfli_index_freshness_seconds", "Event time to change visible in LMDB", buckets=_FRESHNESS_BUCKETS
)
INDEX_VERSION = Gauge("mfli_index_version", "Index version (bumps on every committed write)")
INDEX_APPLIED_OFFSET = Gauge("mfli_index_applied_offset", "Source offset stored with the index", ["partition"])
INDEX_CHANGES_PUBLISHED = Counter(
    "mfli_index_changes_published", "Index-change records sent to replicas (mfli.index-changes)")
INDEX_CHANGES_UNACKED = Gauge(
    "mfli_index_changes_unacked", "Index commits queued or in flight to Kafka, not yet acknowledged")
LMDB_ERRORS = Counter("mfli_lmdb_errors", "LMDB write failures (e.g. map full)", ["kind"])

# --- server -----------------------------------------------------------------------------------------
REQUEST_SECONDS = Histogram("mfli_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS)
REQUESTS = Counter("mfli_requests", "HTTP requests by route and status", ["route", "status"])
CANDIDATES = Histogram("mfli_candidates_per_request", "Candidates reranked per request", buckets=_BATCH_BUCKETS)
FALLBACKS = Counter("mfli_fallbacks", "Requests answered by the popularity/fresh fallback")
ENCODER_INPUTS = Counter(
    "mfli_encoder_inputs", "History items of request queries: encoder input cached or computed", ["result"])
INDEX_RECALL = Gauge("mfli_index_recall_ratio", "Sampled recall@k of the index path vs exact search", ["k"])
PREQUENTIAL_RECALL = Gauge(
    "mfli_prequential_recall_ratio", "Share of next engaged items found in what we would have served", ["source"]
)

# --- server replica (its applier process) -----------------------------------------------------------------
REPLICA_LAG_MESSAGES = Gauge("mfli_replica_lag_messages", "High watermark minus applied offset", ["topic"])
REPLICA_LAG_SECONDS = Gauge(
    "mfli_replica_lag_seconds", "Age of the oldest change received or waiting but not yet applied", ["topic"])
REPLICA_FRESHNESS_SECONDS = Histogram(
    "mfli_replica_freshness_seconds", "Event (ingest) time to change visible in the replica's LMDB", ["kind"],
    buckets=_FRESHNESS_BUCKETS)
REPLICA_INDEX_VERSION = Gauge("mfli_replica_index_version", "Index version of the replica's copy")
REPLICA_RECORDS = Counter("mfli_replica_records_applied", "Records applied to the replica's copy", ["topic"])
REPLICA_BAD_RECORDS = Counter("mfli_replica_bad_records", "Records the replica could not decode (skipped)", ["topic"])
REPLICA_BOOTSTRAPS = Counter("mfli_replica_bootstraps", "Times the replica rebuilt its copy from the topic start")

# --- any process --------------------------------------------------------------------------------------
UP = Gauge("mfli_process_up", "1 while the process main loop runs", ["process"])
READY = Gauge("mfli_process_ready", "1 when the process can do its work (broker, index reachable)", ["process"])


# Which families each process exports. All metrics live in one module (one place for names), but a
# process must not export another's: an unlabelled gauge would show up as a constant 0 from every
# process, doubling dashboard series and making "is the indexer stuck?" alerts match the learner.
PROCESS_PREFIXES: dict[str, tuple[str, ...]] = {
    "learner": ("mfli_events_", "mfli_consumer_lag", "mfli_ingest_", "mfli_learner_", "mfli_codebook_",
                "mfli_embedding_", "mfli_user_", "mfli_checkpoint_", "mfli_item_updates_", "mfli_process_"),
    "replica": ("mfli_replica_", "mfli_lmdb_", "mfli_process_"),
    "indexer": ("mfli_index_items", "mfli_index_clusters", "mfli_index_cluster_size", "mfli_index_reassignments",
                "mfli_index_deltas", "mfli_index_splits", "mfli_index_merges", "mfli_index_full_pass",
                "mfli_index_freshness", "mfli_index_version", "mfli_index_applied", "mfli_index_changes",
                "mfli_lmdb_",
                "mfli_consumer_lag", "mfli_process_"),
    "server": ("mfli_request", "mfli_candidates", "mfli_fallbacks", "mfli_encoder_inputs", "mfli_index_recall",
               "mfli_prequential", "mfli_lmdb_", "mfli_process_"),
}


class _ProcessCollector:
    """The default registry's families whose name starts with one of a process's prefixes (plus the
    client's own ``process_*``/``python_*`` families)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes

    def collect(self):
        for family in REGISTRY.collect():
            if not family.name.startswith("mfli_") or family.name.startswith(self.prefixes):
                yield family


def process_registry(process: str) -> CollectorRegistry:
    """A registry exposing only ``process``'s metrics (``learner``, ``indexer`` or ``server``)."""
    if process not in PROCESS_PREFIXES:
        raise ValueError(f"process must be one of {sorted(PROCESS_PREFIXES)}, not {process!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProcessCollector(PROCESS_PREFIXES[process]))
    return registry


def serve_metrics(port: int, process: str | None = None) -> None:
    """Expose ``/metrics`` on ``port`` from a daemon thread (learner and indexer; the server uses its own
    port). With ``process``, only that process's families are exported."""
    if port:
        start_http_server(port, registry=process_registry(process) if process else REGISTRY)
