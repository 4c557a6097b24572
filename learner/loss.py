"""Sampled softmax with in-batch negatives and log-Q correction (docs/design.md §Model).

Negatives are the positives of other events in the same micro-batch, so an item appears as a negative
in proportion to its frequency in the stream; subtracting ``log Q`` (its estimated sampling
probability) from every logit removes that popularity bias from the learned similarity (the prior adds
popularity back explicitly, with a tuned weight, at scoring time). The event's own item is always in
column 0; in-batch copies of it are masked so an item is never its own negative.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_MASKED = -1.0e4


def sampled_softmax(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_logq: torch.Tensor,
                    neg_bias: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-event, per-facet cross-entropy ``[n, F]``.

    q, pos: ``[n, F, d]`` (L2-normalised); neg: ``[k, F, d]``; pos_logq ``[n]``; neg_bias ``[n, k]`` is
    ``-log Q`` of each negative, and a huge negative where negative j is event i's own item (see
    :func:`negative_bias`). The bias rides in the ``baddbmm`` so the ``[F, n, k]`` logits are written once.
    """
    qs = q / temperature
    pos_logit = (qs * pos).sum(-1) - pos_logq[:, None]  # [n, F]
    neg_logit = torch.baddbmm(neg_bias.unsqueeze(0), qs.transpose(0, 1), neg.permute(1, 2, 0))  # [F, n, k]
    lse = torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, dim=2).t())
    return lse - pos_logit


def negative_bias(pos_rows: torch.Tensor, neg_rows: torch.Tensor, neg_logq: torch.Tensor) -> torch.Tensor:
    """``[n, k]``: ``-log Q`` of negative j, or a huge negative where it is event i's own item (no self-negatives)."""
    bias = (-neg_logq).expand(len(pos_rows), -1).clone()
    # a large finite value, not -inf: a row whose only negative is itself must not produce NaN gradients
    bias[pos_rows[:, None] == neg_rows[None, :]] = _MASKED
    return bias


def item_item_softmax(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch softmax pulling each anchor towards its own positive: per-pair, per-facet loss ``[n, F]``."""
    logits = torch.einsum("nfd,mfd->fnm", anchor, positive) / temperature
    target = torch.arange(anchor.shape[0]).expand(anchor.shape[1], -1)
    return F.cross_entropy(logits.reshape(-1, anchor.shape[0]), target.reshape(-1),
                           reduction="none").view(anchor.shape[1], -1).t()


def mixture_softmax(q: torch.Tensor, log_gates: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                    pos_logq: torch.Tensor, neg_bias: torch.Tensor, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the combined score and of each facet alone, on one set of logits.

    The combined logit of an item is ``logsumexp_f(q_f . e_f / tau + log g_f)`` (mixture of softmaxes,
    the score the server ranks by, :func:`mfli.retrieval.query_model.combine`); the per-facet losses
    ``[n, F]`` let each facet carry its own objective mixture. Returns (combined ``[n]``, per facet).
    """
    qs = q / temperature
    pos_f = (qs * pos).sum(-1)  # [n, F]
    if q.shape[1] == 1:  # one facet: the mixture is the facet (gate 0), one softmax does
        logit = pos_f[:, 0] - pos_logq
        ce = torch.logaddexp(logit, torch.logsumexp(torch.addmm(neg_bias, qs[:, 0], neg[:, 0].t()), dim=1)) - logit
        return ce, ce[:, None]
    neg_f = torch.bmm(qs.transpose(0, 1), neg.permute(1, 2, 0))  # [F, n, k]
    pos_c = torch.logsumexp(pos_f + log_gates, dim=1) - pos_logq
    neg_c = torch.logsumexp(neg_f + log_gates.t()[:, :, None], dim=0) + neg_bias  # [n, k]
    combined = torch.logaddexp(pos_c, torch.logsumexp(neg_c, dim=1)) - pos_c
    pos_1 = pos_f - pos_logq[:, None]
    neg_1 = torch.logsumexp(neg_f + neg_bias[None], dim=2).t()
    return combined, torch.logaddexp(pos_1, neg_1) - pos_1


def window_pairs(window: np.ndarray, first_event: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(event, item row) for every item in ``[n, h]`` -1-padded windows; events numbered from ``first_event``."""
    ev, j = np.nonzero(window >= 0)
    return ev.astype(np.int64) + first_event, window[ev, j]


def seen_pairs(ev: np.ndarray, rows: np.ndarray, target: np.ndarray, neg_rows: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(event i, negative column j) pairs where negative j is an item event i's user engaged with before
    (``(ev, rows)``: :func:`window_pairs`, or every kept item, ``learner/history.py``), and not the
    event's own item: the server never returns those (it excludes them), so training them as negatives
    would spend capacity on answers nobody sees. Handles repeated negatives."""
    keep = rows != target[ev]
    ev, rows = ev[keep], rows[keep]
    order = np.argsort(neg_rows, kind="stable")
    ordered = neg_rows[order]
    lo, hi = np.searchsorted(ordered, rows, "left"), np.searchsorted(ordered, rows, "right")
    cnt = hi - lo
    if not cnt.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    start = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
    return np.repeat(ev, cnt), order[start + np.arange(int(cnt.sum()))]


def seen_columns(ev: np.ndarray, rows: np.ndarray, target: np.ndarray, columns: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`seen_pairs` when the negatives are distinct and sorted (the full softmax's live rows): a
    seen item's column comes from a row -> column table, with no sort and no repeats to expand
    (measured: 24 ms -> a few ms for 4,096 events x 50 history items)."""
    keep = rows != target[ev]
    ev, rows = ev[keep], rows[keep]
    if not len(rows) or not len(columns):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    table = np.full(int(max(columns[-1], rows.max())) + 1, -1, dtype=np.int64)
    table[columns] = np.arange(len(columns))
    col = table[rows]
    hit = col >= 0
    return ev[hit].astype(np.int64), col[hit]


class MaskedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``qs @ items.T`` against ``target`` with (event, column) pairs left out, in one op.

    Why: on the learner's step the full softmax is the largest cost, and under autograd it wrote the
    ``[n, k]`` block five times beyond the product: the mask bias copied into ``addmm``'s output, the
    log-softmax output, a zero-filled gradient for the target pick, and the two softmax backward blocks.
    Here one ``[n, k]`` buffer holds the logits and becomes the softmax in place, and the backward writes
    one more block, the logits' gradient. Measured (forward + backward, 768 events x 3,883 items x d 96,
    one thread, 10 repeats): ~31 ms -> ~23 ms.

    Masked entries get ``-1e4`` (as :func:`negative_bias`): their probability is 0, so they get no
    gradient. ``qs`` ``[n, d]`` the tempered queries, ``items`` ``[k, d]``; returns the loss per event ``[n]``.
    ``smoothing`` = eps trains against ``(1 - eps) * one-hot + eps * uniform`` over the columns left in
    (``model.label_smoothing``): the uniform part needs only each row's logit sum and count, not a block.
    """

    @staticmethod
    def forward(ctx, qs: torch.Tensor, items: torch.Tensor, target: torch.Tensor, ev: torch.Tensor | None,
                col: torch.Tensor | None, bound: float | None = None, bf16: bool = False,
                smoothing: float = 0.0) -> torch.Tensor:
        if bf16:  # the three products in bfloat16 (float32 accumulation), everything else in float32
            qs_m, items_m = qs.bfloat16(), items.bfloat16()
            p = (qs_m @ items_m.t()).float()
            picked = (qs * items[target]).sum(1)  # the target's logit exactly
        else:
            qs_m, items_m = qs, items
            p = qs @ items.t()
            picked = p[torch.arange(len(qs)), target].clone()
        allowed = mean_logit = torch.empty(0)
        if smoothing:
            # the smoothed target is uniform over the columns left in: the sum of their logits is the row
            # sum with the left-out ones at 0, and their count follows from the row sum once those hold
            # _MASKED (a pair listed twice is still one column; the sum's rounding is far below |_MASKED|).
            # Two row sums and one more scatter: a sort to de-duplicate the pairs cost three times that
            if ev is not None:
                p[ev, col] = 0.0
            kept_sum = p.sum(1)
            allowed = torch.full_like(kept_sum, float(p.shape[1]))
            if ev is not None:
                p[ev, col] = _MASKED
                allowed -= ((p.sum(1) - kept_sum) / _MASKED).round()
            mean_logit = kept_sum / allowed
        elif ev is not None:
            p[ev, col] = _MASKED
        if bound is not None and bound <= 60.0:
            # |logit| <= bound (unit vectors over a temperature): exp cannot overflow float32, so the
            # row-max pass of a stable softmax is not needed (measured: a tenth of this op)
            top = torch.zeros(len(qs), 1, dtype=p.dtype)
            p.exp_()
        else:
            top = p.max(dim=1, keepdim=True).values
            p.sub_(top).exp_()
        total = p.sum(dim=1, keepdim=True)
        p.div_(total)
        none = torch.empty(0, dtype=torch.long)
        ctx.save_for_backward(qs_m, items_m, target, p, none if ev is None else ev, none if col is None else col,
                              allowed)
        ctx.smoothing = smoothing
        lse = (total.log() + top).squeeze(1)
        if not smoothing:
            return lse - picked
        return lse - (1.0 - smoothing) * picked - smoothing * mean_logit

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, items, target, p, ev, col, allowed = ctx.saved_tensors
        eps = ctx.smoothing
        d = p * grad[:, None]  # d ce / d logits = softmax - target (a new block: backward may run twice)
        d[torch.arange(len(qs)), target] -= (1.0 - eps) * grad
        if eps:  # the target's uniform share over the columns left in; left-out columns stay at 0
            d.sub_((eps * grad / allowed)[:, None])
            if len(ev):
                d[ev, col] = 0.0
        d16 = d.to(qs.dtype)  # bfloat16 when the forward ran its products in it; a no-op otherwise
        return (d16 @ items).to(d.dtype), (d16.t() @ qs).to(d.dtype), None, None, None, None, None, None


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float,
                           left_out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row cross-entropy of ``[n, k]`` logits against ``(1 - eps) * one-hot + eps * uniform`` over the
    columns not ``left_out`` (bool ``[n, k]``; those hold a huge negative logit already). Plain
    cross-entropy when ``smoothing`` is 0. The multi-facet path's twin of :class:`MaskedCrossEntropy`'s."""
    if not smoothing:
        return F.cross_entropy(logits, target, reduction="none")
    picked = logits.gather(1, target[:, None]).squeeze(1)
    mean_logit = logits.mean(1) if left_out is None else (logits * ~left_out).sum(1) / (~left_out).sum(1)
    return torch.logsumexp(logits, dim=1) - (1.0 - smoothing) * picked - smoothing * mean_logit


def full_softmax(q: torch.Tensor, log_gates: torch.Tensor, items: torch.Tensor, target: torch.Tensor,
                 temperature: float, masked: tuple[np.ndarray, np.ndarray] | None = None, bf16: bool = False,
                 smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mixture_softmax` when the negatives are the whole live catalogue: plain cross-entropy.

    ``items`` ``[k, F, d]`` holds every live item once and ``target`` ``[n]`` is each event's column in
    it. Nothing is sampled, so there is no log-Q and no self-mask to build: one facet goes through
    :class:`MaskedCrossEntropy`, several through torch's cross-entropy kernel. ``masked``: (event,
    column) pairs left out of the softmax (:func:`seen_pairs`); ``smoothing``: label smoothing over the
    columns left in. Returns (combined ``[n]``, per facet ``[n, F]``).
    """
    qs = q / temperature
    where = None if masked is None or not len(masked[0]) else \
        (torch.from_numpy(masked[0]), torch.from_numpy(masked[1]))
    if q.shape[1] == 1:
        ev, col = (None, None) if where is None else where
        # queries and items are unit vectors, so every logit lies within +-1/temperature
        ce = MaskedCrossEntropy.apply(qs[:, 0], items[:, 0], target, ev, col, 1.0 / temperature, bf16, smoothing)
        return ce, ce[:, None]
    f, n = q.shape[1], q.shape[0]
    neg_f = torch.bmm(qs.transpose(0, 1), items.permute(1, 2, 0))  # [F, n, k]
    left_out = None
    if where is not None:
        neg_f.index_put_((torch.arange(f).repeat_interleave(len(where[0])), where[0].repeat(f),
                          where[1].repeat(f)), torch.tensor(_MASKED, dtype=neg_f.dtype))
        if smoothing:
            left_out = torch.zeros(n, items.shape[0], dtype=torch.bool)
            left_out[where] = True
    combined = smoothed_cross_entropy(torch.logsumexp(neg_f + log_gates.t()[:, :, None], dim=0), target, smoothing,
                                      left_out)
    per = smoothed_cross_entropy(neg_f.reshape(f * n, -1), target.repeat(f), smoothing,
                                 None if left_out is None else left_out.repeat(f, 1)).view(f, n).t()
    return combined, per
