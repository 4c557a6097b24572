"""Per item, the query encoder's normalised input at one weights version, cached by the server.

Why: the encoder's first layer, ``x_i = LN(c_i W_inp + b)`` for each history item ``i``, depends only on
that item's vector ``c_i`` and the published weights, not on the user or the window. It is four fifths of
the forward's multiply-adds (a BLAS product of the window per member) and, with its LayerNorm, ~25 µs of a
two-member ensemble's ~60 µs query (``QueryModel.inputs`` against ``QueryModel.query_inputs``, H 50,
d 96). Popular items sit in many users' histories, so the server computes each row once per weights
version and item update and gathers it afterwards.

Invalidation: the index mirror stamps every row it (re)writes with a generation that never repeats
(:class:`mfli.storage.index.mirror.IndexMirror`); an entry is valid while its stamp equals the row's.
A new weights version starts a new cache: the learner publishes one every
``learner.model_publish_interval_s`` (2 s) while it learns, so the cache is rebuilt at that cadence from
the rows requests touch (``mfli bench serve`` re-publishes at the same cadence while it measures).
Entries are ``float32[K, d]`` per row (768 bytes for the default two members of 96), allocated by the OS
only for rows that appear in some history.

Concurrency: lookups run compiled with the GIL held, stores are numpy calls under the GIL. A lookup
reads a row's stamp *before* the caller reads its vector, and the mirror writes the vector before the
stamp, so an entry can at worst be stored under an older stamp than its vector (recomputed on the next
read), never under a newer one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mfli.metrics import ENCODER_INPUTS
from mfli.retrieval.encoder_kernel import gather_inputs
from mfli.retrieval.query_model import QueryModel

_CACHED, _COMPUTED = ENCODER_INPUTS.labels(result="cached"), ENCODER_INPUTS.labels(result="computed")


class InputCache:
    """Normalised encoder inputs of one :class:`QueryModel` version, by item row."""

    def __init__(self, model: QueryModel, capacity: int) -> None:
        self.model = model
        self.version = model.version
        # by row, then member: a row's K inputs are one contiguous 3 KB-or-less read (the gather is a few
        # dozen random rows of a large array: a [K, rows, d] layout had measured twice the cache misses)
        self._x = np.empty((0, model.members, model.encoder_dim), np.float32)
        self._stamp = np.empty(0, np.int64)
        self.hits = 0
        self.misses = 0
        self._grow(capacity)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._stamp.size, 1024)
        # np.empty of this size is an anonymous mapping: pages cost memory only once a row is written
        x = np.empty((cap, *self._x.shape[1:]), np.float32)
        stamp = np.full(cap, -2, np.int64)  # empty: equal to no row's stamp (the mirror's unwritten rows hold -1)
        n = self._stamp.size
        x[:n], stamp[:n] = self._x, self._stamp
        self._x, self._stamp = x, stamp

    def inputs(self, rows: np.ndarray, row_stamp: np.ndarray, vectors: Callable[[np.ndarray], np.ndarray]
               ) -> np.ndarray:
        """``float32[K, n, d]`` inputs of ``rows`` (oldest first). ``row_stamp`` is the mirror's stamp column
        (indexed by row); ``vectors(rows)`` gives the context rows ``[m, K * input_width]`` of those not cached."""
        rows = np.ascontiguousarray(rows, np.int64)
        out = np.empty((self._x.shape[1], rows.size, self._x.shape[2]), np.float32)
        miss = gather_inputs(self._x, self._stamp, rows, row_stamp, out)
        if miss.size:
            stamps = row_stamp[rows[miss]]  # before the vectors (the mirror writes them in the other order)
            fresh = self.model.inputs(np.ascontiguousarray(vectors(rows[miss]), np.float32))
            out[:, miss] = fresh
            todo = rows[miss]
            if int(todo.max()) >= self._stamp.size:
                self._grow(int(todo.max()) + 1)
            self._x[todo] = fresh.transpose(1, 0, 2)  # a repeated row stores the same values twice
            self._stamp[todo] = stamps  # after the inputs
        self.misses += int(miss.size)
        self.hits += rows.size - int(miss.size)
        if miss.size:
            _COMPUTED.inc(miss.size)
        _CACHED.inc(rows.size - miss.size)
        return out
