"""The query tower: a causal attention encoder over a user's last H items, evaluated at one position.

Why this shape. A recency-weighted mean of the very vectors being retrieved cannot express order or
asymmetric transitions (A→B is not B→A) and lost 2× to an online Markov chain. A SASRec-style
encoder fixes that, but a full transformer pass over H items per event costs ~50 tokens of work per
event, far beyond a streaming learner's budget (measured: 2 blocks × 50 positions ran at ~600
events/s on this 2-core box). Only the newest position's output is ever needed, so this is one
attention block evaluated **at that position only**: keys and values are per-item projections plus
embeddings of the item's distance from the newest one and of its time gap, so an event costs a gather
and H dot products; the learner ran at ~10k events/s with it.

Inputs are *context* vectors of the window's items (``input_dim`` wide): the indexed facet vectors
concatenated (shared input, the default: the server already holds them) or a separate context table.
Outputs per event: one L2-normalised query per facet ``[F, d]`` and log gates ``[F]`` for the
mixture-of-softmaxes combination (:func:`mfli.retrieval.query_model.combine`).

:mod:`mfli.retrieval.query_model` is the numpy twin the server runs; a parity test holds them equal.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mfli.retrieval.query_model import GAP_BUCKETS, QueryModel, gap_buckets


class WindowAttention(torch.autograd.Function):
    """``att = softmax(r . x[idx] + bias)`` and ``xs = att @ x[idx]`` in one op with a hand-written backward.

    Why: both products read the same gathered window ``x[idx]`` (``[b, H, d]``, the encoder's largest
    tensor). Under autograd its gradient came from two batched products plus an add of two ``[b, H, d]``
    blocks and an accumulating ``index_put``; here it is one batched product (the two terms stacked
    along the heads axis) and one ``index_add_``. Measured on a 1,024-event step (H 50, d 96, 2 heads,
    3,883 rows, one thread): forward + backward of this block ~50 ms -> ~25 ms.

    x ``[u, d]`` item states; idx ``[b, H]`` rows (padding clamped to any row: its ``bias`` is -1e9, so
    its weight is 0 and so is its gradient); r ``[b, heads, d]`` the queries moved through the key
    projection; bias ``[b, heads, H]`` the position, gap and padding terms. Returns (att, xs).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor, r: torch.Tensor, bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        xg = x[idx]
        att = torch.baddbmm(bias, r, xg.transpose(1, 2)).softmax(dim=2)
        xs = torch.bmm(att, xg)
        ctx.save_for_backward(xg, idx, r, att)
        ctx.rows = x.shape[0]
        return att, xs

    @staticmethod
    def backward(ctx, g_att: torch.Tensor | None, g_xs: torch.Tensor | None):
        xg, idx, r, att = ctx.saved_tensors
        if g_xs is None:
            g_xs = torch.zeros_like(r)
        t = torch.bmm(g_xs, xg.transpose(1, 2))
        if g_att is not None:
            t = t + g_att
        d_logit = att * (t - (att * t).sum(2, keepdim=True))  # softmax backward
        d_r = torch.bmm(d_logit, xg)
        d_xg = torch.bmm(torch.cat([d_logit, att], 1).transpose(1, 2), torch.cat([r, g_xs], 1))  # [b, H, d]
        d_x = torch.zeros(ctx.rows, xg.shape[2], dtype=xg.dtype).index_add_(0, idx.reshape(-1),
                                                                             d_xg.reshape(-1, xg.shape[2]))
        return d_x, None, d_r, d_logit


class QueryEncoder(nn.Module):
    """Window of item context vectors → per-facet queries and log gates."""

    def __init__(self, input_dim: int, dim: int, facets: int, horizon: int, heads: int = 2,
                 dropout: float = 0.2, out_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.dim, self.facets, self.horizon, self.heads = dim, facets, horizon, heads
        self.out_dim = out_dim or dim  # the item vectors' width; ``dim`` is the encoder's own
        self.inp = nn.Linear(input_dim, dim)
        self.ln_in = nn.LayerNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        # distance 0 = the newest item; time-gap buckets are log2 seconds before the newest item
        self.pos_k = nn.Parameter(torch.randn(horizon, dim) * 0.02)
        self.pos_v = nn.Parameter(torch.randn(horizon, dim) * 0.02)
        self.gap_k = nn.Parameter(torch.randn(GAP_BUCKETS, dim) * 0.02)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.ln_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, facets * self.out_dim)
        self.gate = nn.Linear(dim, facets)
        self.dropout = dropout
        self.gen: torch.Generator | None = None  # the learner's, so dropout replays with the learner's state

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0:
            return x
        keep = torch.rand(x.shape, generator=self.gen) >= self.dropout
        return x * keep / (1.0 - self.dropout)

    def forward(self, ctx: torch.Tensor, window: torch.Tensor, gaps: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx ``[u, input_dim]`` context vectors; window ``[B, H]`` indices into ctx, newest last,
        -1 = padding (left); gaps ``[B, H]`` gap buckets. Returns (queries ``[B, F, d]``, log gates
        ``[B, F]``). Every row must hold at least its newest item."""
        b, h = window.shape
        x = self.ln_in(self.inp(ctx))
        pad = window < 0
        idx = window.clamp(min=0)
        dist = torch.arange(h - 1, -1, -1)
        q0 = x[idx[:, -1]]
        qh = self.wq(q0)
        # Keys and values are linear in an item's state x, so the window's states are gathered once
        # ([b, H, d], not keys and values [b, H, 2d]: half the gather and half its backward scatter) and
        # the projections move to the query side: q_h . (Wk_h x + bk_h) = (Wk_h^T q_h) . x + const (the
        # constant is the same at every position, so the softmax ignores it), and sum_j a_j (Wv_h x_j +
        # bv_h) = Wv_h (sum_j a_j x_j) + (sum_j a_j) bv_h. Position and gap terms are small [b, heads, H]
        # and [b, heads, G] products. Measured on the learner's step: the encoder's share fell by ~40 %.
        heads, d = self.heads, self.dim
        dh = d // heads
        qs = qh.view(b, heads, dh) * (1.0 / math.sqrt(dh))
        r = torch.einsum("bhk,hkd->bhd", qs, self.wk.weight.view(heads, dh, d))  # [b, heads, d]
        bias = torch.einsum("bhk,jhk->bhj", qs, self.pos_k[dist].view(h, heads, dh))
        by_gap = torch.einsum("bhk,ghk->bhg", qs, self.gap_k.view(-1, heads, dh))
        bias = (bias + torch.gather(by_gap, 2, gaps.unsqueeze(1).expand(b, heads, h))).masked_fill(
            pad.unsqueeze(1), -1e9)
        if self.training and self.dropout > 0:  # dropout on the weights: the plain autograd path
            xg = x[idx]  # [b, H, d]
            att = self.drop(torch.baddbmm(bias, r, xg.transpose(1, 2)).softmax(dim=2))  # [b, heads, H]
            xs = torch.bmm(att, xg)  # [b, heads, d]
        else:
            att, xs = WindowAttention.apply(x, idx, r, bias)
        o = torch.einsum("bhd,hkd->bhk", xs, self.wv.weight.view(heads, dh, d)) + \
            att.sum(2, keepdim=True) * self.wv.bias.view(heads, dh) + \
            torch.einsum("bhj,jhk->bhk", att, self.pos_v[dist].view(h, heads, dh))
        o = o.reshape(b, d)
        y = q0 + self.drop(self.wo(o))
        y = y + self.drop(self.ff2(F.gelu(self.ff1(self.ln_ff(y)), approximate="tanh")))
        y = self.ln_out(y)
        q = F.normalize(self.out(y).view(b, self.facets, self.out_dim), dim=2)
        return q, torch.log_softmax(self.gate(y), dim=1)

    def weights(self) -> dict[str, np.ndarray]:
        """float32 copies of every parameter, by name: what the server's numpy twin runs."""
        return {k: v.detach().numpy().astype(np.float32).copy() for k, v in self.state_dict().items()}



class QueryTower:
    """The learner's query side: the encoder (or the mean-pooling ablation) and its dense optimiser.

    ``queries`` takes the step's gathered, normalised item rows ``[u, F*d]`` and each event's window as
    indices into them, so the shared-input encoder reads exactly the vectors the index holds.
    """

    def __init__(self, settings, gen: torch.Generator) -> None:
        s = self.settings = settings
        with torch.random.fork_rng():  # initial weights depend on the seed only, not on global RNG use
            torch.manual_seed(s.seed)
            self.encoder = QueryEncoder(s.facets * s.dim, s.encoder_dim or s.dim, s.facets, s.history,
                                        s.encoder_heads, s.encoder_dropout, out_dim=s.dim)
        # the served encoder (``model.serving_average``): a moving average of the trained one's weights
        self.average = copy.deepcopy(self.encoder).eval() if s.serving_average > 0 and not self.mean else None
        if self.average is not None:
            self.average.requires_grad_(False)
        self.encoder.gen = gen
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=s.encoder_learning_rate)
        self._decay = torch.tensor(s.recency_decay) ** torch.arange(s.history - 1, -1, -1, dtype=torch.float32)

    @property
    def mean(self) -> bool:
        return self.settings.query_model == "mean"

    def queries(self, rows: torch.Tensor, window: torch.Tensor, gaps: torch.Tensor, train: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries ``[B, F, d]``, log gates ``[B, F]``) for windows of indices into ``rows`` with their
        time-gap buckets (:func:`~mfli.retrieval.query_model.gap_buckets`)."""
        s = self.settings
        if self.mean:
            w = self._decay[None, -window.shape[1]:] * (window >= 0)
            pooled = (rows[window.clamp(min=0)].view(*window.shape, s.facets, s.dim) * w[:, :, None, None]).sum(1)
            return F.normalize(pooled, dim=2), torch.full((window.shape[0], s.facets), -math.log(s.facets))
        self.encoder.train(train)
        return self.encoder(rows, window, gaps)

    @property
    def serving(self) -> QueryEncoder:
        """The encoder answers come from: the moving average when there is one."""
        return self.average if self.average is not None else self.encoder

    @torch.no_grad()
    def infer(self, context: Callable[[torch.Tensor], torch.Tensor], window: np.ndarray, window_ts: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """Queries of the :attr:`serving` encoder for windows of item rows (evaluation, snapshots, the
        users store); ``context`` maps item rows to their ``[u, F*d]`` context vectors."""
        uniq, inv = np.unique(window[window >= 0], return_inverse=True)
        idx = np.full(window.shape, -1, dtype=np.int64)
        idx[window >= 0] = inv
        rows, widx = context(torch.from_numpy(uniq)), torch.from_numpy(idx)
        gaps = torch.from_numpy(gap_buckets(window_ts))
        if self.mean:
            q, g = self.queries(rows, widx, gaps, train=False)
        else:
            enc = self.serving
            enc.train(False)
            q, g = enc(rows, widx, gaps)
        return q.numpy(), g.numpy()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.mean:
            return
        self.optimizer.step()
        if self.average is not None:
            w = 1.0 - self.settings.serving_average
            with torch.no_grad():
                for a, p in zip(self.average.parameters(), self.encoder.parameters(), strict=True):
                    a.lerp_(p, w)

    def query_model(self, version: int) -> QueryModel:
        s = self.settings
        return QueryModel(version=version, weights={} if self.mean else self.serving.weights(), facets=s.facets,
                          dim=s.dim, heads=s.encoder_heads, tau=s.temperature)

    def state(self) -> dict:
        out = {"encoder": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.average is not None:
            out["average"] = self.average.state_dict()
        return out

    def load_state(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.average is not None:  # without a saved average it starts from the trained weights
            self.average.load_state_dict(state.get("average") or self.encoder.state_dict())
