"""A seeded synthetic interaction stream with a known answer, needing no files (the demo default).

Structure a test can assert, and a learner should be able to recover:

* every item has one true latent **topic**; its tags are derived from it (``topic7``, ``group1``) so
  the semantic objective has something real to find;
* every user holds ``interests_per_user`` topics; with probability ``on_topic`` an event hits one of the
  user's *current* interests, otherwise a uniformly random topic;
* interests **drift**: every ``drift_every`` events a ``drift_fraction`` of users swap one interest for
  a topic they do not hold yet;
* the catalogue **churns**: new items arrive (``new_item_rate`` per event) and live ones are deleted
  (``delete_rate`` per event), announced by ``ItemEvent`` upserts/deletes that precede any interaction
  with the new item and follow the last interaction with the deleted one;
* **popularity skew**: within a topic, items are drawn by a Zipf law over a per-topic rank (exponent
  ``zipf_a``); a new item enters at a uniformly random rank, so fresh items can be popular at once.

Why chunks: drawing users, topics and items for ``chunk`` events at a time with numpy keeps the
generator around a microsecond per draw; catalogue changes and drift are applied between chunks, so
they are visible at most ``chunk`` events late. Everything is a pure function of ``seed``.

>>> s = SyntheticStream(n_users=50, n_items=100, n_topics=5, seed=1)
>>> recs = list(s.records(200))
>>> sum(isinstance(r, InteractionEvent) for r in recs)
200
>>> again = SyntheticStream(n_users=50, n_items=100, n_topics=5, seed=1)
>>> recs == list(again.records(150)) + list(again.records(50))
True
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mfli.events import InteractionEvent, ItemEvent

Record = InteractionEvent | ItemEvent

_EVENT_TYPES = np.array(["view", "long_view", "like", "click"])
_EVENT_TYPE_P = np.array([0.55, 0.2, 0.1, 0.15])


class SyntheticStream:
    """Mixed, time-ordered ``InteractionEvent``/``ItemEvent`` records from a seeded latent-topic world."""

    def __init__(
        self,
        n_users: int = 1_000,
        n_items: int = 2_000,
        n_topics: int = 20,
        seed: int = 0,
        *,
        interests_per_user: int = 2,
        on_topic: float = 0.9,
        new_item_rate: float = 0.002,
        delete_rate: float = 0.001,
        drift_every: int = 10_000,
        drift_fraction: float = 0.2,
        zipf_a: float = 1.1,
        topics_per_group: int = 4,
        start_ts: int = 1_700_000_000_000,
        ms_per_event: int = 50,
        chunk: int = 1_024,
    ) -> None:
        if n_users < 1 or n_topics < 1:
            raise ValueError(f"n_users and n_topics must be >= 1, got {n_users}, {n_topics}")
        if n_items < 2 * n_topics:
            raise ValueError(f"n_items ({n_items}) must be at least 2 * n_topics ({2 * n_topics})")
        if not 1 <= interests_per_user <= n_topics:
            raise ValueError(f"interests_per_user must be in [1, n_topics={n_topics}], not {interests_per_user}")
        for name, p in (("on_topic", on_topic), ("drift_fraction", drift_fraction)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {p}")
        if new_item_rate < 0 or delete_rate < 0 or zipf_a <= 0 or drift_every < 1 or chunk < 1:
            raise ValueError("rates must be >= 0, zipf_a > 0, drift_every and chunk >= 1")
        self.n_users, self.n_topics, self.seed = n_users, n_topics, seed
        self.on_topic, self.new_item_rate, self.delete_rate = on_topic, new_item_rate, delete_rate
        self.drift_every, self.drift_fraction, self.zipf_a = drift_every, drift_fraction, zipf_a
        self.topics_per_group, self.start_ts, self.ms_per_event, self.chunk = (
            topics_per_group, start_ts, ms_per_event, chunk)
        self._rng = np.random.default_rng(seed)
        self._user_ids = np.array([f"u{u}" for u in range(n_users)], dtype=object)
        # interests[u] = k distinct topics, without replacement per row
        keys = self._rng.random((n_users, n_topics))
        self._interests = np.argsort(keys, axis=1)[:, :interests_per_user].astype(np.int64)
        #: true topic of every item ever created (deleted ones included), by item id
        self.topic_of: dict[str, int] = {}
        self._ranked: list[list[str]] = [[] for _ in range(n_topics)]  # live items per topic, by rank
        self._cdf: list[np.ndarray | None] = [None] * n_topics
        self._next_item = 0
        self._emitted = 0
        self._pending: list[ItemEvent] = []
        topics = np.concatenate([np.arange(n_topics), self._rng.integers(0, n_topics, n_items - n_topics)])
        for t in topics:
            self._pending.append(self._new_item(int(t), ts=start_ts, rank=None))
        self._source: Iterator[Record] = self._generate()

    # --- truth, for tests and evaluation ---------------------------------------------------------
    def interests(self, user_id: str) -> tuple[int, ...]:
        """The user's *current* interest topics (they drift as the stream advances)."""
        return tuple(int(t) for t in self._interests[int(user_id[1:])])

    def live_items(self) -> set[str]:
        return {item for ranked in self._ranked for item in ranked}

    def tags_of(self, topic: int) -> list[str]:
        return [f"topic{topic}", f"group{topic // self.topics_per_group}"]

    # --- generation ------------------------------------------------------------------------------
    def records(self, n_events: int) -> Iterator[Record]:
        """The next ``n_events`` interactions, preceded by the catalogue changes they need.

        The stream is one sequence however it is sliced: ``records(2)`` then ``records(5)`` yields the
        same records as ``records(7)``.
        """
        if n_events < 0:
            raise ValueError(f"n_events must be >= 0, not {n_events}")
        count = 0
        while count < n_events:
            record = next(self._source)
            if isinstance(record, InteractionEvent):
                count += 1
            yield record

    def events(self, n_events: int) -> list[InteractionEvent]:
        """Only the interactions among the next ``n_events`` (catalogue changes are still applied)."""
        return [r for r in self.records(n_events) if isinstance(r, InteractionEvent)]

    def __iter__(self) -> Iterator[Record]:
        return self._source

    def _generate(self) -> Iterator[Record]:
        while True:
            self._evolve(self.chunk)
            pending, self._pending = self._pending, []
            yield from pending
            yield from self._chunk(self.chunk)

    def _ts(self, index: int) -> int:
        return self.start_ts + index * self.ms_per_event

    def _new_item(self, topic: int, ts: int, rank: int | None) -> ItemEvent:
        item_id = f"i{self._next_item}"
        self._next_item += 1
        self.topic_of[item_id] = topic
        ranked = self._ranked[topic]
        ranked.insert(len(ranked) if rank is None else min(rank, len(ranked)), item_id)
        self._cdf[topic] = None
        return ItemEvent(item_id=item_id, op="upsert", created_ts=ts, tags=self.tags_of(topic),
                         text=f"synthetic item {item_id} of topic {topic}")

    def _evolve(self, n: int) -> None:
        """Catalogue churn and interest drift due before the next ``n`` events."""
        if self._emitted == 0:
            return
        ts = self._ts(self._emitted)
        rng = self._rng
        for _ in range(rng.binomial(n, min(1.0, self.new_item_rate))):
            topic = int(rng.integers(self.n_topics))
            self._pending.append(self._new_item(topic, ts, rank=int(rng.integers(len(self._ranked[topic]) + 1))))
        for _ in range(rng.binomial(n, min(1.0, self.delete_rate))):
            topic = int(rng.integers(self.n_topics))
            ranked = self._ranked[topic]
            if len(ranked) <= 2:  # every topic keeps a couple of items so it stays reachable
                continue
            item_id = ranked.pop(int(rng.integers(len(ranked))))
            self._cdf[topic] = None
            self._pending.append(ItemEvent(item_id=item_id, op="delete", created_ts=ts, tags=self.tags_of(topic)))
        drifts = (self._emitted + n) // self.drift_every - self._emitted // self.drift_every
        for _ in range(drifts):
            self._drift()

    def _drift(self) -> None:
        rng = self._rng
        k = self._interests.shape[1]
        if k == self.n_topics:
            return
        users = np.flatnonzero(rng.random(self.n_users) < self.drift_fraction)
        for u in users:
            held = set(self._interests[u].tolist())
            choices = [t for t in range(self.n_topics) if t not in held]
            self._interests[u, rng.integers(k)] = choices[int(rng.integers(len(choices)))]

    def _topic_cdf(self, topic: int) -> np.ndarray:
        cdf = self._cdf[topic]
        if cdf is None:
            weights = 1.0 / np.arange(1, len(self._ranked[topic]) + 1) ** self.zipf_a
            cdf = np.cumsum(weights)
            cdf /= cdf[-1]
            self._cdf[topic] = cdf
        return cdf

    def _chunk(self, n: int) -> Iterator[InteractionEvent]:
        rng = self._rng
        users = rng.integers(0, self.n_users, n)
        hit = rng.random(n) < self.on_topic
        which = rng.integers(0, self._interests.shape[1], n)
        topics = np.where(hit, self._interests[users, which], rng.integers(0, self.n_topics, n))
        u01 = rng.random(n)
        item_rank = np.empty(n, dtype=np.int64)
        for t in np.unique(topics):
            mask = topics == t
            cdf = self._topic_cdf(int(t))
            item_rank[mask] = np.minimum(np.searchsorted(cdf, u01[mask]), len(cdf) - 1)
        types = rng.choice(len(_EVENT_TYPES), size=n, p=_EVENT_TYPE_P)
        # rating-like value: on-topic engagement tends to be rated 4-5, off-topic 1-3
        values = np.where(hit, rng.integers(4, 6, n), rng.integers(1, 4, n)).astype(float)
        base = self._emitted
        # resolve ids now: a consumer pausing mid-chunk must not see later catalogue changes here
        item_ids = [self._ranked[t][r] for t, r in zip(topics.tolist(), item_rank.tolist(), strict=True)]
        self._emitted = base + n
        user_ids, type_names, values = self._user_ids[users], _EVENT_TYPES[types], values.tolist()
        for j in range(n):
            yield InteractionEvent(
                event_id=f"syn{self.seed}-{base + j}", user_id=user_ids[j], item_id=item_ids[j],
                event_type=str(type_names[j]), value=values[j], ts=self._ts(base + j),
            )
