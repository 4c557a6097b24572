"""The index writer's in-memory per-item columns (see :mod:`mfli.storage.index.writer`).

Why: drift detection, replay filtering and the trending list need the stored version, prior, cluster
per facet and liveness of every item in a batch; dense numpy columns indexed by row make those numpy
operations instead of LMDB reads. LMDB stays the truth: the columns are rebuilt from it at start and
updated only after a commit succeeds. (Not to be confused with the *readers'* dense copy of the index,
:mod:`mfli.storage.index.mirror`, which the server keeps current from the change log.)
"""

from __future__ import annotations

import numpy as np


class ItemColumns:
    """Dense per-row columns of the stored items (row -> state), grown by doubling."""

    def __init__(self, facets: int) -> None:
        self.facets = facets
        self.version = np.full(0, -1, np.int64)
        self.prior = np.zeros(0, np.float32)
        self.clusters = np.full((0, facets), -1, np.int64)
        self.live = np.zeros(0, bool)
        self.exists = np.zeros(0, bool)

    def ensure(self, n: int) -> None:
        cap = self.version.size
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)
        grow = new - cap
        self.version = np.concatenate([self.version, np.full(grow, -1, np.int64)])
        self.prior = np.concatenate([self.prior, np.zeros(grow, np.float32)])
        self.clusters = np.concatenate([self.clusters, np.full((grow, self.facets), -1, np.int64)])
        self.live = np.concatenate([self.live, np.zeros(grow, bool)])
        self.exists = np.concatenate([self.exists, np.zeros(grow, bool)])
