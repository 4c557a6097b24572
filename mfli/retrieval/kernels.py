"""Compiled (numba) kernels for the serving hot path.

Why compiled: the learned index reranks a few thousand candidates per request. In numpy that is a
gather (``vectors[rows]`` copies ~0.8 KB per candidate into a fresh array), a matrix-vector product,
an ``argpartition`` and a de-duplication, plus ~50 small numpy calls around them: ~1.3 ms per query at
100k items, slower than hnswlib. Measured step by step (``mfli bench serve``, same 200 queries):

* one fused pass from the dense arrays (score in place, keep a running top-k, check exclusion and
  duplicates only for rows that would enter it): 784 -> 1,250 q/s at 100k;
* the trigger histogram, beam search, path lookup, member gather and query pooling compiled too;
* an int8 first pass (:func:`mfli.retrieval.base.quantize_rows`, a quarter of the bytes; int8 x int16 products summed in
  int32, which LLVM turns into ``vpmaddwd``) that keeps a shortlist for an exact float32 rescore;
* int8 codes laid out posting list by posting list, so a cluster's members are read sequentially
  (the IVF layout; candidate rows are otherwise random cache misses): 100k 4,200 q/s, 1M 3,100 q/s.

The answers equal the numpy reference (:func:`mfli.retrieval.learned.finish_numpy`) whenever no
true top-k item falls out of the int8 shortlist, which the tests check on ties, repeats and
exclusions. The kernels release the GIL (``nogil``), so the server's recall monitor thread can rerank
while the event loop does too, and are cached on disk (``cache=True``) so only the first process on a
machine pays the compile (~10 s).
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mfli.retrieval.clusters import FACET_SHIFT

#: candidates scored ahead of the one being scored have their int8 rows prefetched this far ahead
PREFETCH_AHEAD = 8


@intrinsic
def _prefetch(typingctx, arr, i, j):
    """Hint the CPU to fetch ``arr[i, j]``'s cache line (``llvm.prefetch``, read, keep in all levels).
    Candidate rows are random, so without it every row is a cache miss the loop waits for."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]])
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _offer(r: int, i: int, s: float, exclude: np.ndarray, pos: np.ndarray, score: np.ndarray, filled: int) -> int:
    """Insert candidate ``i`` (row ``r``, score ``s``) into the descending buffer ``pos/score`` unless it is
    excluded; ties keep the earlier. Returns the new fill. The caller offers each row once (repeats are
    skipped before scoring: :func:`rerank_top_k`)."""
    size = pos.shape[0]
    if filled == size and s <= score[size - 1]:
        return filled
    lo, hi = 0, exclude.shape[0]  # binary search: only for candidates that would enter the buffer
    while lo < hi:
        mid = (lo + hi) >> 1
        if exclude[mid] < r:
            lo = mid + 1
        else:
            hi = mid
    if lo < exclude.shape[0] and exclude[lo] == r:
        return filled
    return _insert(pos, score, filled, i, s)


@njit(cache=True, nogil=True, inline="always")
def _insert(idx: np.ndarray, vals: np.ndarray, filled: int, i: int, v) -> int:
    """Insert ``(i, v)`` into the descending buffer ``idx/vals`` (capacity ``idx.size``, ``filled`` used),
    after every value >= v (earlier entries win ties), dropping the last when full; returns the fill."""
    size = idx.shape[0]
    at = filled if filled < size else size - 1
    while at > 0 and vals[at - 1] < v:
        idx[at] = idx[at - 1]
        vals[at] = vals[at - 1]
        at -= 1
    idx[at] = i
    vals[at] = v
    return filled + 1 if filled < size else filled


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _mixture(dots: np.ndarray, log_gates: np.ndarray, inv_tau: np.float32, tau: np.float32) -> np.float32:
    """``tau * logsumexp_f(dots_f / tau + log_gates_f)`` (stable: the max is factored out)."""
    m = np.float32(-np.inf)
    for f in range(dots.shape[0]):
        m = max(m, dots[f] * inv_tau + log_gates[f])
    total = np.float32(0.0)
    for f in range(dots.shape[0]):
        total += np.exp(dots[f] * inv_tau + log_gates[f] - m)
    return np.float32(tau) * (m + np.log(total))


_SCRATCH = threading.local()


def seen_scratch(cap: int) -> np.ndarray:
    """This thread's zeroed ``uint8[>= cap]`` for :func:`rerank_top_k` (which leaves it zeroed): one per
    thread, grown with the index, so a request pays for neither an allocation nor a memset of the catalogue."""
    buf = getattr(_SCRATCH, "seen", None)
    if buf is None or buf.shape[0] < cap:
        buf = np.zeros(max(cap, 1), np.uint8)
        _SCRATCH.seen = buf
    return buf


@njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def rerank_top_k(
    vectors: np.ndarray,  # float32[cap, D] item vectors, facets concatenated
    prior: np.ndarray,  # float32[cap]
    codes: np.ndarray,  # int8[slots, D] quantised vectors (base.quantize_rows), by slot
    scale: np.ndarray,  # float32[slots] their scale
    bias: np.ndarray,  # float32[slots] the prior by slot (read next to the codes, not by random row)
    q: np.ndarray,  # float32[D] query, facets concatenated
    log_gates: np.ndarray,  # float32[F] the user's facet gates (query_model.combine)
    tau: np.float32,  # temperature of the facet mixture (float32: the kernel is compiled for it)
    rows: np.ndarray,  # int64[n] candidate rows, in source order, may repeat
    slots: np.ndarray,  # int64[n] each candidate's slot in ``codes``
    exclude: np.ndarray,  # int64[e] rows never returned, sorted ascending
    k: int,
    shortlist: int,  # >= k: distinct candidates kept by the approximate pass and rescored exactly
    out_pos: np.ndarray,  # int64[k] out: positions in ``rows`` of the answer, best first
    out_score: np.ndarray,  # float32[k] out: their exact scores
    seen: np.ndarray,  # uint8[cap] scratch, all 0 on entry and again on return (:func:`seen_scratch`)
) -> int:
    """Top-k distinct, non-excluded candidates by ``combine(facet dots) + prior[row]``; returns how many.

    With one facet the score is ``vectors[row] . q + prior[row]``; with F it is the mixture of
    softmaxes ``tau * log sum_f exp(q_f . e_f / tau + log_gates[f]) + prior`` (see
    :func:`mfli.retrieval.query_model.combine`), each facet's dot summed separately.

    Pass 1 scores every distinct candidate once, on its int8 codes (prefetched ahead; sequential when the
    slots of a cluster's members are consecutive), and keeps the ``shortlist`` best: a repeat (an item in
    the probed clusters of two members, or trending too; ~40 % of an ensemble's candidates on the learned
    100k workload) has its first occurrence's score, and the first occurrence wins ties, so skipping it
    changes nothing but the work;
    pass 2 rescores those exactly in float32 and sorts them (ties: earliest candidate). The int8 score
    is off by ~1e-2 at most, so the shortlist holds the exact top k unless scores tie within that.
    """
    n, dim = rows.shape[0], q.shape[0]
    # The query as int16 too: int8 x int16 products summed in int32 compile to vpmaddwd, ~2x the float
    # conversion path. |sum| <= dim * 127 * 32767 < 2^31 for dim <= 516.
    q_max = np.float32(0.0)
    for j in range(dim):
        q_max = max(q_max, abs(q[j]))
    q_scale = q_max / np.float32(32767.0) if q_max > 0 else np.float32(1.0)
    q16 = np.empty(dim, np.int16)
    for j in range(dim):
        q16[j] = np.int16(np.rint(q[j] / q_scale))
    n_facets = log_gates.shape[0]
    fdim = dim // n_facets
    facet_dot = np.empty(n_facets, np.float32)
    inv_tau = np.float32(1.0) / np.float32(tau)
    sl_pos = np.empty(shortlist, np.int64)
    sl_score = np.empty(shortlist, np.float32)
    filled = 0
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            ahead = slots[i + PREFETCH_AHEAD]
            for j in range(0, dim, 64):
                _prefetch(codes, ahead, j)  # type: ignore[call-arg]  # numba supplies typingctx
        r, slot = rows[i], slots[i]
        if seen[r]:
            continue
        seen[r] = 1
        c = codes[slot]
        if n_facets == 1:
            acc = np.int32(0)
            for j in range(dim):
                acc += np.int32(c[j]) * np.int32(q16[j])
            s = np.float32(np.int32(acc)) * (scale[slot] * q_scale) + bias[slot]  # int32: lets LLVM narrow the sum
        else:
            for f in range(n_facets):
                acc = np.int32(0)
                for j in range(f * fdim, (f + 1) * fdim):
                    acc += np.int32(c[j]) * np.int32(q16[j])
                facet_dot[f] = np.float32(np.int32(acc)) * (scale[slot] * q_scale)
            s = _mixture(facet_dot, log_gates, inv_tau, tau) + bias[slot]
        if filled < shortlist or s > sl_score[shortlist - 1]:  # the common case never makes the call
            filled = _offer(r, i, s, exclude, sl_pos, sl_score, filled)
    for i in range(n):
        seen[rows[i]] = 0
    exact = np.empty(filled, np.float32)
    for t in range(filled):
        r = rows[sl_pos[t]]
        v = vectors[r]
        if n_facets == 1:
            s = prior[r]
            for j in range(dim):
                s += v[j] * q[j]
        else:
            for f in range(n_facets):
                acc_f = np.float32(0.0)
                for j in range(f * fdim, (f + 1) * fdim):
                    acc_f += v[j] * q[j]
                facet_dot[f] = acc_f
            s = _mixture(facet_dot, log_gates, inv_tau, tau) + prior[r]
        exact[t] = s
    m = 0
    for t in range(filled):  # insertion by (-exact, position): the shortlist is small
        s, p = exact[t], sl_pos[t]
        at = m if m < k else k - 1
        if m == k and (s < out_score[k - 1] or (s == out_score[k - 1] and p > out_pos[k - 1])):
            continue
        while at > 0 and (out_score[at - 1] < s or (out_score[at - 1] == s and out_pos[at - 1] > p)):
            out_pos[at] = out_pos[at - 1]
            out_score[at] = out_score[at - 1]
            at -= 1
        out_pos[at] = p
        out_score[at] = s
        if m < k:
            m += 1
    return m


@njit(cache=True, nogil=True)
def top_voted_clusters(assigned: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The trigger histogram (docs/design.md §Serving): ``assigned`` is int64[h, F], each trigger's cluster per facet
    (-1: not indexed). Returns (facets, clusters) of the ``k`` (facet, cluster) pairs with the most
    votes, most votes first, ties by ascending ``cluster * F + facet`` (as ``np.lexsort`` would)."""
    h, n_facets = assigned.shape
    keys = np.empty(h * n_facets, np.int64)
    n = 0
    for i in range(h):
        for f in range(n_facets):
            c = assigned[i, f]
            if c >= 0:
                keys[n] = c * n_facets + f
                n += 1
    keys = np.sort(keys[:n])
    uniq = np.empty(n, np.int64)
    neg_counts = np.empty(n, np.int64)
    u = 0
    for i in range(n):
        if u > 0 and keys[i] == uniq[u - 1]:
            neg_counts[u - 1] -= 1
        else:
            uniq[u] = keys[i]
            neg_counts[u] = -1
            u += 1
    order = np.argsort(neg_counts[:u], kind="mergesort")[: min(k, u)]  # stable: ties stay by key
    picked = uniq[order]
    return picked % n_facets, picked // n_facets


@njit(cache=True, nogil=True)
def _best(values: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` largest values, best first, ties by lower index (insertion into a small
    buffer: ``keep`` is a beam width, far below ``values.size``)."""
    idx = np.empty(keep, np.int64)
    best = np.empty(keep, values.dtype)
    filled = 0
    for i in range(values.shape[0]):
        v = values[i]
        if filled == keep and v <= best[keep - 1]:
            continue
        filled = _insert(idx, best, filled, i, v)
    return idx[:filled]


@njit(cache=True, nogil=True)
def beam_paths(word_scores: np.ndarray, beam: int, width: int) -> np.ndarray:
    """Beam search down every facet's residual codebook. ``word_scores`` is float32[F, L, M], the query's
    score against each codeword; a path scores the sum over its levels. Keeps ``beam`` partial paths
    per level and ``width`` at the last; returns int64[F, width, L] codes (-1 rows when fewer exist)."""
    n_facets, levels, m = word_scores.shape
    out = np.full((n_facets, width, levels), -1, np.int64)
    for f in range(n_facets):
        paths = np.zeros((1, levels), np.int64)
        scores = np.zeros(1, np.float32)
        for level in range(levels):
            nb = paths.shape[0]
            cand = np.empty(nb * m, np.float32)
            for b in range(nb):
                for w in range(m):
                    cand[b * m + w] = scores[b] + word_scores[f, level, w]
            order = _best(cand, min(beam if level < levels - 1 else width, nb * m))
            new_paths = np.empty((order.shape[0], levels), np.int64)
            new_scores = np.empty(order.shape[0], np.float32)
            for i in range(order.shape[0]):
                o = order[i]
                new_paths[i] = paths[o // m]
                new_paths[i, level] = o % m
                new_scores[i] = cand[o]
            paths, scores = new_paths, new_scores
        out[f, : paths.shape[0]] = paths
    return out


@njit(cache=True, nogil=True)
def unique_pairs(facets: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(facet, cluster) pairs without repeats or negative clusters, first occurrence order kept."""
    n = facets.shape[0]
    keep = np.zeros(n, np.bool_)
    for i in range(n):
        if clusters[i] < 0:
            continue
        seen = False
        for j in range(i):
            if keep[j] and facets[j] == facets[i] and clusters[j] == clusters[i]:
                seen = True
                break
        keep[i] = not seen
    return facets[keep], clusters[keep]




@njit(cache=True, nogil=True)
def lookup_paths(sorted_keys: np.ndarray, ptr: np.ndarray, ids: np.ndarray, paths: np.ndarray,
                 path_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Clusters of int64 code paths ``[F, p, L]`` (rows starting with -1 are padding) in a CSR keyed by
    ``facet << FACET_SHIFT | path key``: (facets, clusters) of every path found, concatenated."""
    n_facets, width, levels = paths.shape
    starts = np.empty(n_facets * width, np.int64)
    counts = np.zeros(n_facets * width, np.int64)
    which = np.empty(n_facets * width, np.int64)
    m = 0
    for f in range(n_facets):
        for i in range(width):
            if paths[f, i, 0] < 0:
                continue
            key = np.int64(0)
            for level in range(levels):
                key = (key << path_bits) | paths[f, i, level]
            key |= np.int64(f) << FACET_SHIFT
            j = np.searchsorted(sorted_keys, key)
            if j < sorted_keys.shape[0] and sorted_keys[j] == key:
                starts[m], counts[m], which[m] = ptr[j], ptr[j + 1] - ptr[j], f
                m += 1
    total = counts[:m].sum()
    facets = np.empty(total, np.int64)
    clusters = np.empty(total, np.int64)
    at = 0
    for i in range(m):
        for t in range(counts[i]):
            facets[at] = which[i]
            clusters[at] = ids[starts[i] + t]
            at += 1
    return facets, clusters


@njit(cache=True, nogil=True)
def gather_members(rows_by_slot: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posting-list slots ``starts[i] .. starts[i] + counts[i] - 1`` for every i and their rows."""
    total = counts.sum()
    slots = np.empty(total, np.int64)
    rows = np.empty(total, np.int64)
    at = 0
    for i in range(starts.shape[0]):
        for j in range(counts[i]):
            slots[at] = starts[i] + j
            rows[at] = rows_by_slot[starts[i] + j]
            at += 1
    return rows, slots


@njit(cache=True, nogil=True, fastmath=True)
def pool_rows(vectors: np.ndarray, rows: np.ndarray, decay: float, facets: int) -> np.ndarray:
    """:func:`mfli.retrieval.base.pool_query` reading ``rows`` of float32[cap, F * d] in place:
    recency-weighted mean (newest weight 1, then ``decay``, ...), L2-normalised per facet."""
    dim = vectors.shape[1]
    out = np.zeros(dim, np.float32)
    w = np.float32(1.0)
    for i in range(rows.shape[0] - 1, -1, -1):
        v = vectors[rows[i]]
        for j in range(dim):
            out[j] += w * v[j]
        w *= np.float32(decay)
    d = dim // facets
    for f in range(facets):
        norm = np.float32(0.0)
        for j in range(f * d, (f + 1) * d):
            norm += out[j] * out[j]
        norm = max(np.sqrt(norm), np.float32(1e-12))
        for j in range(f * d, (f + 1) * d):
            out[j] /= norm
    return out.reshape(facets, d)


@njit(cache=True, nogil=True)
def assemble_members(ivf_rows: np.ndarray, firsts: np.ndarray, sizes: np.ndarray, from_lmdb: np.ndarray,
                     read: np.ndarray, row_slot: int) -> tuple[np.ndarray, np.ndarray]:
    """Members of posting lists in request order, and their code slots: list ``i`` is ``sizes[i]`` rows
    from the mirror's cluster-ordered copy at ``firsts[i]`` (slots = those positions), or, where
    ``from_lmdb[i]``, the next ``sizes[i]`` rows of ``read`` (slots = each row's own, ``row_slot + row``)."""
    total = sizes.sum()
    rows = np.empty(total, np.int64)
    slots = np.empty(total, np.int64)
    at, taken = 0, 0
    for i in range(sizes.shape[0]):
        n = sizes[i]
        if from_lmdb[i]:
            for j in range(n):
                r = read[taken + j]
                rows[at + j] = r
                slots[at + j] = row_slot + r
            taken += n
        else:
            first = firsts[i]
            for j in range(n):
                rows[at + j] = ivf_rows[first + j]
                slots[at + j] = first + j
        at += n
    return rows, slots
