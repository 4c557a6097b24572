"""The learner's query function in numpy, and how facet scores combine: what the server runs.

The learner trains :class:`mfli.learner.encoder.QueryEncoder` (torch) and publishes its weights with
a version; the server must answer with *exactly* that function (no train/serve skew) without
importing torch, so this module runs the forward pass for one window at a time (compiled, in
:mod:`mfli.retrieval.encoder_kernel`). A parity test
(``tests/test_query_model.py``) holds the two equal to 1e-5 on the same weights and history.

Facets combine as a mixture of softmaxes: ``score = tau * log sum_f g_f exp(q_f . e_f / tau)``, with
per-user gates ``g`` from the encoder. It is non-linear in the item (a facet counts only where it is
the user's strongest reason), reduces to ``q . e`` for one facet, and is the very logit the learner's
softmax is trained on, so training and serving rank identically.

An ensemble (``model.members`` = K, :mod:`mfli.learner.ensemble`) is K independently trained encoders,
each reading its own facet of the history's vectors and giving that facet's query; the weights of
member j are named ``m{j}.<parameter>`` and the gates are uniform over members. Its members' scores pool
linearly by default (``pooling="linear"``: the gate-weighted mean, i.e. the mixture's limit as tau -> inf;
``combine`` takes ``tau = inf`` for it): members are not alternative reasons for an item, as one model's
facets are, but noisy estimates of the same score. Averaging them measured level with the mixture for
seed-only members and ahead of it for members that differ in a setting (README, "Answer quality"), and
the compiled rerank runs it as one dot per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

GAP_BUCKETS = 32  # log2-second buckets of the gap between a history item and the newest one


def gap_buckets(ts_ms: np.ndarray) -> np.ndarray:
    """Bucket ``floor(log2(1 + seconds before the newest event))``, capped, for event times oldest first
    along the last axis (``[h]`` or ``[n, h]``)."""
    if ts_ms.size == 0:
        return np.zeros(ts_ms.shape, np.int64)
    gap_s = np.maximum(ts_ms[..., -1:] - ts_ms, 0) / 1000.0
    # floor(log2(y)) for y >= 1 is frexp's exponent minus one: exact, where a rounded log2 just below a
    # power of two could land in the next bucket (the compiled forward computes it the same way)
    return np.minimum(np.frexp(1.0 + gap_s)[1] - 1, GAP_BUCKETS - 1).astype(np.int64)


def combine(facet_scores: np.ndarray, log_gates: np.ndarray, tau: float) -> np.ndarray:
    """``tau * logsumexp_f(s_f / tau + log g_f)`` over the last axis of ``[..., F]`` scores.

    ``tau = inf`` is that mixture's limit, the linear pool ``sum_f g_f s_f`` (gates sum to one): how an
    ensemble's members combine (:attr:`QueryModel.score_tau`)."""
    if math.isinf(tau):
        return (facet_scores * np.exp(log_gates)).sum(axis=-1)
    if facet_scores.shape[-1] == 1:
        return facet_scores[..., 0] + tau * log_gates[..., 0]
    z = facet_scores / tau + log_gates
    m = z.max(axis=-1, keepdims=True)
    return tau * (m[..., 0] + np.log(np.exp(z - m).sum(axis=-1)))


@dataclass(frozen=True)
class QueryModel:
    """A published version of the query encoder: weights by parameter name, plus its shape."""

    version: int
    weights: dict[str, np.ndarray]
    facets: int
    dim: int
    heads: int
    tau: float
    members: int = 1  # K encoders, member j reads and answers facets [j F/K, (j + 1) F/K)
    pooling: Literal["mixture", "linear"] = "mixture"  # how facet scores combine (an ensemble's: linear)

    @property
    def score_tau(self) -> float:
        """The ``tau`` :func:`combine` pools this model's facet scores with: inf for the linear pool."""
        return math.inf if self.pooling == "linear" else self.tau

    @classmethod
    def random(cls, facets: int, dim: int, horizon: int, heads: int = 2, tau: float = 0.05, seed: int = 0
               ) -> QueryModel:
        """An encoder of this shape with random weights (warm-up and cost benchmarks: no torch needed)."""
        rng = np.random.default_rng(seed)
        shapes = {"inp": (dim, facets * dim), "wq": (dim, dim), "wk": (dim, dim), "wv": (dim, dim), "wo": (dim, dim),
                  "ff1": (2 * dim, dim), "ff2": (dim, 2 * dim), "out": (facets * dim, dim), "gate": (facets, dim)}
        w = {f"{n}.weight": rng.normal(0, shape[1] ** -0.5, shape) for n, shape in shapes.items()}
        w |= {f"{n}.bias": np.zeros(shape[0]) for n, shape in shapes.items()}
        w |= {f"{n}.{p}": np.full(dim, 1.0 if p == "weight" else 0.0) for n in ("ln_in", "ln_ff", "ln_out")
              for p in ("weight", "bias")}
        w |= {"pos_k": rng.normal(0, 0.02, (horizon, dim)), "pos_v": rng.normal(0, 0.02, (horizon, dim)),
              "gap_k": rng.normal(0, 0.02, (GAP_BUCKETS, dim))}
        return cls(version=0, weights={k: v.astype(np.float32) for k, v in w.items()}, facets=facets, dim=dim,
                   heads=heads, tau=tau)

    @classmethod
    def ensemble(cls, parts: list[QueryModel], version: int,
                 pooling: Literal["mixture", "linear"] = "linear") -> QueryModel:
        """One model of K single-member ones (their facets side by side, gates uniform over members)."""
        if len({(p.dim, p.heads, p.tau, p.facets, p.members) for p in parts}) != 1 or parts[0].members != 1:
            raise ValueError("ensemble members must be single models of one shape")
        weights = {f"m{j}.{name}": w for j, p in enumerate(parts) for name, w in p.weights.items()}
        if any(not p.weights for p in parts):
            weights = {}  # mean pooling: nothing to run
        p0 = parts[0]
        return cls(version=version, weights=weights, facets=p0.facets * len(parts), dim=p0.dim, heads=p0.heads,
                   tau=p0.tau, members=len(parts), pooling=pooling)

    def member_weights(self, j: int) -> dict[str, np.ndarray]:
        if self.members == 1:
            return self.weights
        prefix = f"m{j}."
        return {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}

    @cached_property
    def horizon(self) -> int:
        # cached: an ensemble's member_weights scans every weight name (measured ~70 us a request)
        return int(self._member_w[0]["pos_k"].shape[0])

    @cached_property
    def _fast(self) -> list[dict[str, np.ndarray]]:
        """Per member, weights laid out for the per-request forward: transposed, contiguous, the key and value
        projections split by head, for the compiled forward (:mod:`mfli.retrieval.encoder_kernel`)."""
        return [self._fast_of(w, self.heads) for w in self._member_w]

    @cached_property
    def _member_w(self) -> list[dict[str, np.ndarray]]:
        return [self.member_weights(j) for j in range(self.members)]

    @staticmethod
    def _fast_of(w: dict[str, np.ndarray], heads: int) -> dict[str, np.ndarray]:
        t = {name[: -len(".weight")]: np.ascontiguousarray(w[name].T) for name in w if name.endswith(".weight")
             and w[name].ndim == 2}
        return {
            "inp": t["inp"], "inp_b": w["inp.bias"],
            # by head: the key projection's rows [heads, d_h, d], the value projection's columns [heads, d, d_h]
            "k_heads": np.ascontiguousarray(w["wk.weight"].reshape(heads, -1, w["wk.weight"].shape[1])),
            "v_heads": np.ascontiguousarray(t["wv"].reshape(t["wv"].shape[0], heads, -1).transpose(1, 0, 2)),
            "kv_b": np.concatenate([w["wk.bias"], w["wv.bias"]]), "wq": t["wq"], "wq_b": w["wq.bias"],
            "wo": t["wo"], "wo_b": w["wo.bias"], "ff1": t["ff1"], "ff1_b": w["ff1.bias"], "ff2": t["ff2"],
            "ff2_b": w["ff2.bias"], "out": t["out"], "out_b": w["out.bias"],
            "gate": t["gate"], "gate_b": w["gate.bias"],
            # by window slot: slot H - 1 is the newest item (distance 0)
            "pos_k": np.ascontiguousarray(w["pos_k"][::-1]), "pos_v": np.ascontiguousarray(w["pos_v"][::-1]),
        }

    @cached_property
    def _stacked(self) -> tuple[np.ndarray, ...]:
        """The forward's parameters stacked over members (leading axis K), named and ordered by
        :data:`~mfli.retrieval.encoder_kernel.PARAMS`."""
        from mfli.retrieval.encoder_kernel import PARAMS

        return tuple(np.ascontiguousarray(np.stack([f[n] if n in f else w[n] for f, w in zip(
            self._fast, self._member_w, strict=True)]), np.float32) for n in PARAMS)

    @cached_property
    def _input_layer(self) -> tuple[np.ndarray, ...]:
        """Per member the input projection ``[w, d]`` and, stacked ``[K, d]``, its bias and LayerNorm."""
        return (np.stack([f["inp"] for f in self._fast]),
                *(np.ascontiguousarray(np.stack(v), np.float32) for v in (
                    [f["inp_b"] for f in self._fast], [w["ln_in.weight"] for w in self._member_w],
                    [w["ln_in.bias"] for w in self._member_w])))

    @property
    def input_width(self) -> int:
        """Width of one member's context vector (a shared-input model reads its facet's item vector)."""
        return int(self._fast[0]["inp"].shape[0])

    @property
    def encoder_dim(self) -> int:
        return int(self._fast[0]["inp"].shape[1])

    def inputs(self, context: np.ndarray) -> np.ndarray:
        """Normalised encoder inputs ``float32[K, n, d]`` (``LN_j(c W_inp_j + b_j)`` per member j) of context
        rows ``[n, K * input_width]``: per item, so :mod:`mfli.retrieval.inputs` caches them."""
        from mfli.retrieval.encoder_kernel import normalise_inputs

        inp, inp_b, ln_w, ln_b = self._input_layer
        n, width = context.shape[0], self.input_width
        x = np.empty((self.members, n, self.encoder_dim), np.float32)
        for j in range(self.members):  # one BLAS product a member (the bulk of the forward's multiply-adds)
            np.matmul(context[:, j * width:(j + 1) * width], inp[j], out=x[j])
        normalise_inputs(x, inp_b, ln_w, ln_b)
        return x

    def query(self, context: np.ndarray, ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries ``float32[F, d]`` and log gates ``float32[F]`` for one history window.

        ``context``: ``[h, input_dim]`` context vectors of the history items, oldest first (the last H
        are used); ``ts_ms``: their event times. Shared-input models take the items' facet vectors
        flattened, ``[h, F * d]``.
        """
        h = self.horizon
        context = np.ascontiguousarray(context[-h:], dtype=np.float32)
        if context.shape[0] == 0:
            raise ValueError("a query needs at least one history item")
        return self.query_inputs(self.inputs(context), ts_ms)

    def query_inputs(self, x: np.ndarray, ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`query` from the window's normalised inputs ``[K, n, d]`` (:meth:`inputs`, or cached)."""
        from mfli.retrieval.encoder_kernel import ensemble_forward

        h = self.horizon
        x = x[:, -h:]
        if x.shape[1] == 0:
            raise ValueError("a query needs at least one history item")
        ts = np.ascontiguousarray(np.asarray(ts_ms)[-h:], dtype=np.int64)
        return ensemble_forward(np.ascontiguousarray(x, np.float32), ts, h, self.heads, self.facets // self.members,
                                GAP_BUCKETS, self._stacked)
