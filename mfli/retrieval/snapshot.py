"""A consistent, read-only copy of the learner's item state: what every retriever is built from.

The learner (``mfli.learner``) produces it with ``MFLILearner.snapshot()``; the in-memory learned
index, exact search, hnswlib and the popularity baselines all consume the same object, so evaluation
compares retrievers over *identical* embeddings, codes and priors. Arrays are copies: the learner can
keep training while a retriever holds a snapshot.

Rows are the learner's dense item rows; ``item_ids[row]`` is the external id. Deleted items keep their
row (rows are never reused, so deltas and checkpoints stay stable) but have ``live[row] == False`` and
must never be returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfli.retrieval.query_model import QueryModel


@dataclass(frozen=True)
class ItemSnapshot:
    """Item state at one learner step.

    Shapes (N items, F facets, d dims, L levels, M codewords per level):

    * ``vectors``  float32[N, F, d], L2-normalised per facet (the continuous embeddings e_f)
    * ``codes``    int32[N, F, L], greedy residual-quantisation code path per facet
    * ``codebooks`` float32[F, L, M, d]
    * ``prior``    float32[N], popularity prior ``beta * log1p(decayed count)`` (docs/design.md §Model)
    * ``live``     bool[N], False for deleted rows and rows never seen in an event or upsert
    """

    item_ids: np.ndarray  # object[N] of str
    vectors: np.ndarray
    codes: np.ndarray
    codebooks: np.ndarray
    prior: np.ndarray
    live: np.ndarray
    version: int = 0  # learner step the snapshot was taken at
    tags: list[list[str]] | None = None
    query_model: QueryModel | None = None  # the query encoder at this step

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.vectors.ndim != 3 or self.vectors.shape[0] != n:
            raise ValueError(f"vectors must be float32[N={n}, F, d], got shape {self.vectors.shape}")
        _, f, d = self.vectors.shape
        if self.codebooks.ndim != 4 or self.codebooks.shape[0] != f or self.codebooks.shape[3] != d:
            raise ValueError(f"codebooks must be float32[F={f}, L, M, d={d}], got {self.codebooks.shape}")
        levels = self.codebooks.shape[1]
        if self.codes.shape != (n, f, levels):
            raise ValueError(f"codes must be int32[{n}, {f}, {levels}], got {self.codes.shape}")
        if self.prior.shape != (n,) or self.live.shape != (n,):
            raise ValueError(f"prior and live must have shape ({n},), got {self.prior.shape}, {self.live.shape}")
        if self.tags is not None and len(self.tags) != n:
            raise ValueError(f"tags must have one entry per row ({n}), got {len(self.tags)}")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def facets(self) -> int:
        return self.vectors.shape[1]

    @property
    def dim(self) -> int:
        return self.vectors.shape[2]

    @property
    def levels(self) -> int:
        return self.codebooks.shape[1]

    @property
    def codewords(self) -> int:
        return self.codebooks.shape[2]

    def live_rows(self) -> np.ndarray:
        """int64 rows of every live item: the universe every retriever searches."""
        return np.flatnonzero(self.live).astype(np.int64)

    def row_of(self) -> dict[str, int]:
        """External id -> row (built on demand; the learner keeps its own map while training)."""
        return {str(item): row for row, item in enumerate(self.item_ids.tolist())}
