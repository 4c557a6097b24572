"""An ensemble: K independently seeded learners whose item vectors are one model's K facets.

Why: variance is the one measured headroom left in answer quality. Two learners that differ only in
their seed, their scores combined, answer better than either (validation slices, streaming HR@20,
exact: ml-100k .3284 / .3183 -> .3345; ml-1m .4682 / .4668 -> .4786 with the scores summed), while
every cheaper form of it measured nothing (two query heads on one trunk, fast + slow weights, a moving
average on its own). The members share nothing while they learn, so the work is K learners'. This class
steps them in turn in one process (the evaluation); ``mfli learn`` runs them side by side, one learner
rank per member (learner/members.py).

How it is one model: every member sees the same events in the same order, so items and users get the
same row numbers in every member (checked). Member j's F=1 vectors are facet j of each item and its
codebooks are facet j's; its encoder reads facet j of the history (its own vectors, as a single shared-
input model does) and answers facet j's query. Facet scores then combine through
:func:`mfli.retrieval.query_model.combine` with uniform gates, by default as their mean (``model.ensemble_pooling
= "linear"``: the members estimate one score, and averaging their noise away is the point) rather than as
a multi-facet model's mixture, so the index, the retrievers and the server need nothing new beyond a query
model of K encoders that says how it pools (:meth:`mfli.retrieval.query_model.QueryModel.ensemble`).
Validation slices, linear vs mixture: ml-1m .4867 vs .4859, ml-100k .3365 vs .3370 (level).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mfli.config import ModelSettings
from mfli.events import ItemEvent
from mfli.learner.learner import MFLILearner
from mfli.learner.state import StepStats
from mfli.retrieval.query_model import QueryModel
from mfli.retrieval.snapshot import ItemSnapshot


def member_settings(ensemble: ModelSettings, j: int) -> ModelSettings:
    """Member ``j`` of the ensemble: one F=1 model, seed ``seed * K + j`` (ensembles of different seeds share
    no member, and member 0 of seed 0 is the single model of seed 0)."""
    return ensemble.model_copy(update={"members": 1, "seed": ensemble.seed * ensemble.members + j})


def learner_for(settings: ModelSettings) -> MFLILearner | Ensemble:
    """The learner ``settings`` describe: one model, or an :class:`Ensemble` when ``members`` > 1."""
    return Ensemble(settings) if settings.members > 1 else MFLILearner(settings)


class _Aligned:
    """Member 0's catalogue (or users), with ``rows_for`` numbering new ids in every member at once."""

    def __init__(self, parts: list[Any], with_gen: list[Any] | None) -> None:
        self._parts, self._gens = parts, with_gen

    def rows_for(self, ids: Sequence[str], gen: Any = None) -> Any:
        out = [p.rows_for(ids) if self._gens is None else p.rows_for(ids, g)
               for p, g in zip(self._parts, self._gens or [None] * len(self._parts), strict=True)]
        first = out[0][0] if isinstance(out[0], tuple) else out[0]
        for other in out[1:]:
            if not np.array_equal(first, other[0] if isinstance(other, tuple) else other):
                raise RuntimeError("ensemble members numbered the same ids differently")
        return out[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parts[0], name)

    def __len__(self) -> int:
        return len(self._parts[0])


class Ensemble:
    """K learners behind the single learner's interface (what the evaluation drives); ``settings``
    describe the combined model (F = K); member j is :func:`member_settings`."""

    def __init__(self, settings: ModelSettings) -> None:
        if settings.members < 2:
            raise ValueError("an ensemble needs members >= 2")
        self.members = [MFLILearner(member_settings(settings, j)) for j in range(settings.members)]
        self.settings = settings.model_copy(update={"facets": settings.members * settings.facets})
        self.items = _Aligned([m.items for m in self.members], [m.gen for m in self.members])
        self.users = _Aligned([m.users for m in self.members], None)

    # --- what every member does --------------------------------------------------------------------
    def learn_columns(self, user_ids, item_ids, values: np.ndarray, ts: np.ndarray) -> StepStats:
        stats = [m.learn_columns(user_ids, item_ids, values, ts) for m in self.members]
        return stats[0]

    def upsert_items(self, events: list[ItemEvent]) -> int:
        return [m.upsert_items(events) for m in self.members][0]

    def reset_histories(self) -> None:
        for m in self.members:
            m.reset_histories()

    # --- the combined model ------------------------------------------------------------------------
    @property
    def rq(self):
        return self.members[0].rq

    @property
    def gen(self):
        return self.members[0].gen

    @property
    def step(self) -> int:
        return self.members[0].step

    def _combine(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        q = np.concatenate([p[0] for p in parts], axis=1)
        g = np.concatenate([p[1] for p in parts], axis=1) - np.float32(np.log(len(parts)))
        return q, g.astype(np.float32)

    def window_queries(self, window: np.ndarray, window_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[n, K, d]`` queries (member j's is facet j) and uniform log gates."""
        return self._combine([m.window_queries(window, window_ts) for m in self.members])

    def user_queries(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [m.user_queries(user_rows) for m in self.members]
        q, g = self._combine([(p[0], p[1]) for p in parts])
        return q, g, parts[0][2]

    def serving_vectors(self) -> np.ndarray:
        return np.concatenate([m.serving_vectors() for m in self.members], axis=1)

    def prior(self, rows: np.ndarray | None = None) -> np.ndarray:
        return self.members[0].prior(rows)

    def query_model(self) -> QueryModel:
        return QueryModel.ensemble([m.query_model() for m in self.members], self.step, self.settings.ensemble_pooling)

    def snapshot(self, with_tags: bool = False) -> ItemSnapshot:
        """Member snapshots side by side: vectors, codes and codebooks along the facet axis."""
        snaps = [m.snapshot(with_tags=with_tags and j == 0) for j, m in enumerate(self.members)]
        s0 = snaps[0]
        for s in snaps[1:]:
            if not np.array_equal(s.item_ids, s0.item_ids) or s.codebooks.shape != s0.codebooks.shape:
                raise RuntimeError("ensemble members disagree on the catalogue or the codebook shape")
        return ItemSnapshot(
            item_ids=s0.item_ids, vectors=np.concatenate([s.vectors for s in snaps], axis=1),
            codes=np.concatenate([s.codes for s in snaps], axis=1),
            codebooks=np.concatenate([s.codebooks for s in snaps], axis=0), prior=s0.prior, live=s0.live,
            version=s0.version, tags=s0.tags,
            query_model=QueryModel.ensemble([s.query_model for s in snaps], self.step,  # type: ignore[arg-type]
                                            self.settings.ensemble_pooling),
        )
