"""What the learner tells the indexer (topic ``mfli.item-updates``), DESIGN §1 and §4.

The learner publishes, per flush interval, the item rows it changed (coalesced: one delta per item,
the newest) and a codebook snapshot whenever the codebooks changed. Deltas carry versions so that a
replayed delta is a no-op (the indexer ignores a delta whose version is not newer than the stored one).
The wire encoding lives next to these classes so producer and consumer cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ItemDelta:
    """New state of one item (or its deletion)."""

    item_id: str
    row: int
    version: int  # learner step that produced this state; monotonic per item
    event_ts: int  # epoch ms of the newest event that changed the item (freshness is measured from it)
    vectors: np.ndarray  # float32[F, d], L2-normalised per facet
    codes: np.ndarray  # int32[F, L] greedy residual code path per facet
    prior: float  # popularity prior, beta * log1p(decayed count)
    deleted: bool = False
    tags: list[str] = field(default_factory=list)


@dataclass
class CodebookSnapshot:
    """The residual-quantisation codebooks at a version."""

    version: int
    codebooks: np.ndarray  # float32[F, L, M, d]
