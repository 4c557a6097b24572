"""Residual-quantisation codebooks per facet, with the defences against collapse (docs/design.md §Model).

* **Delayed start**: no codes until the learner has seen ``warmup_events``; then level 0 is initialised
  by k-means on the warmed-up item embeddings, and each finer level later (coarse before fine) by
  k-means on the residuals left by the levels above it.
* **Over-use penalty**: assignment minimises ``||r - c||^2 + penalty * scale * max(0, share_c * M - 1)``,
  where ``share_c`` is the share of live items on codeword c at the last usage count and ``scale`` the
  batch's mean best distance (so the penalty is in the units of the level it acts on).
* **Dead-code reset**: a codeword with no live item for ``dead_window`` consecutive usage counts is
  moved onto a random recent residual of its level, drawn from the members of the most crowded
  codeword (so a reset also splits the codeword that is absorbing the level).
* **How M is chosen in a stream**: the catalogue size is unknown in advance, so M is fixed at the
  delayed start from the live items then (``M^L ~ items/32``, at least 8), and doubled whenever the
  live items outgrow ``4 * 32 * M^L``; new codewords start on recent residuals like reset ones.

Codewords are trained by gradient through the quantised loss (the learner owns that step); this module
holds the parameters, encodes and keeps the usage statistics that are exported as gauges.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def auto_codewords(n_items: int, levels: int) -> int:
    """M with ``M^L ~ n_items / 32``, at least 8."""
    return max(8, math.ceil((max(n_items, 1) / 32.0) ** (1.0 / levels)))


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means with seeded random-point init; empty clusters re-seeded to random points."""
    n = x.shape[0]
    if n == 0:
        return torch.randn(k, x.shape[1], generator=gen) * 0.01
    cent = x[torch.randint(0, n, (k,), generator=gen)].clone()
    if n >= k:
        cent = x[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(dim=1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        cent = sums / counts.clamp(min=1).unsqueeze(1)
        if empty.any():
            cent[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=gen)]
    return cent


class ResidualQuantizer:
    """Codebooks ``float32[F, L, M, d]`` plus usage statistics."""

    def __init__(self, facets: int, levels: int, dim: int, codewords: int, overuse_penalty: float,
                 dead_window: int) -> None:
        self.facets, self.levels, self.dim = facets, levels, dim
        self.fixed_m = codewords  # 0 = auto
        self.overuse_penalty = overuse_penalty
        self.dead_window = dead_window
        self.m = max(codewords, 8)
        self.codebooks = torch.zeros(facets, levels, self.m, dim)
        self.adagrad = torch.zeros_like(self.codebooks)
        self.active = 0  # levels initialised so far (0 = before the delayed start)
        self.version = 0
        self.share = torch.zeros(facets, levels, self.m)
        self.idle = torch.zeros(facets, levels, self.m, dtype=torch.int64)
        self.utilisation = np.zeros((facets, levels))
        self.perplexity = np.zeros((facets, levels))
        self.resets = np.zeros((facets, levels), dtype=np.int64)

    # --- encoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, e: torch.Tensor, penalise: bool = True) -> torch.Tensor:
        """Greedy residual codes int64[n, F, L] for embeddings ``[n, F, d]`` (inactive levels = 0)."""
        n = e.shape[0]
        codes = torch.zeros(n, self.facets, self.levels, dtype=torch.int64)
        if self.active == 0 or n == 0:
            return codes
        resid = e.detach().clone()
        for level in range(self.active):
            cb = self.codebooks[:, level]  # [F, M, d]
            d2 = (resid.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("nfd,fmd->nfm", resid, cb)
                  + cb.pow(2).sum(-1).unsqueeze(0))
            if penalise and self.overuse_penalty > 0:
                scale = d2.min(dim=2).values.mean(dim=0).clamp(min=1e-6)  # [F]
                excess = (self.share[:, level] * self.m - 1.0).clamp(min=0)  # [F, M]
                d2 = d2 + self.overuse_penalty * scale[None, :, None] * excess[None]
            idx = d2.argmin(dim=2)  # [n, F]
            codes[:, :, level] = idx
            resid -= torch.gather(cb.unsqueeze(0).expand(n, -1, -1, -1), 2,
                                  idx[:, :, None, None].expand(-1, -1, 1, self.dim)).squeeze(2)
        return codes

    def reconstruct(self, codes: torch.Tensor, codebooks: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the active levels' codewords ``[n, F, d]`` (differentiable in ``codebooks``)."""
        cb = self.codebooks if codebooks is None else codebooks
        out = 0
        f_idx = torch.arange(self.facets)[None, :]
        for level in range(self.active):
            out = out + cb[f_idx, level, codes[:, :, level]]
        return out

    @torch.no_grad()
    def residuals(self, e: torch.Tensor, codes: torch.Tensor, level: int) -> torch.Tensor:
        """What is left of ``e`` after levels ``< level``: ``[n, F, d]``."""
        out = e.detach().clone()
        f_idx = torch.arange(self.facets)[None, :]
        for lv in range(level):
            out -= self.codebooks[f_idx, lv, codes[:, :, lv]]
        return out

    # --- delayed start, growth, resets --------------------------------------------------------
    @torch.no_grad()
    def activate_next(self, e_live: torch.Tensor, gen: torch.Generator) -> None:
        """Initialise the next level by k-means on the current residuals of the live items."""
        level = self.active
        if level >= self.levels:
            return
        if level == 0 and self.fixed_m == 0:
            self._resize(auto_codewords(e_live.shape[0], self.levels))
        codes = self.encode(e_live, penalise=False)
        resid = self.residuals(e_live, codes, level)
        for f in range(self.facets):
            self.codebooks[f, level] = kmeans(resid[:, f], self.m, gen)
        self.adagrad[:, level] = 0
        self.active = level + 1
        self.version += 1

    def maybe_grow(self, n_live: int, recent: torch.Tensor, gen: torch.Generator) -> bool:
        """Double M when the live items outgrow it (auto mode only)."""
        if self.fixed_m or self.active == 0 or n_live <= 4 * 32 * self.m ** self.levels:
            return False
        old = self.m
        self._resize(old * 2)
        self._reseed(torch.arange(old, self.m), recent, gen, all_levels=True)
        self.version += 1
        return True

    def _resize(self, m: int) -> None:
        def pad(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(*t.shape[:2], m, *t.shape[3:], dtype=t.dtype)
            keep = min(m, t.shape[2])
            out[:, :, :keep] = t[:, :, :keep]
            return out
        self.codebooks, self.adagrad = pad(self.codebooks), pad(self.adagrad)
        self.share, self.idle = pad(self.share), pad(self.idle)
        self.m = m

    @torch.no_grad()
    def _reseed(self, which: torch.Tensor, recent: torch.Tensor, gen: torch.Generator,
                all_levels: bool = False, level: int | None = None, facet: int | None = None) -> None:
        """Move codewords onto random recent residuals (``recent``: embeddings ``[n, F, d]``)."""
        if recent.shape[0] == 0 or len(which) == 0:
            return
        codes = self.encode(recent, penalise=False)
        levels = range(self.active) if all_levels else [level]
        facets = range(self.facets) if facet is None else [facet]
        for lv in levels:
            resid = self.residuals(recent, codes, lv)
            for f in facets:
                # draw from the members of the most crowded codeword: a reset then also splits it
                crowded = torch.nonzero(codes[:, f, lv] == int(self.share[f, lv].argmax())).flatten()
                pool = crowded if len(crowded) >= 2 else torch.arange(recent.shape[0])
                pick = pool[torch.randint(0, len(pool), (len(which),), generator=gen)]
                self.codebooks[f, lv, which] = resid[pick, f]
                self.adagrad[f, lv, which] = 0
                self.idle[f, lv, which] = 0

    @torch.no_grad()
    def update_usage(self, live_codes: torch.Tensor, recent: torch.Tensor, gen: torch.Generator) -> int:
        """Recount usage over all live items; reset codewords idle for the window. Returns resets."""
        if self.active == 0 or live_codes.shape[0] == 0:
            return 0
        n_reset = 0
        for f in range(self.facets):
            for lv in range(self.active):
                counts = torch.bincount(live_codes[:, f, lv], minlength=self.m)[: self.m].double()
                p = counts / counts.sum()
                self.share[f, lv] = p.float()
                used = counts > 0
                self.utilisation[f, lv] = float(used.double().mean())
                nz = p[used]
                self.perplexity[f, lv] = float(torch.exp(-(nz * nz.log()).sum()))
                self.idle[f, lv] = torch.where(used, 0, self.idle[f, lv] + 1)
                dead = torch.nonzero(self.idle[f, lv] >= self.dead_window).flatten()
                if len(dead):
                    self._reseed(dead, recent, gen, level=lv, facet=f)
                    self.resets[f, lv] += len(dead)
                    n_reset += len(dead)
        if n_reset:
            self.version += 1
        return n_reset

    def dead_counts(self) -> np.ndarray:
        return (self.idle > 0).sum(dim=2).numpy()

    # --- checkpoint --------------------------------------------------------------------------------
    def state(self) -> dict:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else np.copy(v) if isinstance(v, np.ndarray) else v)
                for k, v in self.__dict__.items()}

    def load_state(self, state: dict) -> None:
        for k, v in state.items():
            copy = v.clone() if isinstance(v, torch.Tensor) else np.copy(v) if isinstance(v, np.ndarray) else v
            setattr(self, k, copy)
