"""The learner's query function in numpy, and how facet scores combine: what the server runs.

The learner trains :class:`mfli.learner.encoder.QueryEncoder` (torch) and publishes its weights with
a version; the server must answer with *exactly* that function (no train/serve skew) without
importing torch, so this module re-implements the forward pass for one window at a time. A parity test
(``tests/test_query_model.py``) holds the two equal to 1e-5 on the same weights and history.

Facets combine as a mixture of softmaxes: ``score = tau * log sum_f g_f exp(q_f . e_f / tau)``, with
per-user gates ``g`` from the encoder. It is non-linear in the item (a facet counts only where it is
the user's strongest reason), reduces to ``q . e`` for one facet, and is the very logit the learner's
softmax is trained on, so training and serving rank identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GAP_BUCKETS = 32  # log2-second buckets of the gap between a history item and the newest one


def gap_buckets(ts_ms: np.ndarray) -> np.ndarray:
    """Bucket ``floor(log2(1 + seconds before the newest event))``, capped, for event times oldest first
    along the last axis (``[h]`` or ``[n, h]``)."""
    if ts_ms.size == 0:
        return np.zeros(ts_ms.shape, np.int64)
    gap_s = np.maximum(ts_ms[..., -1:] - ts_ms, 0) / 1000.0
    return np.minimum(np.floor(np.log2(1.0 + gap_s)), GAP_BUCKETS - 1).astype(np.int64)


def combine(facet_scores: np.ndarray, log_gates: np.ndarray, tau: float) -> np.ndarray:
    """``tau * logsumexp_f(s_f / tau + log g_f)`` over the last axis of ``[..., F]`` scores."""
    if facet_scores.shape[-1] == 1:
        return facet_scores[..., 0] + tau * log_gates[..., 0]
    z = facet_scores / tau + log_gates
    m = z.max(axis=-1, keepdims=True)
    return tau * (m[..., 0] + np.log(np.exp(z - m).sum(axis=-1)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@dataclass(frozen=True)
class QueryModel:
    """A published version of the query encoder: weights by parameter name, plus its shape."""

    version: int
    weights: dict[str, np.ndarray]
    facets: int
    dim: int
    heads: int
    tau: float

    @property
    def horizon(self) -> int:
        return int(self.weights["pos_k"].shape[0])

    def _lin(self, name: str, x: np.ndarray) -> np.ndarray:
        return x @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]

    def query(self, context: np.ndarray, ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries ``float32[F, d]`` and log gates ``float32[F]`` for one history window.

        ``context``: ``[h, input_dim]`` context vectors of the history items, oldest first (the last H
        are used); ``ts_ms``: their event times. Shared-input models take the items' facet vectors
        flattened, ``[h, F * d]``.
        """
        w, h = self.weights, self.horizon
        context, ts_ms = context[-h:], np.asarray(ts_ms[-h:], dtype=np.int64)
        n = context.shape[0]
        if n == 0:
            raise ValueError("a query needs at least one history item")
        x = _layer_norm(self._lin("inp", context.astype(np.float32)), w["ln_in.weight"], w["ln_in.bias"])
        dist = np.arange(n - 1, -1, -1)
        k = self._lin("wk", x) + w["pos_k"][dist] + w["gap_k"][gap_buckets(ts_ms)]
        v = self._lin("wv", x) + w["pos_v"][dist]
        q0 = x[-1]
        dh = self.dim // self.heads
        qh = self._lin("wq", q0).reshape(self.heads, dh)
        att = np.einsum("ad,nad->na", qh, k.reshape(n, self.heads, dh)) / math.sqrt(dh)
        att = np.exp(att - att.max(axis=0))
        att /= att.sum(axis=0)
        o = np.einsum("na,nad->ad", att, v.reshape(n, self.heads, dh)).reshape(self.dim)
        y = q0 + self._lin("wo", o)
        y = y + self._lin("ff2", _gelu(self._lin("ff1", _layer_norm(y, w["ln_ff.weight"], w["ln_ff.bias"]))))
        y = _layer_norm(y, w["ln_out.weight"], w["ln_out.bias"])
        q = self._lin("out", y).reshape(self.facets, self.dim)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = self._lin("gate", y)
        g = g - g.max()
        g = g - np.log(np.exp(g).sum())
        return q.astype(np.float32), g.astype(np.float32)
