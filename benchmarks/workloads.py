"""Workloads for ``mfli bench serve``: an item catalogue plus the requests asked of it.

Two workloads, both answered by every retriever with *identical* queries (each :class:`Query` carries
its ready-made query vector and gates, so no retriever recomputes or sees a different one):

``learned`` (the production-like one, issue 13)
    Item embeddings, RQ codes and the query encoder are what :class:`~mfli.learner.learner.MFLILearner`
    learns from a synthetic stream: ``n`` items in topics (four topics to a tag group), announced to the
    learner as catalogue upserts first (so every item is content-started from its tags, as production
    imports a catalogue), then interactions of users with four drifting interests each, item popularity
    Zipf-like within a topic. Most items of a large catalogue get few or no events, as in production: they
    keep their tag-based start; the head is trained. The queries are the learned encoder's output for
    **held-out users** (users whose events the learner never saw), over their last ``H`` events. Nothing
    in the queries is drawn from the index's structure.

``synthetic`` (the pre-issue-13 workload, kept as a labelled second row)
    Topic-plus-noise vectors with k-means RQ codes (:func:`synthetic_catalogue`) and histories drawn from
    the index's own level-0 code buckets (:func:`synthetic_histories`), queries from a random-weight
    encoder. It favours the learned index (the histories sit in exactly the structure it exploits) and is
    reported as that.

Training the learned workload is the slow part (a few thousand events/s on this 2-core box), so it is
cached on disk (``var/bench-cache`` by default, keyed by every parameter that shapes it): a re-run of the
benchmark reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from mfli.retrieval.base import Query
from mfli.retrieval.query_model import QueryModel
from mfli.retrieval.snapshot import ItemSnapshot

log = logging.getLogger(__name__)

#: bump when the generator or the learning procedure changes, so stale caches are not reused
WORKLOAD_VERSION = 1
#: held-out users simulated (the most queries a run can ask); fixed so the cache does not depend on --queries
HELDOUT_USERS = 1000


@dataclass
class Workload:
    """A catalogue and the requests of one benchmark row."""

    name: str
    snapshot: ItemSnapshot
    queries: list[Query]  # every one with ``vector`` and ``log_gates`` set
    notes: list[str] = field(default_factory=list)
    tau: float = 0.05

    @property
    def n_items(self) -> int:
        return int(self.snapshot.live.sum())


# --- the synthetic (code-bucket) workload ------------------------------------------------------------
def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 8) -> np.ndarray:
    """Plain Lloyd's k-means on ``x`` (float32[n, d]); returns centroids float32[k, d]."""
    centroids = x[rng.choice(x.shape[0], size=k, replace=False)].copy()
    for _ in range(iters):
        assign = assign_nearest(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        centroids[empty] = x[rng.choice(x.shape[0], size=int(empty.sum()), replace=False)]
    return centroids


def assign_nearest(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.int64)
    c_sq = np.einsum("kd,kd->k", centroids, centroids)
    for start in range(0, x.shape[0], block):
        out[start : start + block] = np.argmin(c_sq[None, :] - 2.0 * (x[start : start + block] @ centroids.T), axis=1)
    return out


def codewords_for(n: int, levels: int) -> int:
    """DESIGN §3: M^L ~ items / 32, at least 8."""
    return max(8, int(round((n / 32) ** (1.0 / levels))))


def synthetic_catalogue(n: int, facets: int = 3, dim: int = 64, levels: int = 2, topics: int | None = None,
                        noise: float = 0.7, seed: int = 0, fit_sample: int = 50_000) -> ItemSnapshot:
    """Clustered items with RQ codes; ``item_ids`` are ``"i<row>"``, rows in order of arrival."""
    rng = np.random.default_rng(seed)
    topics = topics or max(8, n // 500)
    m = codewords_for(n, levels)
    vectors = np.empty((n, facets, dim), np.float32)
    codes = np.empty((n, facets, levels), np.int32)
    books = np.empty((facets, levels, m, dim), np.float32)
    item_topic = rng.integers(0, topics, size=n)
    with threadpool_limits(1):
        for f in range(facets):
            centers = rng.normal(size=(topics, dim)).astype(np.float32)
            centers /= np.linalg.norm(centers, axis=1, keepdims=True)
            # Each facet permutes topics differently, so facets disagree about neighbours (multifaceted).
            perm = rng.permutation(topics) if f else np.arange(topics)
            v = centers[perm[item_topic]] + rng.normal(0, noise / np.sqrt(dim), (n, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            vectors[:, f] = v
            residual = v.copy()
            sample = rng.choice(n, size=min(n, fit_sample), replace=False)
            for level in range(levels):
                books[f, level] = _kmeans(residual[sample], m, rng)
                codes[:, f, level] = assign_nearest(residual, books[f, level])
                residual -= books[f, level][codes[:, f, level]]
    prior = (0.3 * np.log1p(rng.pareto(1.5, size=n))).astype(np.float32)
    return ItemSnapshot(item_ids=np.array([f"i{r}" for r in range(n)], dtype=object), vectors=vectors,
                        codes=codes, codebooks=books, prior=prior, live=np.ones(n, bool), version=1)


def random_encoder(model) -> QueryModel:
    """A query encoder of the configured shape (random weights: its cost, not its answers, is measured)."""
    return replace(QueryModel.random(model.facets, model.dim, model.history, model.encoder_heads, model.temperature),
                   version=1)


def synthetic_histories(snapshot: ItemSnapshot, users: int, history: int = 50, interests: int = 3,
                        seed: int = 1) -> list[np.ndarray]:
    """Histories of ``history`` rows, drawn around ``interests`` random seed items per user (facet 0
    level-0 code buckets: the structure the learned index exploits)."""
    rng = np.random.default_rng(seed)
    n = snapshot.n_items
    keys = snapshot.codes[:, 0, 0].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    starts = np.searchsorted(keys[order], np.arange(snapshot.codewords + 1))
    out = []
    for _ in range(users):
        picks = []
        for seed_row in rng.integers(0, n, size=interests):
            code = keys[seed_row]
            members = order[starts[code] : starts[code + 1]]
            picks.append(rng.choice(members, size=history // interests + 1))
        h = np.concatenate(picks)[:history]
        rng.shuffle(h)
        out.append(h.astype(np.int64))
    return out


def with_query_vectors(snapshot: ItemSnapshot, histories: list[np.ndarray], k: int,
                       history_ts: list[np.ndarray] | None = None) -> list[Query]:
    """Requests for ``histories`` (each excludes its own history), their query computed once by the
    snapshot's encoder, exactly as the server would (:func:`~mfli.retrieval.base.resolve_query`)."""
    model = snapshot.query_model
    out = []
    for i, h in enumerate(histories):
        ts = np.zeros(h.size, np.int64) if history_ts is None else history_ts[i]
        if model is not None and model.weights:
            recent = h[-model.horizon:]
            q, g = model.query(snapshot.vectors[recent].reshape(recent.size, -1), ts[-model.horizon:])
        else:
            from mfli.retrieval.base import pool_query, uniform_gates

            q = pool_query(snapshot.vectors[h], 0.97)
            g = uniform_gates(snapshot.facets)
        out.append(Query(history=h, k=k, exclude=h, history_ts=ts, vector=np.ascontiguousarray(q, np.float32),
                         log_gates=np.ascontiguousarray(g, np.float32)))
    return out


def synthetic_workload(n: int, settings, k: int, n_queries: int, seed: int = 0) -> Workload:
    """The pre-issue-13 workload: topic + noise vectors, histories from the index's own code buckets."""
    m = settings.model
    snap = synthetic_catalogue(n, facets=m.facets, dim=m.dim, levels=m.levels, seed=seed)
    snap = replace(snap, query_model=random_encoder(m))
    histories = synthetic_histories(snap, n_queries, history=m.history, seed=seed + 1)
    return Workload("synthetic", snap, with_query_vectors(snap, histories, k), tau=m.temperature,
                    notes=["synthetic: histories drawn from the index's own level-0 code buckets, random-weight "
                           "encoder (favours the learned index; kept for comparison with earlier runs)"])


# --- the learned (stream-trained) workload -----------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    """The synthetic world the learner is trained on (every field is part of the cache key)."""

    n_items: int
    events: int  # interactions fed to the learner
    users: int
    heldout_users: int
    topics: int
    interests: int = 4
    on_topic: float = 0.85
    zipf_a: float = 1.05
    drift_every: int = 50_000  # events between interest drifts
    drift_fraction: float = 0.1  # of users swap one interest at a drift
    topics_per_group: int = 4
    seed: int = 0
    batch: int = 2048

    @classmethod
    def for_items(cls, n: int, events_per_item: float, heldout: int, seed: int = 0) -> StreamSpec:
        users = max(10_000, n // 10)
        return cls(n_items=n, events=int(events_per_item * n), users=users + heldout, heldout_users=heldout,
                   topics=max(40, n // 250), seed=seed)


class _World:
    """Columnar generator of the stream: vectorised per chunk (the object stream of
    :class:`mfli.sources.synthetic.SyntheticStream` costs ~10 µs an event, too slow for millions)."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.rng = rng = np.random.default_rng(spec.seed)
        self.item_topic = rng.integers(0, spec.topics, spec.n_items)
        self.item_topic[: spec.topics] = np.arange(spec.topics)  # every topic has an item
        self.by_topic = np.argsort(self.item_topic, kind="stable")
        self.starts = np.searchsorted(self.item_topic[self.by_topic], np.arange(spec.topics + 1))
        # a per-topic random popularity order (rank 0 = most popular), independent of row order
        for t in range(spec.topics):
            rng.shuffle(self.by_topic[self.starts[t] : self.starts[t + 1]])
        self.interests = np.argsort(rng.random((spec.users, spec.topics)), axis=1)[:, : spec.interests]
        self.emitted = 0

    def chunk(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, value) of the next ``n`` events of the trained users."""
        s, rng = self.spec, self.rng
        before = self.emitted // s.drift_every
        self.emitted += n
        for _ in range(self.emitted // s.drift_every - before):
            movers = np.flatnonzero(rng.random(s.users) < s.drift_fraction)
            self.interests[movers, rng.integers(0, s.interests, movers.size)] = rng.integers(0, s.topics, movers.size)
        users = rng.integers(0, s.users - s.heldout_users, n)
        items, hit = self.events_of(users)
        return users, items, np.where(hit, 5.0, 2.0).astype(np.float32)

    def events_of(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items the users engage with next, and whether each was on one of their interests: a current
        interest (else a random topic), then an item of that topic by Zipf-like popularity rank."""
        s, rng, n = self.spec, self.rng, users.size
        hit = rng.random(n) < s.on_topic
        topics = np.where(hit, self.interests[users, rng.integers(0, s.interests, n)], rng.integers(0, s.topics, n))
        size = self.starts[topics + 1] - self.starts[topics]
        rank = (rng.zipf(1.0 + s.zipf_a, n) - 1) % size
        return self.by_topic[self.starts[topics] + rank], hit


def _cache_path(cache_dir: Path, spec: StreamSpec, model_settings) -> Path:
    key = json.dumps({"v": WORKLOAD_VERSION, "spec": spec.__dict__, "model": model_settings.model_dump(mode="json")},
                     sort_keys=True)
    return cache_dir / f"learned-{spec.n_items}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def _save(path: Path, snap: ItemSnapshot, hist: list[np.ndarray], hist_ts: list[np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    qm = snap.query_model
    lens = np.array([h.size for h in hist], np.int64)
    arrays = {"vectors": snap.vectors, "codes": snap.codes, "codebooks": snap.codebooks, "prior": snap.prior,
              "live": snap.live, "hist": np.concatenate(hist) if hist else np.empty(0, np.int64),
              "hist_ts": np.concatenate(hist_ts) if hist_ts else np.empty(0, np.int64), "hist_len": lens,
              "meta": np.frombuffer(json.dumps({**meta, "version": snap.version, "qm": None if qm is None else {
                  "version": qm.version, "facets": qm.facets, "dim": qm.dim, "heads": qm.heads, "tau": qm.tau,
                  "members": qm.members, "pooling": qm.pooling}}
              ).encode(), np.uint8)}
    if qm is not None:
        arrays |= {f"qm/{name}": w for name, w in qm.weights.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)


def _load(path: Path) -> tuple[ItemSnapshot, list[np.ndarray], list[np.ndarray], dict]:
    z = np.load(path, allow_pickle=False)
    meta = json.loads(bytes(z["meta"]).decode())
    qm = None
    if meta["qm"] is not None:
        qm = QueryModel(weights={k[3:]: z[k] for k in z.files if k.startswith("qm/")}, **meta["qm"])
    n = z["prior"].size
    snap = ItemSnapshot(item_ids=np.array([f"i{r}" for r in range(n)], dtype=object), vectors=z["vectors"],
                        codes=z["codes"], codebooks=z["codebooks"], prior=z["prior"], live=z["live"],
                        version=meta["version"], query_model=qm)
    bounds = np.concatenate([[0], np.cumsum(z["hist_len"])])
    hist = [z["hist"][a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    hist_ts = [z["hist_ts"][a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return snap, hist, hist_ts, meta


def train_learned(spec: StreamSpec, model_settings) -> tuple[ItemSnapshot, list[np.ndarray], list[np.ndarray], dict]:
    """Run the learner over the stream; returns its snapshot (rows = item numbers), the held-out users'
    histories (rows, oldest first) with event times, and what happened (for the notes)."""
    import torch

    from mfli.learner.ensemble import Ensemble, learner_for

    torch.set_num_threads(1)  # two threads were measured slower than one on this shared 2-core box
    world = _World(spec)
    learner = learner_for(model_settings)  # an ensemble when model.members > 1
    t0 = time.perf_counter()
    item_ids = np.array([f"i{r}" for r in range(spec.n_items)], dtype=object)
    # The catalogue first, as an import announces it, every item started from its tags (topic, group)
    # by the learner's cold-start rule (ItemCatalogue._init_from_tags: the normalised mean of the tags'
    # centroids plus 0.2 x unit noise), vectorised: the per-item upsert costs ~2 ms, half an hour at 10^6.
    learner.items.rows_for(item_ids.tolist(), learner.gen)
    with torch.no_grad():
        for j, one in enumerate(learner.members if isinstance(learner, Ensemble) else [learner]):
            norm = one.items.normalise
            width = one.settings.facets * one.settings.dim
            gen = torch.Generator().manual_seed(spec.seed + 1 + 1_000 * j)  # members start independently
            topic_dir = norm(torch.randn(spec.topics, width, generator=gen))
            group_dir = norm(torch.randn(-(-spec.topics // spec.topics_per_group), width, generator=gen))
            topic = torch.from_numpy(world.item_topic)
            start = norm((topic_dir[topic] + group_dir[topic // spec.topics_per_group]) / 2)
            one.items.emb[: spec.n_items] = norm(start + 0.2 * norm(torch.randn(spec.n_items, width, generator=gen)))
            if one.items.avg.shape[0]:  # the served average starts where the rows start
                one.items.avg[: spec.n_items] = one.items.emb[: spec.n_items]
    upsert_s = time.perf_counter() - t0
    user_ids = np.array([f"u{u}" for u in range(spec.users)], dtype=object)
    ms_per_event, done, t1 = 50, 0, time.perf_counter()
    while done < spec.events:
        n = min(64 * spec.batch, spec.events - done)
        users, items, values = world.chunk(n)
        ts = (np.arange(done, done + n, dtype=np.int64) + 1) * ms_per_event
        for b in range(0, n, spec.batch):
            sl = slice(b, b + spec.batch)
            learner.learn_columns(user_ids[users[sl]], item_ids[items[sl]], values[sl], ts[sl])
        done += n
        log.info("learned workload: %d/%d events (%.0f events/s)", done, spec.events, done / (time.perf_counter() - t1))
    train_s = time.perf_counter() - t1
    snap = learner.snapshot()
    # learner rows are assigned in announcement order, i.e. row r is item "i<r>"; check rather than assume
    row_of = learner.items.ids.get
    if [row_of(f"i{r}") for r in (0, spec.n_items // 2, spec.n_items - 1)] != [0, spec.n_items // 2, spec.n_items - 1]:
        raise RuntimeError("learner rows are not item numbers")
    # Held-out users engage 10..H times after training, on their interests of that moment; the learner
    # never saw them (a user arriving after the last checkpoint), so their queries are not fitted.
    h = model_settings.history
    hist, hist_ts = [], []
    for u, length in zip(range(spec.users - spec.heldout_users, spec.users),
                         world.rng.integers(10, h + 1, spec.heldout_users).tolist(), strict=True):
        hist.append(world.events_of(np.full(length, u))[0].astype(np.int64))
        hist_ts.append((spec.events + np.sort(world.rng.integers(1, 20 * h, length))) * ms_per_event)
    meta = {"upsert_s": upsert_s, "train_s": train_s, "events_per_s": spec.events / max(train_s, 1e-9),
            "codewords": int(snap.codebooks.shape[2])}
    return snap, hist, hist_ts, meta


def learned_workload(n: int, settings, k: int, n_queries: int, events_per_item: float = 1.0,
                     cache_dir: Path | None = Path("var/bench-cache"), seed: int = 0) -> Workload:
    """The production-like workload (see the module docstring); trained once, then read from the cache."""
    spec = StreamSpec.for_items(n, events_per_item, heldout=HELDOUT_USERS, seed=seed)
    # Replay off (half the learner's cost); codebook usage counted every 100 steps instead of 10: each count
    # encodes the whole catalogue (~10 s at 10^6 items on this box), which made training 10x slower there.
    model = settings.model.model_copy(update={"replay_ratio": 0.0, "usage_interval_steps": 100})
    path = None if cache_dir is None else _cache_path(Path(cache_dir), spec, model)
    if path is not None and path.exists():
        snap, hist, hist_ts, meta = _load(path)
        log.info("learned workload n=%d read from %s", n, path)
    else:
        snap, hist, hist_ts, meta = train_learned(spec, model)
        if path is not None:
            _save(path, snap, hist, hist_ts, meta)
    keep = [i for i, h in enumerate(hist) if h.size >= 2][:n_queries]
    queries = with_query_vectors(snap, [hist[i] for i in keep], k, [hist_ts[i] for i in keep])
    members = "" if model.members == 1 else \
        f"an ensemble of {model.members} members, {model.ensemble_pooling} pooling, "
    notes = [f"learned n={n}: the learner ({members}F={model.facets}, d={model.dim}, M={meta['codewords']}, "
             f"replay off, usage counts every 100 steps) trained on {spec.events:,} events of "
             f"{spec.users - spec.heldout_users:,} users ({spec.interests} drifting interests each, "
             f"{spec.topics} topics) at {meta['events_per_s']:.0f} events/s; "
             f"{len(queries)} queries = its encoder over held-out users' histories "
             f"(median {int(np.median([q.history.size for q in queries]))} events)"]
    return Workload("learned", snap, queries, notes=notes, tau=model.score_tau)
