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
from functools import cached_property

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
    c = x - x.mean(axis=-1, keepdims=True)
    return c / np.sqrt((c * c).mean(axis=-1, keepdims=True) + 1e-5) * w + b


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

    @cached_property
    def _fast(self) -> dict[str, np.ndarray]:
        """Weights laid out for the per-request forward: transposed, contiguous, keys and values fused
        into one matrix (a request makes ~15 small numpy calls instead of ~40; measured 370 -> ~90 us)."""
        w = self.weights
        t = {name[: -len(".weight")]: np.ascontiguousarray(w[name].T) for name in w if name.endswith(".weight")
             and w[name].ndim == 2}
        return {
            "inp": t["inp"], "inp_b": w["inp.bias"], "kv": np.ascontiguousarray(np.concatenate([t["wk"], t["wv"]], 1)),
            "kv_b": np.concatenate([w["wk.bias"], w["wv.bias"]]), "wq": t["wq"], "wq_b": w["wq.bias"],
            "wo": t["wo"], "wo_b": w["wo.bias"], "ff1": t["ff1"], "ff1_b": w["ff1.bias"], "ff2": t["ff2"],
            "ff2_b": w["ff2.bias"], "out": t["out"], "out_b": w["out.bias"], "gate": t["gate"], "gate_b": w["gate.bias"],
            "pos_k": np.ascontiguousarray(w["pos_k"][::-1]), "pos_v": np.ascontiguousarray(w["pos_v"][::-1]),
        }

    def query(self, context: np.ndarray, ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries ``float32[F, d]`` and log gates ``float32[F]`` for one history window.

        ``context``: ``[h, input_dim]`` context vectors of the history items, oldest first (the last H
        are used); ``ts_ms``: their event times. Shared-input models take the items' facet vectors
        flattened, ``[h, F * d]``.
        """
        w, f, h, dim = self.weights, self._fast, self.horizon, self.dim
        context, ts_ms = context[-h:], np.asarray(ts_ms[-h:], dtype=np.int64)
        n = context.shape[0]
        if n == 0:
            raise ValueError("a query needs at least one history item")
        x = _layer_norm(context.astype(np.float32, copy=False) @ f["inp"] + f["inp_b"], w["ln_in.weight"],
                        w["ln_in.bias"])
        kv = x @ f["kv"] + f["kv_b"]
        # positions are distances from the newest item: row i of the window is distance n - 1 - i
        k = kv[:, :dim] + f["pos_k"][h - n:] + w["gap_k"][gap_buckets(ts_ms)]
        v = kv[:, dim:] + f["pos_v"][h - n:]
        q0 = x[-1]
        dh = dim // self.heads
        qh = q0 @ f["wq"] + f["wq_b"]
        att = (k * qh).reshape(n, self.heads, dh).sum(axis=2) / math.sqrt(dh)  # [n, heads]
        att = np.exp(att - att.max(axis=0))
        att /= att.sum(axis=0)
        o = (att[:, :, None] * v.reshape(n, self.heads, dh)).sum(axis=0).reshape(dim)
        y = q0 + o @ f["wo"] + f["wo_b"]
        y = y + _gelu(_layer_norm(y, w["ln_ff.weight"], w["ln_ff.bias"]) @ f["ff1"] + f["ff1_b"]) @ f["ff2"] + f["ff2_b"]
        y = _layer_norm(y, w["ln_out.weight"], w["ln_out.bias"])
        q = (y @ f["out"] + f["out_b"]).reshape(self.facets, dim)
        q /= np.maximum(np.sqrt((q * q).sum(axis=1, keepdims=True)), 1e-12)
        g = y @ f["gate"] + f["gate_b"]
        g = g - g.max()
        g = g - np.log(np.exp(g).sum())
        return q.astype(np.float32), g.astype(np.float32)
