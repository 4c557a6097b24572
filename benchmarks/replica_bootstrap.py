"""Replica bootstrap cost: how long a new ``mfli serve --replica`` takes to copy an index of N items from
``mfli.index-changes`` (read from the topic start), and how long the indexer takes to publish it.

Used by ``mfli bench freshness`` (``--bootstrap-items``). The primary index is a synthetic catalogue
written through the real :class:`~mfli.storage.index.writer.IndexWriter` with the real publisher attached
(chunked delta commits, then a full pass, which republishes every item: so the topic holds about 2N item
records before compaction, as a live topic would between compactions); the replica is the real process.
Timed: publish (writer commits until Kafka acknowledged every record), replica start → its copy at the
primary's version (``mfli index check --against`` then confirms the bytes), start → ``/readyz`` 200, and
start → the HTTP worker first answers (process start-up, numba warm-up: not replication; at small N it
dominates, so the per-100k figure means something only for a large catalogue).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import httpx

from mfli.config import Settings

log = logging.getLogger(__name__)


def _replica_version(path: Path) -> int:
    from mfli.storage.index.copy import copy_position

    return copy_position(path)[1]


def measure(settings: Settings, state: Path, items: int, sup, env: dict[str, str], port: int) -> dict:
    """Returns publish and bootstrap seconds (and per 100k items) for a catalogue of ``items``."""
    from mfli.benchmarks.workloads import synthetic_catalogue
    from mfli.indexer.publish_changes import attach
    from mfli.storage.index.compare import compare_indexes
    from mfli.storage.index.writer import IndexWriter

    s = settings.model_copy(deep=True)
    s.kafka.index_changes_topic = "mfli.bench.index-changes"
    s.kafka.user_state_topic = "mfli.bench.user-state"
    snap = synthetic_catalogue(items, facets=s.model.facets, dim=s.model.dim, seed=21)
    path = state / "bootstrap-primary.lmdb"
    writer = IndexWriter(path, s.index)
    publisher = attach(writer, s)
    started = time.perf_counter()
    writer.load_snapshot(snap)
    committed = time.perf_counter() - started
    while not publisher.idle():
        time.sleep(0.05)
    published = time.perf_counter() - started
    version = writer.index_version
    records = publisher.sent_versions
    publisher.close()
    writer.close()
    log.info("bootstrap phase: %d items indexed in %.1f s, published in %.1f s", items, committed, published)
    data = state / "replica-bootstrap"
    child = sup.add("replica-bootstrap", ["--log-level", "WARNING", "serve", "--replica", "--data-dir", str(data),
                                          "--port", str(port), "--no-monitor"],
                    env={**env, "MFLI_KAFKA__INDEX_CHANGES_TOPIC": s.kafka.index_changes_topic,
                         "MFLI_KAFKA__USER_STATE_TOPIC": s.kafka.user_state_topic})
    t0 = time.perf_counter()
    child.start()
    copied = ready = up = None
    deadline = t0 + 1800
    while time.perf_counter() < deadline and (copied is None or ready is None):
        if copied is None and _replica_version(data / "index.lmdb") == version:
            copied = time.perf_counter() - t0
        if ready is None:
            with contextlib.suppress(httpx.HTTPError):  # the replica's HTTP worker is not up yet: poll again
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
                up = up if up is not None else time.perf_counter() - t0  # the HTTP worker answers
                if status == 200:
                    ready = time.perf_counter() - t0
        time.sleep(0.1)
    child.stop()
    same = compare_indexes(path, data / "index.lmdb", s.index.map_size, wait_s=5).ok if copied else False
    per = 100_000 / items
    return {"items": items, "index_seconds": round(committed, 2), "publish_seconds": round(published, 2),
            "commits": records, "copied_seconds": None if copied is None else round(copied, 2),
            "ready_seconds": None if ready is None else round(ready, 2),
            "process_up_seconds": None if up is None else round(up, 2),
            "copied_seconds_per_100k": None if copied is None else round(copied * per, 2),
            "identical": same}
