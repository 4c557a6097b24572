"""``mfli demo``: the whole system on one machine with one command.

Starts the embedded broker (unless ``--bootstrap`` names a real Kafka), creates the topics, then runs
producer, learner, indexer and server as supervised child processes, prints the URLs to try and a live
status line built from the children's own ``/metrics``. A child that crashes is reported with the tail
of its log; Ctrl-C (or ``--duration``) stops everything cleanly, and a demo killed outright (SIGKILL)
takes its children and the broker with it (:mod:`mfli.orchestration.supervisor`).

The terminal shows only the banner, the status line and crash reports. Log records, the demo's own
and its libraries' (one ``httpx`` line per scrape, kafka-python's connection chatter), go to
``<state-dir>/logs/demo.log``, next to each child's log.

With the embedded broker (in-memory, it forgets everything when it stops) the demo starts from an
empty state directory each time, because stored Kafka offsets would point into a log that no longer
exists. With ``--bootstrap`` the state directory is kept and the processes resume where they stopped.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import httpx

from mfli.config import Settings
from mfli.kafka.broker import EmbeddedBroker
from mfli.kafka.clients import ensure_topics
from mfli.lifecycle import stop_on_signals
from mfli.orchestration.report import Curve, ReportData, lmdb_index_stats, write_report
from mfli.orchestration.supervisor import Supervisor, pipeline_env, scrape, wait_http

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None, help="external Kafka host:port (default: embedded broker)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port of the server (default 8000)")
    parser.add_argument("--dataset", default=None, help="MovieLens directory to replay instead of synthetic data")
    parser.add_argument("--events", type=int, default=2_000_000, help="synthetic events to produce")
    parser.add_argument("--rate", type=float, default=2_000.0, help="events per second produced (0 = max)")
    parser.add_argument("--state-dir", default="var/demo", help="LMDB files, checkpoints and logs")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = run)")
    parser.add_argument("--status-interval", type=float, default=2.0)
    parser.add_argument("--traffic", type=int, default=4,
                        help="users asked for recommendations per status tick, so the server's recall monitors "
                        "have someone to judge (0 = only your own requests)")
    parser.add_argument("--report", default=None, metavar="PATH.html",
                        help="at shutdown, write an HTML report: recall/freshness over time, cluster sizes, "
                        "codebook usage (from the LMDB index)")


def _histogram_quantile(now: dict[str, float], before: dict[str, float], name: str, q: float) -> float:
    """Quantile of a histogram over the window between two scrapes (like PromQL's histogram_quantile)."""
    buckets = []
    for key, value in now.items():
        if key.startswith(f"{name}_bucket{{") and "le=" in key:
            le = key.split("le=")[1].split(",")[0].rstrip("}")
            buckets.append((math.inf if le == "+Inf" else float(le), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span else 1.0)
        prev_le, prev_count = le, count
    return math.nan


def _total(sample: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in sample.items() if k == prefix or k.startswith(prefix + "{"))


def merge(scrapes: list[dict[str, float]]) -> dict[str, float]:
    """One sample dict from several processes' scrapes, summing same-named series.

    Every process imports the one metrics module, so every process exports every *unlabelled* metric
    (the server reports ``mfli_index_items 0`` and empty freshness buckets too). Overwriting would let
    the last scrape's zeros hide the indexer's values; summing keeps the owner's value.
    """
    out: dict[str, float] = {}
    for sample in scrapes:
        for key, value in sample.items():
            out[key] = out.get(key, 0.0) + value
    return out


def status_values(now: dict[str, float], before: dict[str, float], dt: float, k: int = 20) -> dict[str, float]:
    """The status line's numbers (also collected over time for ``--report``)."""
    rate = (_total(now, "mfli_learner_events_total") - _total(before, "mfli_learner_events_total")) / max(dt, 1e-9)
    return {
        "events_per_s": rate,
        "lag": _total(now, "mfli_consumer_lag_messages"),
        "freshness_p95_s": _histogram_quantile(now, before, "mfli_index_freshness_seconds", 0.95),
        "index_recall": now.get(f"mfli_index_recall_ratio{{k={k}}}", math.nan),
        "prequential_index": now.get("mfli_prequential_recall_ratio{source=index}", math.nan),
        "prequential_popularity": now.get("mfli_prequential_recall_ratio{source=popularity}", math.nan),
        "clusters": _total(now, "mfli_index_clusters"),
        "items": now.get("mfli_index_items", 0.0),
        "invalid": _total(now, "mfli_events_invalid_total"),
    }


def status_line(now: dict[str, float], before: dict[str, float], dt: float, k: int = 20) -> str:
    """One human line from merged scrapes of all processes."""
    v = status_values(now, before, dt, k)
    rate, lag, fresh, recall = v["events_per_s"], v["lag"], v["freshness_p95_s"], v["index_recall"]
    preq, clusters, items, invalid = v["prequential_index"], v["clusters"], v["items"], v["invalid"]
    return (
        f"events/s {rate:7.0f} | lag {lag:6.0f} | freshness p95 {fresh:5.2f}s | index recall@{k} {recall:4.2f} "
        f"| prequential {preq:4.2f} | items {items:6.0f} clusters {clusters:5.0f} | dead-lettered {invalid:.0f}"
    )


def log_to_file(path: Path) -> None:
    """Send every log record of this process (mfli's, httpx's per request, kafka-python's per
    connection) to ``path`` instead of the terminal, which keeps the banner, the status line and crash
    reports. Each child already logs to its own file next to it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    state = Path(args.state_dir).resolve()
    port = args.port or settings.serve.port
    bootstrap = args.bootstrap or settings.kafka.bootstrap_servers
    broker = None
    if not bootstrap and state.exists():
        shutil.rmtree(state)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    log_to_file(state / "logs" / "demo.log")
    if not bootstrap:
        broker = EmbeddedBroker(log_path=state / "logs" / "broker.log").start()
        bootstrap = broker.bootstrap
    k = settings.kafka
    ensure_topics(bootstrap, k, [k.events_topic, k.items_topic, k.dlq_topic, k.item_updates_topic])
    env = pipeline_env(state, bootstrap, fast_groups=False, MFLI_SERVE__PORT=str(port))
    if broker is not None:  # a local demo: quick group joins on the embedded broker
        env.setdefault("MFLI_KAFKA__SESSION_TIMEOUT_MS", "6000")
        env.setdefault("MFLI_KAFKA__HEARTBEAT_INTERVAL_MS", "1000")
        # The first full pass runs on the learner's pre-warm-up codebook (one cluster per facet); a
        # new-size codebook triggers another, but level activation does not, so without this the demo
        # would serve from [1, 1, 1] clusters for the default 180 s. Small catalogue: a pass is ~0.1 s.
        env.setdefault("MFLI_INDEX__FULL_PASS_INTERVAL_S", "20")
    sup = Supervisor(state / "logs", env)
    produce = ["produce", "--rate", str(args.rate)]
    produce += ["--dataset", args.dataset] if args.dataset else ["--synthetic", str(args.events)]
    sup.add("learner", ["learn"])
    sup.add("indexer", ["index"])
    sup.add("server", ["serve"])
    sup.add("producer", produce)
    stopping = stop_on_signals()
    base = f"http://{settings.serve.host}:{port}"
    ranks = max(settings.model.members, settings.learner.workers)  # a learner group's rank r: metrics_port + r
    metrics_urls = [
        f"http://127.0.0.1:{settings.learner.metrics_port}/metrics",
        f"http://127.0.0.1:{settings.index.metrics_port}/metrics",
        f"{base}/metrics",
        *(f"http://127.0.0.1:{settings.learner.metrics_port + r}/metrics" for r in range(1, ranks)),
    ]
    failed = False
    history: list[dict[str, float]] = []
    try:
        sup.start_all()
        sys.stdout.write(
            f"\nmfli demo — broker {bootstrap}{' (embedded)' if broker else ''}, state in {state}\n"
            f"  curl '{base}/v1/recommend?user_id=u1&k=10'\n"
            f"  curl '{base}/v1/items/<item_id>/similar?k=10'\n"
            f"  curl {base}/readyz ; curl {base}/metrics\n"
            f"  learner metrics {metrics_urls[0]}  indexer metrics {metrics_urls[1]}\n"
            f"  logs in {state / 'logs'}; Ctrl-C stops everything\n"
            + (f"  the demo itself asks for {args.traffic} users' recommendations per tick (feeds the recall "
               f"monitors; --traffic 0 turns it off)\n" if args.traffic else "") + "\n"
        )
        sys.stdout.flush()
        wait_http(f"{base}/livez", timeout_s=30)
        started = time.monotonic()
        before: dict[str, float] = {}
        last = time.monotonic()
        traffic = _Traffic(base, args.traffic, synthetic=not args.dataset)
        while not stopping.wait(args.status_interval):
            for child in sup.crashed():
                if child.name == "producer" and child.proc and child.proc.returncode == 0:
                    sys.stdout.write("\nproducer finished its stream\n")
                    continue
                failed = True
                sys.stdout.write(
                    f"\n!! {child.name} exited with status {child.proc.returncode if child.proc else '?'}; "
                    f"last log lines:\n{child.log_tail()}\n"
                )
            traffic.tick()
            now = merge([scrape(url) for url in metrics_urls])
            t = time.monotonic()
            history.append({"t": t - started, **status_values(now, before, t - last, settings.serve.default_k)})
            line = status_line(now, before, t - last, settings.serve.default_k)
            # One line rewritten in place on a terminal; one line per tick in a log or a pipe.
            sys.stdout.write(f"\r{line}" if sys.stdout.isatty() else f"{line}\n")
            sys.stdout.flush()
            before, last = now, t
            if args.duration and t - started >= args.duration:
                break
    finally:
        sys.stdout.write("stopping…\n")
        sup.stop_all()
        if broker is not None:
            broker.stop()
    if args.report:
        _write_report(args.report, state, settings, history)
    return 1 if failed else 0


class _Traffic:
    """A few recommendation requests per tick for users the stream has (``u<i>`` synthetic, ``<i>``
    MovieLens): the server's index-recall and prequential monitors only judge users it has served."""

    def __init__(self, base: str, per_tick: int, synthetic: bool, users: int = 200) -> None:
        self.base, self.per_tick, self.synthetic, self.users = base, per_tick, synthetic, users
        self.rng = random.Random(0)

    def tick(self) -> None:
        for _ in range(self.per_tick):
            n = self.rng.randrange(self.users)
            user = f"u{n}" if self.synthetic else str(n + 1)
            try:
                httpx.get(f"{self.base}/v1/recommend", params={"user_id": user, "k": 10}, timeout=1.0)
            except httpx.HTTPError:
                return


def _write_report(path: str, state: Path, settings: Settings, history: list[dict[str, float]]) -> None:
    data = ReportData(title="mfli demo", recall_xlabel="seconds since start", recall_ylabel="recall")
    t = [h["t"] for h in history]

    def col(name: str) -> list[float | None]:
        return [None if math.isnan(h[name]) else h[name] for h in history]

    k = settings.serve.default_k
    data.recall_curves = [Curve(f"index recall@{k} (vs exact)", t, col("index_recall")),
                          Curve(f"prequential recall@{k}: index", t, col("prequential_index")),
                          Curve(f"prequential recall@{k}: popularity", t, col("prequential_popularity"))]
    data.extra_curves = [("freshness p95 (event -> visible in index)", "seconds",
                          [Curve("freshness p95", t, col("freshness_p95_s"))]),
                         ("throughput", "events / s", [Curve("learner events/s", t, col("events_per_s"))])]
    index_path = state / "index.lmdb"
    if index_path.exists():
        try:
            data.cluster_sizes, data.codeword_counts = lmdb_index_stats(index_path, settings.index.map_size)
        except Exception as exc:  # noqa: BLE001 - a report without the index beats no report
            log.warning("could not read %s for the report: %s", index_path, exc)
    data.size_bounds = (settings.index.b_low, settings.index.b_upp)
    if history:
        last = history[-1]
        data.summary = {"duration s": round(last["t"], 1), "items": last["items"], "clusters": last["clusters"],
                        f"index recall@{k}": last["index_recall"], "prequential (index)": last["prequential_index"],
                        "dead-lettered": last["invalid"]}
    write_report(path, data)
    sys.stdout.write(f"report written to {path}\n")
