"""MFLILearner: the online-learning API the Kafka learner process and the evaluation both drive.

One ``learn`` call is one micro-batch step (docs/design.md §Model): every event is scored against its user's query
*before* the event (recency-weighted pool of the last H items' embeddings, the server's computation),
then a sampled softmax per facet and objective on the continuous embedding and on its RQ
reconstruction, a commitment term, and sparse row-wise Adagrad on just the rows the batch touched.
``learn_columns`` is the same step without building event objects (evaluation streams a million events).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch

from mfli.allocator import keep_large_blocks
from mfli.config import ModelSettings
from mfli.deltas import CodebookSnapshot, ItemDelta
from mfli.events import InteractionEvent, ItemEvent
from mfli.learner.catalogue import ItemCatalogue
from mfli.learner.counts import DecayedCounts
from mfli.learner.encoder import QueryTower
from mfli.learner.history import UserHistories
from mfli.learner.quantizer import ResidualQuantizer
from mfli.learner.replay import ReplayBuffer
from mfli.learner.state import StepStats
from mfli.learner.stepper import Stepper
from mfli.retrieval.snapshot import ItemSnapshot


def step_parts(events: int, step_events: int) -> int:
    """How many optimisation steps a micro-batch of ``events`` takes (``ModelSettings.step_events``: at
    most that many events a step; 0 = one step). A data-parallel group takes as many for the union of its
    ranks' batches, so a one-rank group steps exactly as a single learner does."""
    return max(1, -(-events // step_events)) if step_events else 1


class MFLILearner:
    """Multifaceted item embeddings + RQ codebooks, trained one micro-batch at a time."""

    def __init__(self, settings: ModelSettings) -> None:
        # With 2 threads, CPU index_put/embedding_bag backward accumulate in a run-dependent order
        # (measured: ml-100k embeddings differed by 1e-6 between identical runs). Deterministic kernels
        # make restore-and-continue equal never stopping and the eval reproducible, at no measured cost.
        torch.use_deterministic_algorithms(True, warn_only=True)
        keep_large_blocks()  # mfli/allocator.py: the step's large blocks stay in the heap
        if settings.members > 1:
            raise ValueError(f"model.members={settings.members} is an ensemble of single learners: "
                             "mfli.learner.ensemble.learner_for builds it in one process (the evaluation), "
                             "`mfli learn` as a group of one rank per member (learner/members.py)")
        self.settings = s = settings
        self.gen = torch.Generator().manual_seed(s.seed)
        self.rng = np.random.default_rng(s.seed)
        self.items = ItemCatalogue(s.facets, s.dim, s.levels, context=s.encoder_input == "separate",
                                   average=s.serving_average > 0)
        self.users = UserHistories(s.history, s.seen_kept)
        self.rq = ResidualQuantizer(s.facets, s.levels, s.dim, s.codewords, s.overuse_penalty,
                                    s.dead_code_window)
        self.freq = DecayedCounts(s.logq_half_life_events)  # log-Q sampling-probability estimate
        self.popularity = DecayedCounts(s.popularity_half_life_events)  # the prior
        w = torch.tensor(s.objective_weights[: s.facets], dtype=torch.float32)
        self.weights = {o: w[:, j] for j, o in enumerate(s.objectives)}
        self.step = 0
        self.events_seen = 0
        self.changed: dict[int, int] = {}  # row -> newest event ts since the last drain
        self.deleted: set[int] = set()  # rows deleted since the last drain
        self.row_version = np.zeros(0, dtype=np.int64)
        self.tower = QueryTower(s, self.gen)
        self.replay = ReplayBuffer(s.replay_capacity if s.replay_ratio > 0 else 0, s.history)
        self._stepper = Stepper(self)

    # --- streaming API ------------------------------------------------------------------------------
    def learn(self, events: list[InteractionEvent]) -> StepStats:
        """One step on validated events (in stream order)."""
        if not events:
            return StepStats()
        values = np.asarray([np.nan if e.value is None else e.value for e in events], dtype=np.float32)
        return self.learn_columns([e.user_id for e in events], [e.item_id for e in events], values,
                                  np.asarray([e.ts for e in events], dtype=np.int64))

    def learn_columns(self, user_ids, item_ids, values: np.ndarray, ts: np.ndarray) -> StepStats:
        """The same step on columns: external ids (sequences of str), float32 values, int64 ts (ms)."""
        t0 = time.perf_counter()
        n_users = len(self.users)
        users = self.users.rows_for(list(user_ids))
        items, new = self.items.rows_for(list(item_ids), self.gen)
        live = self.items.live[items]
        if not live.all():  # events on deleted items are dropped: the item has left the catalogue
            users, items, values, ts = users[live], items[live], values[live], ts[live]
        parts = step_parts(len(items), self.settings.step_events)
        if parts > 1:  # consecutive steps of near-equal size, in stream order
            stats = StepStats()
            for part in np.array_split(np.arange(len(items)), parts):
                stats.merge(self._stepper.step(users[part], items[part], values[part], ts[part]))
        else:
            stats = self._stepper.step(users, items, values, ts)
        stats.new_items, stats.new_users = len(new), len(self.users) - n_users
        stats.seconds["bookkeeping"] += time.perf_counter() - t0 - sum(stats.seconds.values())
        return stats

    def upsert_items(self, events: list[ItemEvent]) -> int:
        """Create or update items from catalogue events; new items start from their tags' centroids."""
        n = 0
        for ev in events:
            if ev.op == "delete":
                n += self.delete_items([ev.item_id])
                continue
            known = ev.item_id in self.items.ids
            rows, _ = self.items.rows_for([ev.item_id], self.gen)
            row = int(rows[0])
            self.items.set_tags(row, ev.tags, self.gen, content_start=not known)
            self.items.live[row] = True
            self.deleted.discard(row)
            self.touch(np.asarray([row]), ev.created_ts)
            n += 1
        return n

    def delete_items(self, item_ids: list[str]) -> int:
        """Take items out of the live set at once (their rows are kept, never reused)."""
        n = 0
        for item in item_ids:
            row = self.items.ids.get(item)
            if row is not None and self.items.live[row]:
                self.items.live[row] = False
                self.deleted.add(row)
                self.changed.pop(row, None)
                n += 1
        return n

    def touch(self, rows: np.ndarray, ts: int) -> None:
        """Mark ``rows`` changed (versioned by the next step) with ``ts`` as their newest event time."""
        self._grow_versions()
        self.row_version[rows] = self.step + 1
        for r in rows.tolist():
            if self.changed.get(r, -1) < ts:
                self.changed[r] = ts

    def _grow_versions(self) -> None:
        """``row_version`` covers every row: rows can be created without a step touching them (an event
        whose user has no history yet), and the publisher's prior refresh may still mark them changed."""
        if len(self.row_version) < len(self.items):
            grown = np.zeros(max(len(self.items), 2 * len(self.row_version)), dtype=np.int64)
            grown[: len(self.row_version)] = self.row_version
            self.row_version = grown

    def mark_changed(self, rows: Iterable[int], event_ts: int = -1) -> None:
        """Have the next :meth:`drain_changed` include ``rows`` (live ones) even if no step touched them.
        ``event_ts`` -1 marks a change no event caused (a prior refresh: freshness ignores it)."""
        for r in rows:
            self.changed[r] = max(self.changed.get(r, -1), event_ts)

    def requeue(self, deltas: Iterable[ItemDelta]) -> None:
        """Deltas that were drained but never delivered: the next drain returns those rows again, in
        their newest state (a deletion stays a deletion)."""
        for d in deltas:
            if d.deleted:
                self.deleted.add(d.row)
            else:
                self.mark_changed([d.row], d.event_ts or -1)

    def drain_changed(self) -> list[ItemDelta]:
        """Deltas for every row changed (or deleted) since the last drain, one per row, newest state."""
        rows = np.asarray(sorted(r for r in self.changed if self.items.live[r]), dtype=np.int64)
        self._grow_versions()
        out: list[ItemDelta] = []
        if len(rows):
            served = self.items.serving_vectors(rows)
            vec = served.numpy().astype(np.float32)
            codes = self.rq.encode(served).numpy().astype(np.int32)
            prior = self.prior(rows)
            for i, r in enumerate(rows.tolist()):
                out.append(ItemDelta(item_id=self.items.ids.id_of(r), row=r, version=int(self.row_version[r]),
                                     event_ts=int(self.changed[r]), vectors=vec[i], codes=codes[i],
                                     prior=float(prior[i]), tags=self._tag_names(r)))
        for r in sorted(self.deleted):
            out.append(ItemDelta(item_id=self.items.ids.id_of(r), row=r, version=self.step + 1, event_ts=0,
                                 vectors=np.zeros((self.settings.facets, self.settings.dim), np.float32),
                                 codes=np.zeros((self.settings.facets, self.settings.levels), np.int32),
                                 prior=0.0, deleted=True))
        self.changed.clear()
        self.deleted.clear()
        return out

    def _tag_names(self, row: int) -> list[str]:
        return [self.items.tag_names.id_of(t) for t in self.items.tags[row]]

    def codebook_snapshot(self) -> CodebookSnapshot:
        return CodebookSnapshot(version=self.rq.version, codebooks=self.rq.codebooks.numpy().copy())

    def user_history(self, user_id: str) -> tuple[list[str], list[int]]:
        """The user's kept item ids and event times (ms), oldest first: what the users store keeps (the
        last ``seen_kept``; queries read the last H of them)."""
        row = self.users.users.get(user_id)
        if row is None:
            return [], []
        items, ts = self.users.seen_of(row)
        return [self.items.ids.id_of(r) for r in items], ts

    def user_queries(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(queries ``[n, F, d]``, log gates ``[n, F]``, has_history) for the users' next event, computed
        from their current windows exactly as training does."""
        win, win_ts, _ = self.users.windows_now(user_rows)
        win, win_ts = self.users.keep_only(win, win_ts, self.items.live[np.maximum(win, 0)])
        has = win[:, -1] >= 0
        n, s = len(user_rows), self.settings
        q = np.zeros((n, s.facets, s.dim), np.float32)
        g = np.full((n, s.facets), -np.log(s.facets), np.float32)
        if has.any():
            q[has], g[has] = self.tower.infer(self._context_rows, win[has], win_ts[has])
        return q, g, has

    def window_queries(self, window: np.ndarray, window_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries for explicit ``[n, H]`` windows (-1 padded, each with its newest item)."""
        return self.tower.infer(self._context_rows, window, window_ts)

    def _context_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """What the served encoder reads for history items ``rows``: their indexed (served) vectors, or
        their rows of the separate context table."""
        if self.settings.encoder_input == "separate":
            return self.items.ctx[rows]
        return self.items.serving_rows(rows)

    def serving_vectors(self) -> np.ndarray:
        """``[n, F, d]`` float32 item vectors that answers are scored with (``model.serving_average``)."""
        return self.items.serving_vectors().numpy().astype(np.float32)

    def query_model(self):
        """The query encoder's weights as the server runs them (versioned by the learner step)."""
        return self.tower.query_model(self.step)

    def prior(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Popularity prior ``beta * log1p(decayed count)`` (float32)."""
        counts = self.popularity.values(len(self.items))
        p = (self.settings.popularity_beta * np.log1p(counts)).astype(np.float32)
        return p if rows is None else p[rows]

    def snapshot(self, with_tags: bool = False) -> ItemSnapshot:
        """A consistent copy of all item state for the retrievers (codes re-encoded with today's codebooks)."""
        n = len(self.items)
        vec = self.items.serving_vectors()
        return ItemSnapshot(
            item_ids=np.asarray(self.items.ids.ids(), dtype=object),
            vectors=vec.numpy().astype(np.float32).copy(),
            codes=self.rq.encode(vec).numpy().astype(np.int32),
            codebooks=self.rq.codebooks.numpy().astype(np.float32).copy(),
            prior=self.prior(),
            live=self.items.live[:n].copy(),
            version=self.step,
            tags=[self._tag_names(r) for r in range(n)] if with_tags else None,
            query_model=self.query_model(),
        )

    def reset_histories(self) -> None:
        """Start another pass over a finite log: forget histories and popularity, keep the embeddings."""
        self.users.reset()
        self.popularity = DecayedCounts(self.settings.popularity_half_life_events)

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "settings": self.settings.model_dump(), "step": self.step, "events_seen": self.events_seen,
            "items": self.items.state(), "users": self.users.state(), "rq": self.rq.state(),
            "freq": self.freq.state(), "popularity": self.popularity.state(),
            "changed": dict(self.changed), "deleted": sorted(self.deleted),
            "row_version": self.row_version.copy(),
            "gen": self.gen.get_state(), "rng": self.rng.bit_generator.state,
            "tower": self.tower.state(), "replay": self.replay.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.events_seen = state["step"], state["events_seen"]
        self.items.load_state(state["items"])
        self.users.load_state(state["users"])
        self.rq.load_state(state["rq"])
        self.freq = DecayedCounts.from_state(state["freq"])
        self.popularity = DecayedCounts.from_state(state["popularity"])
        self.changed, self.deleted = dict(state["changed"]), set(state["deleted"])
        self.row_version = np.asarray(state["row_version"]).copy()
        self.gen.set_state(state["gen"])
        self.rng.bit_generator.state = state["rng"]
        if "tower" in state:  # checkpoints from before the query encoder start it afresh
            self.tower.load_state(state["tower"])
        if "replay" in state:
            self.replay.load_state(state["replay"])
