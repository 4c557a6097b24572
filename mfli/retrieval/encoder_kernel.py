"""The query encoder's forward pass for one request, compiled (numba).

Why compiled: in numpy the forward is ~25 small array operations, ~250 µs per request on this box, and
it cut one server worker's HTTP throughput from ~1.7k to ~1.05k req/s (``mfli bench serve
--query-model both``). The same arithmetic in one compiled call costs a few tens of µs. It is the
function :class:`mfli.retrieval.query_model.QueryModel` documents (and tests hold equal to the learner's
torch encoder to 1e-5); the weights come pre-transposed from ``QueryModel._fast``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=True)
def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a [n, k] @ b [k, m]`` with the inner loop over b's contiguous rows (vectorised; numba's np.dot
    would need scipy)."""
    n, k = a.shape
    m = b.shape[1]
    out = np.zeros((n, m), np.float32)
    for i in range(n):
        for t in range(k):
            x = a[i, t]
            for j in range(m):
                out[i, j] += x * b[t, j]
    return out


@njit(cache=True, nogil=True, fastmath=True)
def _vecmat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = b.shape[1]
    out = np.zeros(m, np.float32)
    for t in range(a.shape[0]):
        x = a[t]
        for j in range(m):
            out[j] += x * b[t, j]
    return out


@njit(cache=True, nogil=True)
def _layer_norm_row(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    mu = np.float32(0.0)
    for j in range(n):
        mu += x[j]
    mu /= n
    var = np.float32(0.0)
    for j in range(n):
        var += (x[j] - mu) * (x[j] - mu)
    inv = np.float32(1.0) / np.sqrt(var / n + np.float32(1e-5))
    out = np.empty(n, np.float32)
    for j in range(n):
        out[j] = (x[j] - mu) * inv * w[j] + b[j]
    return out


@njit(cache=True, nogil=True, fastmath=True)
def encoder_forward(context: np.ndarray, gaps: np.ndarray, horizon: int, heads: int, facets: int,
                    inp: np.ndarray, inp_b: np.ndarray, ln_in_w: np.ndarray, ln_in_b: np.ndarray,
                    kv: np.ndarray, kv_b: np.ndarray, pos_k: np.ndarray, pos_v: np.ndarray, gap_k: np.ndarray,
                    wq: np.ndarray, wq_b: np.ndarray, wo: np.ndarray, wo_b: np.ndarray,
                    ln_ff_w: np.ndarray, ln_ff_b: np.ndarray, ff1: np.ndarray, ff1_b: np.ndarray,
                    ff2: np.ndarray, ff2_b: np.ndarray, ln_out_w: np.ndarray, ln_out_b: np.ndarray,
                    out: np.ndarray, out_b: np.ndarray, gate: np.ndarray, gate_b: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(queries ``[F, d]``, log gates ``[F]``) for ``context`` ``[n, input_dim]`` (oldest first, n <= H)
    and its gap buckets; ``pos_k``/``pos_v`` are indexed by window slot (row ``H - n + i``)."""
    n = context.shape[0]
    dim = inp.shape[1]
    dh = dim // heads
    x = _matmul(context, inp)
    for i in range(n):
        x[i] = _layer_norm_row(x[i] + inp_b, ln_in_w, ln_in_b)
    q0 = x[n - 1].copy()
    qh = _vecmat(q0, wq) + wq_b
    scale = np.float32(1.0 / math.sqrt(dh))
    # Keys and values are never formed per item: q_a . (x_i W_k + b_k)[a] = x_i . (W_k[:, a] q_a) + q_a . b_k[a],
    # and sum_i p_i (x_i W_v)[a] = (sum_i p_i x_i) W_v[:, a]: d*dh work per head instead of n*d*2d
    # (a third of the forward's multiply-adds at H = 50)
    att = np.empty((n, heads), np.float32)
    for a in range(heads):
        u = np.zeros(dim, np.float32)
        for r in range(dim):
            acc = np.float32(0.0)
            for j in range(a * dh, (a + 1) * dh):
                acc += kv[r, j] * qh[j]
            u[r] = acc
        c = np.float32(0.0)
        for j in range(a * dh, (a + 1) * dh):
            c += kv_b[j] * qh[j]
        for i in range(n):
            slot = horizon - n + i
            s = c
            for r in range(dim):
                s += x[i, r] * u[r]
            for j in range(a * dh, (a + 1) * dh):
                s += (pos_k[slot, j] + gap_k[gaps[i], j]) * qh[j]
            att[i, a] = s * scale
    o = np.zeros(dim, np.float32)
    for a in range(heads):
        m = att[0, a]
        for i in range(1, n):
            m = max(m, att[i, a])
        total = np.float32(0.0)
        for i in range(n):
            att[i, a] = np.exp(att[i, a] - m)
            total += att[i, a]
        xbar = np.zeros(dim, np.float32)
        for i in range(n):
            p = att[i, a] / total
            slot = horizon - n + i
            for r in range(dim):
                xbar[r] += p * x[i, r]
            for j in range(a * dh, (a + 1) * dh):
                o[j] += p * pos_v[slot, j]
        for j in range(a * dh, (a + 1) * dh):
            acc = kv_b[dim + j]
            for r in range(dim):
                acc += xbar[r] * kv[r, dim + j]
            o[j] += acc
    y = q0 + _vecmat(o, wo) + wo_b
    hidden = _vecmat(_layer_norm_row(y, ln_ff_w, ln_ff_b), ff1) + ff1_b
    c = np.float32(math.sqrt(2.0 / math.pi))
    for j in range(hidden.shape[0]):
        t = hidden[j]
        hidden[j] = np.float32(0.5) * t * (np.float32(1.0) + np.tanh(c * (t + np.float32(0.044715) * t * t * t)))
    y = y + _vecmat(hidden, ff2) + ff2_b
    y = _layer_norm_row(y, ln_out_w, ln_out_b)
    d_out = out.shape[1] // facets  # the item vectors' width (the encoder's own may differ)
    q = (_vecmat(y, out) + out_b).reshape(facets, d_out)
    for f in range(facets):
        norm = np.float32(0.0)
        for j in range(d_out):
            norm += q[f, j] * q[f, j]
        norm = max(np.sqrt(norm), np.float32(1e-12))
        for j in range(d_out):
            q[f, j] /= norm
    g = _vecmat(y, gate) + gate_b
    m = g.max()
    total = np.float32(0.0)
    for f in range(facets):
        total += np.exp(g[f] - m)
    for f in range(facets):
        g[f] = g[f] - m - np.log(total)
    return q, g
