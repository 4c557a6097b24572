"""One settings tree for every mfli process.

Every value can be set from the environment with the prefix ``MFLI_`` and ``__`` between levels, e.g.
``MFLI_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``MFLI_MODEL__FACETS=1``. Kafka option names mirror
Kafka's own (``session_timeout_ms``) so users can carry their knowledge over. Defaults follow docs/design.md;
where a default was changed after a measurement, the field's description says so.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    """Broker address, topic names and client timeouts shared by producers and consumers."""

    bootstrap_servers: str = Field(
        "", description="host:port[,host:port]; empty means start the embedded test broker (demo only)"
    )
    events_topic: str = "mfli.events"
    items_topic: str = "mfli.items"
    dlq_topic: str = "mfli.events.dlq"
    item_updates_topic: str = "mfli.item-updates"
    index_changes_topic: str = Field(
        "mfli.index-changes", description="indexer -> server replicas: every committed index change (one "
        "partition, log-compacted; mfli.indexer.publish_changes)")
    user_state_topic: str = Field(
        "mfli.user-state", description="learner -> server replicas: each user's stored history, keyed by "
        "user (log-compacted)")
    partitions: int = Field(4, ge=1, description="partitions created for mfli topics that do not exist yet")
    learner_group: str = "mfli-learner"
    indexer_group: str = "mfli-indexer"
    client_id: str = "mfli"
    # Tansu holds a JoinGroup for half the session timeout; small values keep tests fast
    # (docs/design.md §Kafka and the embedded broker).
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(1_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    max_poll_records: int = Field(
        20_000, ge=1, description="records per poll; large, because kafka-python sends the next fetch only once "
        "a poll drained the buffer (20k vs 5k: ~1.6x validated ingest rate, `mfli bench ingest`)")
    # 20 ms: a fetch waits this long only when no data is there, so it costs no throughput and took
    # ~80 ms off every hop of the freshness path (measured with `mfli bench freshness`).
    fetch_max_wait_ms: int = Field(20, ge=0)
    request_timeout_ms: int = Field(30_000, ge=1000)
    reconnect_backoff_max_ms: int = Field(5_000, ge=50)
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group with no committed offset starts ('latest' is wrong on Tansu)"
    )
    fetch_max_bytes: int = Field(52_428_800, ge=1024, description="bytes per fetch response")
    max_partition_fetch_bytes: int = Field(1_048_576, ge=1024, description="bytes per partition per fetch")
    producer_linger_ms: int = Field(5, ge=0, description="producer batching delay")
    producer_batch_size: int = Field(262_144, ge=1024, description="producer batch bytes per partition")

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> KafkaSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        return self


class IngestSettings(BaseModel):
    """Validation, de-duplication and micro-batching of interaction events."""

    batch_size: int = Field(2_048, ge=1, description="events handed to the learner per micro-batch")
    batch_timeout_ms: int = Field(
        100, ge=1, description="hand over a partial batch after this long (only matters when not backlogged; "
        "100 ms measured: freshness p95 1.3 s -> 0.95 s with the flush interval below)")
    dedupe_window: int = Field(1_000_000, ge=0, description="recent event_ids remembered for de-duplication")
    max_event_bytes: int = Field(16_384, ge=64, description="larger records go to the DLQ as oversized")
    event_types: list[str] = Field(
        default_factory=lambda: ["view", "click", "like", "long_view", "rating", "purchase", "tag"],
        description="accepted event_type values; anything else goes to the DLQ",
    )


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX-512 BF16 or AMX), by its Linux cpuinfo flags;
    False where they cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


class ModelSettings(BaseModel):
    """The MFLI model (docs/design.md §Model)."""

    facets: int = Field(
        1, ge=1, description="F. 1 after a measurement (issue 11): with the sequence encoder and a full "
        "softmax, F=3 (mixture-of-softmaxes gates, per-facet objectives) did not beat F=1 on an ml-1m "
        "validation slice and costs ~2.5x the learner time; see the README's ablations")
    members: int = Field(
        2, ge=1, description="K independently seeded copies of the model (each F=1), whose vectors are the "
        "index's K facets and whose scores are pooled by `ensemble_pooling`: "
        "an ensemble at K times the learner's work; `mfli learn` runs one learner rank (process) per member "
        "(learner/members.py). 2 (was 1) after issue 11's test periods (streaming HR@20, index path, x SASRec, "
        "with label smoothing): one model ml-1m 1.081, ml-100k 1.074; two members 1.105 / 1.107 (README). "
        "Measured on validation slices (streaming HR@20, exact, "
        "two seeds vs their ensemble): ml-100k .3318 / .3174 -> .3370, ml-1m .4796 / .4771 -> .4867")
    ensemble_pooling: Literal["linear", "mixture"] = Field(
        "linear", description="how an ensemble's member scores combine: `linear` (their mean: the members are "
        "noisy estimates of one score) or `mixture` (as one model's facets: a mixture of softmaxes with uniform "
        "gates). Measured (streaming HR@20, linear vs mixture): level for seed-only members (validation slices "
        "ml-1m .4867 vs .4859, ml-100k .3365 vs .3370, three members .3378 vs .3382; ml-100k test period, three "
        "seeds, .3332 vs .3325) and ahead for members that differ in a setting (+.002 to +.007 in four pairs); "
        "linear is also one dot per candidate in the compiled rerank instead of a log-sum-exp per facet")
    dim: int = Field(
        96, ge=4, description="d, the width of an item's facet vector (and of the query encoder unless encoder_dim "
        "is set). 96 after a measurement (validation slices, streaming HR@20, exact): ml-1m .4393 (64) -> .4521 "
        "(96) -> .4581 (128), ml-100k .2685 -> .2897 (96); mfli bench learn 6.6k / 5.5k / 4.5k events/s, and "
        "the learner must keep >= 5k on this 2-core box")
    levels: int = Field(2, ge=1, description="residual-quantisation levels per facet")
    codewords: int = Field(0, ge=0, description="codewords per level; 0 = auto (M^L ~ items/32, >= 8)")
    history: int = Field(50, ge=1, description="H: recent engaged items pooled into the query vector")
    recency_decay: float = Field(0.97, gt=0, le=1, description="weight ratio between consecutive history items")
    temperature: float = Field(
        0.1, gt=0, description="softmax temperature of the training losses over cosine scores (and of the facet "
        "mixture). 0.1 after a measurement (validation slices, streaming HR@20, exact; 0.05 / 0.07 / 0.1 / 0.14): "
        "ml-1m .4521 / .4547 / .4522 / -, ml-100k .2897 / .2936 / .3048 / .3071, ml-latest-small (full softmax) "
        ".0998 / - / .1124 / .1117; a learned temperature stayed at the training loss's sharper optimum (.4512, "
        ".2886, .0775 sampled)")
    objectives: list[str] = Field(default_factory=lambda: ["engagement", "positive", "semantic"])
    # w[facet][objective]; one row per facet. The default gives each facet a distinct mixture.
    objective_weights: list[list[float]] = Field(
        default_factory=lambda: [[1.0, 0.0, 0.0], [0.3, 1.0, 0.0], [0.3, 0.0, 1.0]]
    )
    positive_threshold: float = Field(4.0, description="value >= this counts for the 'positive' objective")
    learning_rate: float = Field(0.05, gt=0)
    commitment: float = Field(0.25, ge=0)
    quantised_loss: bool = Field(
        False, description="also train the ranking on the RQ reconstructions (a second softmax, in-batch "
        "negatives). Off after a measurement (validation slices, streaming HR@20, exact; on -> off): ml-1m "
        ".4709 -> .4796 (seed 1: .4771), ml-100k .3284 / .3183 -> .3318 / .3174, ml-latest-small .1239 -> .1236; "
        "the codewords still follow the vectors and the commitment term still pulls the vectors to their codes")
    warmup_events: int = Field(20_000, ge=0, description="events before k-means codebook initialisation")
    overuse_penalty: float = Field(0.1, ge=0)
    dead_code_window: int = Field(20, ge=1, description="steps a codeword may stay unused before reset")
    popularity_half_life_events: float = Field(50_000, gt=0, description="decay of per-item counts")
    popularity_beta: float = Field(
        0.02, ge=0, description="weight of log(1 + decayed count) in rerank. Scores are cosines (|s| <= 1), so "
        "the old 3.0 let popularity decide nearly every answer (streaming HR@20 ~0.09 vs ~0.43 on the ml-1m "
        "validation slice); 0.02 is what `mfli eval`'s prior tuning picks on ml-1m (0.05 on the two small sets)")
    seed: int = 0
    # --- learner internals (issue 3) ---
    # 128 after a measurement on ml-1m (1 pass, batch 1024, same prior): negatives 128/256/512 gave exact
    # R@100 .2580/.2597/.2620 and R@20 .0895/.0904/.0916 at 19.7k/14.7k/7.7k events/s (issue 3 note).
    negatives: int = Field(128, ge=0, description="in-batch negatives per event (random subset of the batch's items)")
    codebook_learning_rate: float = Field(0.01, gt=0, description="Adagrad step of the RQ codewords")
    level_interval_events: int = Field(10_000, ge=0, description="events between activating successive RQ levels")
    usage_interval_steps: int = Field(
        10, ge=1, description="steps between codebook usage counts (and dead-code checks)")
    logq_half_life_events: float = Field(200_000, gt=0, description="decay of the log-Q item-frequency estimate")
    # --- query tower (issue 11) ---
    query_model: Literal["encoder", "mean"] = Field(
        "encoder", description="'encoder': causal attention over the last H items (learner/encoder.py); "
        "'mean': the recency-weighted mean of the history's vectors (the pre-issue-11 query, an ablation)")
    encoder_heads: int = Field(2, ge=1, description="attention heads of the query encoder")
    encoder_dim: int = Field(0, ge=0, description="the query encoder's own width (attention, feed-forward); "
                             "0 = dim. Its input is the F*dim item vectors and its output F queries of dim")
    mask_seen_negatives: bool = Field(
        True, description="leave the items of an event's history window out of its softmax negatives: the "
        "server excludes a user's history from answers, so ranking them low is capacity spent on nothing "
        "(ml-1m validation slice, streaming HR@20: .4393 on vs .4311 off)")
    seen_items: int = Field(
        1000, ge=0, description="per user, the newest engaged items kept beside the query window: answers leave "
        "them out (the users store holds them; queries read the newest `history`), and so does each training "
        "event's softmax (with mask_seen_negatives), which before left out only the window. Never fewer than "
        "`history`. Measured (streaming HR@20): ml-1m validation slice, window only .4684 (seed 1 .4668), newest "
        "1,000 .4709, every earlier item .4728 (seed 1 .4692); ml-100k slice level (.3285 / .3284); ml-1m test "
        "period, 3-seed mean, index path, 0.3195 -> 0.3235 (1.045 -> 1.059x SASRec), ml-100k level. Costs ~6 % "
        "of the learner's events/s (gathering and masking each event's kept items)")
    encoder_input: Literal["shared", "separate"] = Field(
        "shared", description="what the encoder reads for a history item: 'shared' = the indexed vectors "
        "(the server already holds them), 'separate' = a context table of its own (learner-side only: "
        "an ablation, scored exactly; the server cannot run it)")
    encoder_dropout: float = Field(
        0.0, ge=0, lt=1, description="0 measured best (ml-1m validation slice, one pass + replay: HR@20 "
        ".4312 vs .4246 at 0.2): a stream rarely repeats an example, so there is little to over-fit")
    encoder_learning_rate: float = Field(2e-3, gt=0, description="Adam step of the encoder's dense weights")
    uniform_negatives: int = Field(
        4096, ge=0, description="negatives drawn uniformly from the live catalogue per step (shared by the "
        "batch), beside the in-batch ones; log-Q corrects for the mixture. A catalogue no larger than this "
        "gets a full softmax. Measured on an ml-1m validation slice: 512 -> full (3.9k) lifted streaming "
        "HR@20 .3406 -> .3918")
    full_softmax_items: int = Field(
        16_384, ge=0, description="train with a full softmax over the live catalogue while it holds at most this "
        "many items (or at most uniform_negatives); sampled negatives beyond. Measured on the ml-latest-small "
        "validation slice (9.7k items): streaming HR@20 .0752 sampled (4,096 uniform + in-batch, log-Q) -> "
        ".0998 full, at ~25 % fewer events/s; a [batch, items] float32 block is 2,048 x 16,384 x 4 B = 134 MB")
    facet_loss_weight: float = Field(
        0.5, ge=0, description="weight of the per-facet objective losses (w[facet, objective]) beside the "
        "loss on the combined (mixture-of-softmaxes) score; they keep facets distinct")
    load_balance: float = Field(0.01, ge=0, description="pushes the batch-mean facet gate towards uniform")
    replay_ratio: float = Field(
        1.0, ge=0, description="recent examples replayed per new event in each step (learner/replay.py); "
        "0 = off. 1 measured on an ml-1m validation slice: HR@20 .3918 -> .4246 at half the throughput")
    replay_capacity: int = Field(100_000, ge=0, description="newest training examples the replay buffer holds")
    step_events: int = Field(
        384, ge=0, description="events per optimisation step: a larger micro-batch is learned in consecutive "
        "steps of at most this many events, in stream order (0 = one step per micro-batch). The ingest batch "
        "(2,048) is sized for Kafka; the model learns more from more, smaller steps, but every step also pays "
        "for the whole catalogue under a full softmax (its gradient, the rows' Adagrad, the encoder's Adam). "
        "Measured, validation slices (streaming HR@20, exact, 1,024-event micro-batches): one step per batch "
        ".4521 ml-1m / .3048 ml-100k; 512: .4609 / .3118; 384: .4658 / .3155; 256: .4676 / .3130 (ml-latest-small "
        ".1124 -> .1233); 128: .4656 ml-1m. `mfli bench learn --runs 3 --events 100000` on a quiet 2-core box "
        "(fused softmax and window attention, allocator thresholds): 512: 6,621 events/s, 384: 5,361, 256: 4,536. "
        "384 is the smallest step that keeps the learner above its 5k events/s floor")

    softmax_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="number format of the full softmax's three products (logits, and the gradients of "
        "queries and items; float32 accumulation either way); `auto`: bfloat16 where the CPU has native bfloat16 "
        "dot products (AVX-512 BF16 or AMX), float32 elsewhere (emulated bfloat16 can be slower). Measured "
        "level in quality (streaming HR@20, bfloat16 vs float32: validation slices ml-1m .4800 vs .4796, "
        "ml-100k three seeds .3226 vs .3237; test periods ml-100k five seeds .3239 vs .3241, ml-latest-small "
        "three seeds .1222 vs .1223) and +20-26 % `mfli bench learn` events/s on this box's AVX-512 BF16 cores")
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="eps of the full softmax's target, (1 - eps) * the event's item + eps spread "
        "evenly over the items left in its softmax (the catalogue minus the user's seen items); 0 = plain "
        "cross-entropy. Applies where the softmax is full (up to `full_softmax_items`); a sampled softmax ignores "
        "it (not measured there). 0.1 after a measurement (validation slices, streaming HR@20, exact; 0 -> 0.1): "
        "ml-100k three seeds .3226 -> .3252 (0.05: .3241, 0.2: .3248), ml-1m .4800 -> .4817, ml-latest-small "
        ".1232 -> .1312: a next item is one plausible answer of many, and a hard target over-trains on it")
    serving_average: float = Field(
        0.9, ge=0, lt=1, description="decay per optimisation step of an exponential moving average of the item "
        "vectors and the encoder's weights; what the learner publishes, indexes and scores with (training "
        "continues on the raw weights). 0 = serve the raw weights. An online learner's weights carry the noise "
        "of its last few steps; averaging them over ~1/(1-decay) steps removes it at the cost of one lerp per "
        "step (see the README's averaging table)")

    @property
    def softmax_bf16(self) -> bool:
        """Whether the full softmax's products run in bfloat16 (``softmax_precision``, ``auto`` resolved)."""
        if self.softmax_precision == "auto":
            return native_bf16()
        return self.softmax_precision == "bfloat16"

    @property
    def score_tau(self) -> float:
        """The ``tau`` facet scores pool with (:func:`mfli.retrieval.query_model.combine`): the temperature,
        or inf (the linear pool) for an ensemble that pools linearly."""
        return math.inf if self.members > 1 and self.ensemble_pooling == "linear" else self.temperature

    @property
    def served_facets(self) -> int:
        """Facets of the served model (the index's, the metrics' facet label): an ensemble's member j is facet j."""
        return self.facets * self.members

    @property
    def seen_kept(self) -> int:
        """Items kept per user: the window and the seen items answers exclude (``seen_items``)."""
        return max(self.history, self.seen_items)

    @model_validator(mode="after")
    def _weights_shape(self) -> ModelSettings:
        if self.members > 1 and self.facets != 1:
            raise ValueError(f"members ({self.members}) needs facets=1 per member (got {self.facets})")
        if len(self.objective_weights) < self.facets:
            raise ValueError(
                f"objective_weights has {len(self.objective_weights)} rows; need one per facet ({self.facets})"
            )
        for row in self.objective_weights:
            if len(row) != len(self.objectives):
                raise ValueError(
                    f"each objective_weights row needs {len(self.objectives)} entries ({self.objectives})"
                )
        return self


class LearnerSettings(BaseModel):
    """The learner process: checkpoints and how often item deltas are published."""

    checkpoint_dir: Path = Path("var/learner")
    checkpoint_interval_s: float = Field(30.0, gt=0)
    probe_path: Path | None = Field(
        None, description="prequential probe (learner/probe.py): score every event before learning it and append "
        "the rank to this JSON-lines file (a group rank r writes <path>.rank<r>); off by default, it costs a "
        "[batch, items] product per step")
    flush_interval_ms: int = Field(100, ge=1, description="coalesce changed item rows this long")
    publish_min_drift: float = Field(
        0.05, ge=0,
        description="publish a changed row at once only if some facet vector moved more than this (L2) since "
        "its last publication; smaller drifts go out with the next checkpoint. Measured: sampled negatives "
        "touch nearly every row each step, and publishing them all saturated Kafka and the indexer "
        "(freshness p95 2.4 s at 5k items)",
    )
    publish_min_prior_change: float = Field(0.1, ge=0, description="the same for the popularity prior")
    model_publish_interval_s: float = Field(
        2.0, gt=0, description="publish the query encoder's weights at most this often (~100 KB each); the "
        "server computes queries with the newest version it has")
    users_path: Path = Path("var/users.lmdb")
    metrics_port: int = Field(9101, ge=0, description="a data-parallel rank serves on this + its rank on the machine")
    threads: int = Field(
        1, ge=1, description="torch intra-op threads of a learner process (each rank of a group). 1 after a "
        "measurement on a 2-core box (`mfli bench learn --runs 3 --events 100000 --threads N`): the step's "
        "tensors are small, so a second thread costs more in synchronisation than it saves (1 thread 5,641 "
        "events/s, 2 threads 4,718)")
    # --- data-parallel group (issue 14, learner/group.py) ---
    workers: int = Field(1, ge=1, description="learner ranks `mfli learn` starts on this machine (one model, "
                         "kept identical by torch.distributed; each rank owns events partitions p % N == rank)")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="torch.distributed backend (nccl on GPUs)")
    collective_timeout_s: float = Field(
        60.0, gt=0, description="a collective waiting longer than this fails its rank (a peer died or hangs), "
        "and the group restarts from its last checkpoint; longer than the slowest step plus a checkpoint")
    max_group_restarts: int = Field(20, ge=0, description="group restarts `mfli learn --workers N` makes "
                                    "after a rank failed before it gives up")


class IndexSettings(BaseModel):
    """The indexer process and the LMDB index it alone writes (docs/design.md §Index)."""

    path: Path = Path("var/index.lmdb")
    map_size: int = Field(8 << 30, ge=1 << 20, description="LMDB map size in bytes (sparse file)")
    target_cluster_size: int = Field(32, ge=1)
    split_factor: float = Field(8.0, gt=1, description="B_upp = split_factor x target")
    merge_factor: float = Field(0.25, gt=0, lt=1, description="B_low = merge_factor x target")
    split_merge: bool = Field(True, description="ablation switch for cluster balancing")
    full_pass_interval_s: float = Field(180.0, gt=0)
    store_float16: bool = False
    metrics_port: int = Field(9104, ge=0, description="9104 (was 9102): a learner group's ranks on one machine "
                              "serve on 9101 + rank (an ensemble of two: 9101, 9102)")
    sync_commits: bool = Field(
        True,
        description="fsync every write transaction (durable). False: the indexer syncs about once per "
        "second instead; measured ~2x delta throughput at 10^6 items (20.7k -> 47.9k updates/s, batch 50k). "
        "A process crash loses nothing either way; an OS crash may lose the last second (re-read from "
        "Kafka via the stored offsets) and, on filesystems that reorder writes, corrupt the index",
    )

    @property
    def b_upp(self) -> int:
        return int(self.split_factor * self.target_cluster_size)

    @property
    def b_low(self) -> int:
        return max(1, int(self.merge_factor * self.target_cluster_size))


class ServeSettings(BaseModel):
    """Retrieval and the HTTP server (docs/design.md §Serving)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0)
    workers: int = Field(1, ge=1)
    default_k: int = Field(20, ge=1)
    max_k: int = Field(1_000, ge=1)
    clusters_per_request: int = Field(
        8, ge=0, description="K clusters picked from the trigger histogram. 8 (was 64) since the router "
        "(probe_clusters) chooses clusters: on the stream-learned workload of `mfli bench serve` (100k items) "
        "64 trigger clusters + 8 codebook paths reached recall@20 0.54 with ~900 candidates; 96 probed "
        "clusters alone 0.93 with ~2,700")
    members_per_cluster: int = Field(256, ge=1, description="N_k members gathered from each cluster")
    query_paths: int = Field(
        0, ge=0, description="codebook paths descended by the query path per facet. 0 (was 8): the "
        "router's centroid scores reach the clusters this beam did, and more (see probe_clusters)")
    trending: int = Field(200, ge=0, description="size of the trending candidate source")
    probe_clusters: int | None = Field(
        None, ge=0, description="clusters per facet chosen by the query's score against their centroids "
        "(mfli.retrieval.router); 0 = off; unset: 96 for one model, 32 per member for an ensemble (each member is "
        "a facet). 32 per member after a measurement (`mfli bench serve`, 100k items, two members: 48 probes "
        "1,946 req/s, 32 probes 2,070 at recall@20 1.000; ml-1m test period index / exact 0.998)")
    probe_groups: int = Field(16, ge=1, description="centroid groups scored first on facets with more than "
                              "1024 clusters (the router's two-level tree)")
    recall_sample_interval_s: float = Field(5.0, gt=0)
    # --- server process (issue 5) ---
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger POST bodies get 413")
    recall_sample_users: int = Field(4, ge=0, description="users per tick compared with exact search (0 = off)")
    recall_window: int = Field(500, ge=1, description="index-recall checks averaged by the gauge")
    prequential_window: int = Field(2_000, ge=1, description="next-item checks averaged by the gauge")
    monitor_users: int = Field(1_000, ge=1, description="recently served users tracked by the monitors")
    monitor_users_per_tick: int = Field(200, ge=1, description="'would have served' sets recomputed per tick")
    exact_refresh_s: float = Field(
        30.0, ge=0, description="min age before exact mode rebuilds its copied item matrix (only without the "
        "float32 index mirror; with it, exact mode scores the mirror in place, current at every version)")
    replica: bool = Field(
        False, description="serve as a replica: own copies of the index and users store in "
        "replication.data_dir, fed from Kafka (mfli.server.replica), no files shared with the pipeline")

    def probes_per_facet(self, members: int) -> int:
        """``probe_clusters``, or its default for a model of ``members`` members: one model probes 96 clusters;
        an ensemble's members are its facets, and 32 each cost two members' serving least at the same recall
        (measured at 24 / 32 / 48: README "Serving"); it sits on issue 11's budget of 0.75x the mean-pooled
        one-model server's req/s."""
        if self.probe_clusters is not None:
            return self.probe_clusters
        return 96 if members == 1 else 32


class ReplicationSettings(BaseModel):
    """Server replicas fed by Kafka (issue 12): what the indexer and learner publish, and how ``mfli serve
    --replica`` applies it to its own LMDB copy (mfli.server.replica)."""

    publish: bool = Field(
        True, description="the indexer publishes its committed changes and the learner its user state, so "
        "replicas can follow; off saves that work on a single-node deployment")
    data_dir: Path = Field(Path("var/replica"), description="a replica's own index and users LMDB copies")
    max_lag_s: float = Field(
        5.0, gt=0, description="a replica is ready while its oldest unapplied change is younger than this "
        "(seconds, both topics); messages alone would flap readiness on every full pass")
    metrics_port: int = Field(9103, ge=0, description="the replica applier's /metrics (0 = off)")
    status_interval_s: float = Field(0.5, gt=0, description="how often the applier writes its status file")
    status_stale_s: float = Field(10.0, gt=0, description="an older status file means the applier is gone: not ready")
    max_offline_s: float = Field(
        72_000.0, gt=0, description="a replica stopped longer than this bootstraps again from the topic start: "
        "compaction drops tombstones after delete.retention.ms (24 h in deploy/), so an older position "
        "could miss deletions. Keep it below the topic's delete.retention.ms")
    max_value_bytes: int = Field(
        524_288, ge=1024, description="larger index values (centroids, codebooks) are published in parts of "
        "this size (Kafka's default message limit is 1 MB)")


class Settings(BaseSettings):
    """Root of the settings tree; see the module docstring for the environment syntax."""

    model_config = SettingsConfigDict(env_prefix="MFLI_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("var")
    log_level: str = "INFO"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    replication: ReplicationSettings = Field(default_factory=ReplicationSettings)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, not {value!r}")
        return value


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with keyword overrides (tests and CLI flags) on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
