"""The query encoder's forward pass for one request, compiled (numba).

Why compiled: in numpy the forward is ~25 small array operations, ~250 µs per request on this box, and
it cut one server worker's HTTP throughput from ~1.7k to ~1.05k req/s (``mfli bench serve
--query-model both``). The same arithmetic in one compiled call costs a few tens of µs. It is the
function :class:`mfli.retrieval.query_model.QueryModel` documents (and tests hold equal to the learner's
torch encoder to 1e-5); the weights come pre-transposed from ``QueryModel._fast``.

Measured with ``QueryModel.query`` (one member, H 50, d 96, best of 5 x 3,000 calls): 84 µs -> 35 µs (two
members: 170 -> 74 µs) once (1) the window's input projection ``context @ W_inp``, four fifths of the
multiply-adds, became one BLAS call before the kernel (26 µs as a compiled loop, 9 µs in BLAS); (2) every
inner loop runs from index 0 over contiguous memory (a head's columns as a slice of a fused matrix, or a
loop from an offset, kept numba from vectorising: each per-head product took ~8 µs, now ~1), with the
projections laid out by head in ``QueryModel._fast``; (3) the input LayerNorm runs in place (two arrays a
row had cost more than its arithmetic); (4) the feed-forward's tanh-GELU is computed as ``t * sigmoid(2u)``
(the same function: ``0.5 (1 + tanh u) = sigmoid(2u)``), whose ``exp`` vectorises where numba's scalar
``tanh`` does not (192 units: 5.8 -> 2.3 µs).

Then (two members 74.8 -> 59.0 µs, and ~36 µs with the server's per-item input cache): (5) the
LayerNorms run in float32 with fastmath (``mu /= n`` had promoted every later step to float64 in scalar
loops: 50 rows of 96, two members, 19.5 -> 3.6 µs); (6) one compiled call runs every member
(:func:`ensemble_forward`, parameters stacked over members) and computes the gap buckets itself, instead
of a call per member with ~30 arrays to type-check and numpy for the buckets (~5 µs); (7) the input
layer (:func:`normalise_inputs`) is separate, since it is per item and the server caches it
(:mod:`mfli.retrieval.inputs`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=True)
def _vecmat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = b.shape[1]
    out = np.zeros(m, np.float32)
    for t in range(a.shape[0]):
        x = a[t]
        for j in range(m):
            out[j] += x * b[t, j]
    return out


@njit(cache=True, nogil=True, fastmath=True)
def _layer_norm_row(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    width = np.float32(n)  # float32 throughout: ``mu /= n`` would make every later step float64
    mu = np.float32(0.0)
    for j in range(n):
        mu += x[j]
    mu /= width
    var = np.float32(0.0)
    for j in range(n):
        var += (x[j] - mu) * (x[j] - mu)
    inv = np.float32(1.0) / np.sqrt(var / width + np.float32(1e-5))
    out = np.empty(n, np.float32)
    for j in range(n):
        out[j] = (x[j] - mu) * inv * w[j] + b[j]
    return out


@njit(cache=True, nogil=True, fastmath=True)
def _layer_norm_rows(x: np.ndarray, bias: np.ndarray, w: np.ndarray, b: np.ndarray) -> None:
    """``x[i] = layer_norm(x[i] + bias)`` for every row, in place (no per-row arrays: 2 allocations a row
    cost more than the row's arithmetic). float32 and fastmath, so the sums vectorise: 50 rows of 96
    took ~10 µs with the mean promoted to float64 (``mu /= n``) in scalar loops, ~1.5 µs now."""
    n = x.shape[1]
    width = np.float32(n)
    for i in range(x.shape[0]):
        mu = np.float32(0.0)
        for j in range(n):
            x[i, j] += bias[j]
            mu += x[i, j]
        mu /= width
        var = np.float32(0.0)
        for j in range(n):
            var += (x[i, j] - mu) * (x[i, j] - mu)
        inv = np.float32(1.0) / np.sqrt(var / width + np.float32(1e-5))
        for j in range(n):
            x[i, j] = (x[i, j] - mu) * inv * w[j] + b[j]


@njit(cache=True, nogil=True, fastmath=True)
def normalise_inputs(x: np.ndarray, inp_b: np.ndarray, ln_w: np.ndarray, ln_b: np.ndarray) -> None:
    """The encoder's input layer after the projection, in place: ``x[j, i] = LN_j(x[j, i] + b_j)`` for
    member ``j``'s projected rows ``x[j]`` (``[K, n, d]``; parameters stacked ``[K, d]``). A row depends on
    its item's vector and the weights only, so the server caches it per item (:mod:`mfli.retrieval.inputs`)."""
    for j in range(x.shape[0]):
        _layer_norm_rows(x[j], inp_b[j], ln_w[j], ln_b[j])


@njit(cache=True, nogil=True)
def gap_bucket_row(ts_ms: np.ndarray, buckets: int) -> np.ndarray:
    """:func:`mfli.retrieval.query_model.gap_buckets` for one window, exactly: ``floor(log2(y))`` for
    ``y >= 1`` is frexp's exponent minus one (no rounding of a logarithm to land on the wrong bucket)."""
    n = ts_ms.shape[0]
    out = np.zeros(n, np.int64)
    if n == 0:
        return out
    newest = ts_ms[n - 1]
    for i in range(n):
        gap_s = max(newest - ts_ms[i], 0) / 1000.0
        out[i] = min(math.frexp(1.0 + gap_s)[1] - 1, buckets - 1)
    return out


#: the stacked parameters :func:`ensemble_forward` takes, in order (``QueryModel._stacked`` builds them)
PARAMS = ("k_heads", "v_heads", "kv_b", "pos_k", "pos_v", "gap_k", "wq", "wq_b", "wo", "wo_b", "ln_ff.weight",
          "ln_ff.bias", "ff1", "ff1_b", "ff2", "ff2_b", "ln_out.weight", "ln_out.bias", "out", "out_b", "gate",
          "gate_b")


@njit(cache=True, nogil=True, fastmath=True)
def ensemble_forward(x: np.ndarray, ts_ms: np.ndarray, horizon: int, heads: int, facets: int, buckets: int,
                     params: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(queries ``[K F, d]``, log gates ``[K F]``) of K members (``facets`` each) for one window, in one call.

    ``x`` ``[K, n, d]``: each member's normalised inputs (:func:`normalise_inputs`), oldest first, n <= H;
    ``ts_ms`` their event times; ``params`` the arrays named by :data:`PARAMS`, each stacked over members
    (leading axis K). One call instead of one per member saves the dispatch of ~30 arrays and the
    per-member Python (measured in the module docstring). Log gates are uniform over members
    (``- log K``), the mixture over facets within one."""
    members = x.shape[0]
    gaps = gap_bucket_row(ts_ms, buckets)
    d_out = params[18].shape[2] // facets
    qs = np.empty((members * facets, d_out), np.float32)
    gs = np.empty(members * facets, np.float32)
    shift = np.float32(math.log(members))
    for j in range(members):
        q, g = _member_forward(x[j], gaps, horizon, heads, facets, params, j)
        for f in range(facets):
            qs[j * facets + f] = q[f]
            gs[j * facets + f] = g[f] - shift
    return qs, gs


@njit(cache=True, nogil=True, fastmath=True)
def _member_forward(x: np.ndarray, gaps: np.ndarray, horizon: int, heads: int, facets: int, params: tuple,
                    j: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries ``[F, d]``, log gates ``[F]``) of member ``j`` for its normalised inputs ``x`` ``[n, d]`` and
    the window's gap buckets; ``pos_k``/``pos_v`` are indexed by window slot (row ``H - n + i``).
    ``k_heads`` ``[heads, d_h, d]`` are the key projection's rows by head and ``v_heads`` ``[heads, d, d_h]``
    the value projection's columns by head, each contiguous: the per-head products then run along
    contiguous rows (measured: 8 -> ~1 µs a product against slicing one fused matrix, whose offset columns
    numba does not vectorise)."""
    k_heads, v_heads, kv_b, pos_k, pos_v, gap_k = params[0][j], params[1][j], params[2][j], params[3][j], \
        params[4][j], params[5][j]
    wq, wq_b, wo, wo_b, ln_ff_w, ln_ff_b = params[6][j], params[7][j], params[8][j], params[9][j], params[10][j], \
        params[11][j]
    ff1, ff1_b, ff2, ff2_b, ln_out_w, ln_out_b = params[12][j], params[13][j], params[14][j], params[15][j], \
        params[16][j], params[17][j]
    out, out_b, gate, gate_b = params[18][j], params[19][j], params[20][j], params[21][j]
    n = x.shape[0]
    dim = x.shape[1]
    dh = dim // heads
    q0 = x[n - 1].copy()
    qh = _vecmat(q0, wq) + wq_b
    scale = np.float32(1.0 / math.sqrt(dh))
    # Keys and values are never formed per item: q_a . (x_i W_k + b_k)[a] = x_i . (W_k[:, a] q_a) + q_a . b_k[a],
    # and sum_i p_i (x_i W_v)[a] = (sum_i p_i x_i) W_v[:, a]: d*dh work per head instead of n*d*2d
    # (a third of the forward's multiply-adds at H = 50)
    att = np.empty((n, heads), np.float32)
    for a in range(heads):
        qa, kb = qh[a * dh:(a + 1) * dh], kv_b[a * dh:(a + 1) * dh]
        u = _vecmat(qa, k_heads[a])  # W_k[:, a] q_a
        c = np.float32(0.0)
        for j in range(dh):
            c += kb[j] * qa[j]
        for i in range(n):
            s = c
            for r in range(dim):
                s += x[i, r] * u[r]
            pk, gk = pos_k[horizon - n + i, a * dh:(a + 1) * dh], gap_k[gaps[i], a * dh:(a + 1) * dh]
            for j in range(dh):  # from 0: an offset index defeats numba's vectoriser
                s += (pk[j] + gk[j]) * qa[j]
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
        oa = o[a * dh:(a + 1) * dh]
        for i in range(n):
            p = att[i, a] / total
            for r in range(dim):
                xbar[r] += p * x[i, r]
            pv = pos_v[horizon - n + i, a * dh:(a + 1) * dh]
            for j in range(dh):
                oa[j] += p * pv[j]
        ov = _vecmat(xbar, v_heads[a])  # xbar W_v[:, a]
        for j in range(dh):
            o[a * dh + j] += ov[j] + kv_b[dim + a * dh + j]
    y = q0 + _vecmat(o, wo) + wo_b
    hidden = _vecmat(_layer_norm_row(y, ln_ff_w, ln_ff_b), ff1) + ff1_b
    c = np.float32(2.0 * math.sqrt(2.0 / math.pi))  # tanh-GELU as t * sigmoid(2u), u = sqrt(2/pi)(t + .044715 t^3)
    for j in range(hidden.shape[0]):
        t = hidden[j]
        hidden[j] = t / (np.float32(1.0) + np.exp(-c * (t + np.float32(0.044715) * t * t * t)))
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


@njit(cache=True)
def gather_inputs(cached: np.ndarray, tag: np.ndarray, rows: np.ndarray, row_stamp: np.ndarray, version: int,
                  out: np.ndarray) -> np.ndarray:
    """Copy the cached inputs ``cached[r]`` (``[K, d]``) of each row into ``out`` ``[K, n, d]`` where the
    entry's tag is (the row's current stamp ``row_stamp[r]``, read here before the caller reads any
    vector; ``version``); return the positions that missed (the caller computes and stores those). Holds
    the GIL: a request's check and copy are not interleaved with another thread's store
    (:mod:`mfli.retrieval.inputs`)."""
    n = rows.shape[0]
    miss = np.empty(n, np.int64)
    n_miss = 0
    for i in range(n):
        r = rows[i]
        if r < tag.shape[0] and tag[r, 0] == row_stamp[r] and tag[r, 1] == version:
            for j in range(cached.shape[1]):
                out[j, i] = cached[r, j]
        else:
            miss[n_miss] = i
            n_miss += 1
    return miss[:n_miss]
