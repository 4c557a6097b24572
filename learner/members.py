"""An ensemble learned live: K learner ranks, each one member of the ensemble (``model.members`` = K).

Why ranks: an ensemble of two learners answers better than either (learner/ensemble.py says by how much),
but it is two learners' work, and two learners stepped in two threads of one process lose a fifth of
their speed to the interpreter lock, while two processes side by side keep each one's speed (measured on
ml-1m's first 100k events: one learner 5,748 events/s; two in threads 4,479; two processes 5,168 and
5,109). So each member is a rank of the learner group (learner/group.py), on its own core.

How they stay one model. Every rank reads its own ``mfli.events`` partitions (as data-parallel ranks do:
its users' histories, de-duplication and users-store records stay with it), and per step the ranks
all-gather their events; each member then steps on the group's events in rank order, so all members
number items and users alike and learn the same stream, with nothing else exchanged: the members are
independent models. Rank 0 publishes for the group: at each flush it marks the rows the flush drains,
every member sends its served vectors and codes of those rows, its codebooks and (when due) its query
encoder, and rank 0 publishes K-facet deltas (member j's vectors are facet j), the K codebooks side by
side and one query model of K encoders (:meth:`mfli.retrieval.query_model.QueryModel.ensemble`). The
indexer and the server see a K-facet model and need nothing else. Checkpoints: every rank writes its whole
member; rank 0 also the publisher's held rows. A rank's prequential probe (``learner.probe_path``)
scores its own events with its own member, not with the ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mfli.config import ModelSettings
from mfli.deltas import CodebookSnapshot, ItemDelta
from mfli.events import ItemEvent
from mfli.learner.distributed import GroupSync
from mfli.learner.ensemble import member_settings
from mfli.learner.learner import MFLILearner
from mfli.learner.state import StepStats
from mfli.retrieval.query_model import QueryModel


class MemberLearner(MFLILearner):
    """One rank's member; :meth:`learn_group` is the group's step (every rank calls it once per step with
    its own events, as :class:`~mfli.learner.distributed.DistributedLearner`)."""

    def __init__(self, ensemble: ModelSettings, rank: int, world: int) -> None:
        if ensemble.members != world:
            raise ValueError(f"an ensemble of {ensemble.members} members runs as that many ranks, not {world}")
        super().__init__(member_settings(ensemble, rank))
        self.ensemble, self.rank, self.world = ensemble, rank, world
        self.sync = GroupSync(self, rank, world)  # collectives only: the members exchange no gradients
        self._stepper.count_events = rank == 0  # every member learns every event: count them once
        self._stepper.facet_offset = rank  # member r is facet r of the served model

    def learn_group(self, user_ids: Sequence[str], item_ids: Sequence[str], values: np.ndarray, ts: np.ndarray,
                    upserts: Sequence[ItemEvent] = (), control: Any = None) -> tuple[StepStats, list[Any]]:
        """Learn every rank's events (rank order); returns this member's stats and every rank's ``control``."""
        metas = self.sync.gather_objects({
            "users": list(user_ids), "items": list(item_ids), "values": np.asarray(values, np.float32),
            "ts": np.asarray(ts, np.int64), "upserts": list(upserts), "control": control}, kind="events")
        for meta in metas:
            if meta["upserts"]:
                self.upsert_items(meta["upserts"])
        controls = [m["control"] for m in metas]
        if not sum(len(m["items"]) for m in metas):
            return StepStats(), controls
        stats = self.learn_columns([u for m in metas for u in m["users"]], [i for m in metas for i in m["items"]],
                                   np.concatenate([m["values"] for m in metas]),
                                   np.concatenate([m["ts"] for m in metas]))
        return stats, controls

    def share_for_publish(self, plan: dict | None) -> list[dict] | None:
        """Collective of a flush. Rank 0 passes its plan (``rows`` it will drain, whether the query encoder
        goes out), the others None; every member contributes its state for the plan. Returns every member's
        contribution on rank 0, None elsewhere."""
        plan = self.sync.gather_objects(plan, kind="publish")[0]
        rows = np.asarray(plan["rows"], np.int64)
        mine: dict[str, Any] = {"codebook": self.codebook_snapshot(), "model": None}
        if rows.size:
            served = self.items.serving_vectors(rows)
            mine["vectors"] = served.numpy().astype(np.float32)
            mine["codes"] = self.rq.encode(served).numpy().astype(np.int32)
        if plan["model"]:
            mine["model"] = self.query_model()
        shared = self.sync.gather_objects(mine, kind="publish")
        return shared if self.rank == 0 else None


class EnsembleView:
    """What rank 0's :class:`~mfli.learner.publisher.Publisher` publishes from: rank 0's member for the
    bookkeeping (changed rows, priors, versions, tags), with every member's vectors, codes, codebooks
    and encoder side by side (installed per flush by :meth:`install`)."""

    def __init__(self, learner: MemberLearner) -> None:
        self.lr = learner
        self.settings = learner.ensemble.model_copy(update={"facets": learner.world})
        self._rows = np.empty(0, np.int64)
        self._shared: list[dict] = []

    # --- delegated to rank 0's member ---------------------------------------------------------------
    @property
    def items(self):
        return self.lr.items

    @property
    def step(self) -> int:
        return self.lr.step

    def prior(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self.lr.prior(rows)

    def mark_changed(self, rows, event_ts: int = -1) -> None:
        self.lr.mark_changed(rows, event_ts)

    def requeue(self, deltas) -> None:
        self.lr.requeue(deltas)

    def plan_rows(self) -> np.ndarray:
        """The live rows the next :meth:`drain_changed` returns (what the members must send)."""
        return np.asarray(sorted(r for r in self.lr.changed if self.lr.items.live[r]), dtype=np.int64)

    # --- the ensemble -------------------------------------------------------------------------------
    def install(self, rows: np.ndarray, shared: list[dict]) -> None:
        self._rows, self._shared = rows, shared

    def drain_changed(self) -> list[ItemDelta]:
        out = self.lr.drain_changed()
        k, s = self.lr.world, self.lr.settings
        pos = {r: i for i, r in enumerate(self._rows.tolist())}
        for d in out:
            if d.deleted:
                d.vectors = np.zeros((k, s.dim), np.float32)
                d.codes = np.zeros((k, s.levels), np.int32)
                continue
            i = pos[d.row]  # KeyError: a row drained that the members were not asked for (a bug)
            d.vectors = np.concatenate([m["vectors"][i] for m in self._shared])
            d.codes = np.concatenate([m["codes"][i] for m in self._shared])
        return out

    def codebook_snapshot(self) -> CodebookSnapshot:
        snaps = [m["codebook"] for m in self._shared]
        # versions only grow, so their sum moves whenever any member's codebooks changed
        return CodebookSnapshot(version=sum(c.version for c in snaps),
                                codebooks=np.concatenate([c.codebooks for c in snaps], axis=0))

    def query_model(self) -> QueryModel:
        models = [m["model"] for m in self._shared]
        if any(m is None for m in models):
            raise RuntimeError("the query encoder went out without the members' encoders (publisher.model_due)")
        return QueryModel.ensemble(models, self.lr.step, self.settings.ensemble_pooling)
