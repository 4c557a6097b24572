"""Per item, the query encoder's normalised input at one weights version, cached by the server.

Why: the encoder's first layer, ``x_i = LN(c_i W_inp + b)`` for each history item ``i``, depends only on
that item's vector ``c_i`` and the published weights, not on the user or the window. It is four fifths of
the forward's multiply-adds (a BLAS product of the window per member) and, with its LayerNorm, ~25 µs of a
two-member ensemble's ~60 µs query (``QueryModel.inputs`` against ``QueryModel.query_inputs``, H 50,
d 96). Popular items sit in many users' histories, so the server computes each row once per weights
version and item update and gathers it afterwards.

Invalidation: the index mirror stamps every row it (re)writes with a generation that never repeats
(:class:`mfli.storage.index.mirror.IndexMirror`); an entry is valid while its stamp equals the row's and
it was computed with the request's weights version. The learner publishes a version every
``learner.model_publish_interval_s`` (2 s) while it learns, so entries are recomputed at that cadence for
the rows requests touch (``mfli bench serve`` re-publishes at the same cadence while it measures).
Entries are ``float32[K, d]`` per row (768 bytes for the default two members of 96), allocated by the OS
only for rows that appear in some history.

Concurrency: lookups run compiled with the GIL held, stores are numpy calls under the GIL. A lookup
reads a row's stamp *before* the caller reads its vector, and the mirror writes the vector before the
stamp, so an entry can at worst be stored under an older stamp than its vector (recomputed on the next
read), never under a newer one. A store writes the inputs, then the version, then the stamp; a request
on an older weights version (another thread's) overwrites entries with its own version, which the newer
requests then recompute.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mfli.metrics import ENCODER_INPUTS
from mfli.retrieval.encoder_kernel import gather_inputs
from mfli.retrieval.query_model import QueryModel

_CACHED, _COMPUTED = ENCODER_INPUTS.labels(result="cached"), ENCODER_INPUTS.labels(result="computed")


class InputCache:
    """Normalised encoder inputs by item row, each tagged with the row's mirror stamp and the weights version
    that computed it; one per index mirror, for every weights version of one encoder shape."""

    def __init__(self, members: int, encoder_dim: int, capacity: int) -> None:
        self.shape = (members, encoder_dim)
        # by row, then member: a row's K inputs are one contiguous read (the gather is a few dozen random
        # rows of a large array: a [K, rows, d] layout had measured twice the cache misses)
        self._x = np.empty((0, members, encoder_dim), np.float32)
        self._tag = np.empty((0, 2), np.int64)  # (mirror stamp, weights version) per row
        self.hits = 0
        self.misses = 0
        self._grow(capacity)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._tag.shape[0], 1024)
        # np.empty of this size is an anonymous mapping: pages cost memory only once a row is written. One
        # cache across weights versions (the tag says which computed an entry): a fresh one per version
        # would fault in and zero its pages every two seconds while the learner publishes
        x = np.empty((cap, *self._x.shape[1:]), np.float32)
        tag = np.full((cap, 2), -2, np.int64)  # empty: equal to no row's stamp (unwritten mirror rows hold -1)
        n = self._tag.shape[0]
        x[:n], tag[:n] = self._x, self._tag
        self._x, self._tag = x, tag

    def inputs(self, model: QueryModel, rows: np.ndarray, row_stamp: np.ndarray,
               vectors: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``float32[K, n, d]`` inputs of ``rows`` (oldest first) for ``model``'s weights. ``row_stamp`` is the
        mirror's stamp column (indexed by row); ``vectors(rows)`` gives the context rows
        ``[m, K * input_width]`` of those not cached."""
        rows = np.ascontiguousarray(rows, np.int64)
        out = np.empty((self._x.shape[1], rows.size, self._x.shape[2]), np.float32)
        miss = gather_inputs(self._x, self._tag, rows, row_stamp, model.version, out)
        if miss.size:
            todo = rows[miss]
            stamps = row_stamp[todo]  # before the vectors (the mirror writes them in the other order)
            fresh = model.inputs(np.ascontiguousarray(vectors(todo), np.float32))
            out[:, miss] = fresh
            if int(todo.max()) >= self._tag.shape[0]:
                self._grow(int(todo.max()) + 1)
            self._x[todo] = fresh.transpose(1, 0, 2)  # a repeated row stores the same values twice
            self._tag[todo, 1] = model.version  # the tag after the inputs, the stamp last
            self._tag[todo, 0] = stamps
            _COMPUTED.inc(miss.size)
        self.misses += int(miss.size)
        self.hits += rows.size - int(miss.size)
        _CACHED.inc(rows.size - miss.size)
        return out
