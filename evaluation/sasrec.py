"""SASRec (Kang & McAuley, ICDM 2018) as a frozen neural anchor, with the settings of our reference run.

Why it is here: SASRec is the standard self-attentive next-item model, so it tells a reader what a
well-tuned sequential model trained offline on the training period reaches on the same events. It is
trained once on the training period and then frozen; through the test period only the histories it
reads grow. Settings: pre-norm blocks, one head, d=64, dropout 0.2, learned positions, the item table
shared between input and output, H=50, full-softmax cross-entropy, Adam 2e-3, batch 128.

Item row ``r`` is token ``r + 1``; token 0 is padding (sequences are left-padded, so the latest event
always sits at the last position).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

log = logging.getLogger(__name__)


class SASRecSettings(BaseModel):
    """Hyper-parameters (defaults = our reference run)."""

    model_config = ConfigDict(extra="forbid")

    max_len: int = Field(50, ge=1, description="H: events of history read, and window length - 1")
    d: int = Field(64, ge=1)
    blocks: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    lr: float = Field(2e-3, gt=0.0)
    batch: int = Field(128, ge=1)
    epochs: int = Field(12, ge=1)
    patience: int = Field(3, ge=1, description="epochs without a better validation HR before stopping")
    val_k: int = Field(20, ge=1, description="K of the validation HR@K used for early stopping")
    score_batch: int = Field(512, ge=1)
    threads: int = Field(2, ge=1)
    seed: int = 0


class _Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, s: SASRecSettings) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(s.d)
        self.attn = nn.MultiheadAttention(s.d, s.heads, dropout=s.dropout, batch_first=True)
        self.drop = nn.Dropout(s.dropout)
        self.ln2 = nn.LayerNorm(s.d)
        self.ffn = nn.Sequential(nn.Linear(s.d, s.d), nn.ReLU(), nn.Dropout(s.dropout), nn.Linear(s.d, s.d),
                                 nn.Dropout(s.dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + self.drop(a)
        return x + self.ffn(self.ln2(x))


class SASRecModel(nn.Module):
    """Embeddings, causal pre-norm blocks and a final LayerNorm; logits against the shared item table."""

    def __init__(self, n_items: int, s: SASRecSettings) -> None:
        super().__init__()
        self.s = s
        self.item_emb = nn.Embedding(n_items + 1, s.d, padding_idx=0)
        self.pos_emb = nn.Embedding(s.max_len, s.d)
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(_Block(s) for _ in range(s.blocks))
        self.norm = nn.LayerNorm(s.d)
        # N(0, 1) embeddings make the shared-table logits ~d in scale (loss ~50 at start); xavier as in
        # the common PyTorch port of SASRec
        for emb in (self.item_emb, self.pos_emb):
            nn.init.xavier_normal_(emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, d) of left-padded token sequences (B, L), L <= max_len."""
        b, length = seq.shape
        keep = (seq > 0).unsqueeze(-1)
        x = self.item_emb(seq) * math.sqrt(self.s.d) + self.pos_emb.weight[self.s.max_len - length:]
        x = self.drop(x) * keep
        # a query may see itself and earlier non-padding keys; the diagonal is always allowed so a
        # padding query's row is never fully masked (NaN) - its output is zeroed by ``keep`` anyway
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu(1)
        mask = causal.unsqueeze(0) | (seq == 0).unsqueeze(1)
        mask &= ~torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = mask.repeat_interleave(self.s.heads, dim=0)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight[1:].T


def training_windows(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """Token windows of ``max_len + 1`` consecutive events, left-padded, one row per window.

    Longer sequences are cut from the end in steps of ``max_len``, so consecutive windows share one
    event and every transition of the training period is a target exactly once.
    """
    rows: list[np.ndarray] = []
    for seq in sequences:
        tokens = np.asarray(seq, dtype=np.int64) + 1
        end = tokens.size
        while end >= 2:
            start = max(0, end - max_len - 1)
            row = np.zeros(max_len + 1, dtype=np.int64)
            row[max_len + 1 - (end - start):] = tokens[start:end]
            rows.append(row)
            end -= max_len
    return np.stack(rows) if rows else np.zeros((0, max_len + 1), dtype=np.int64)


def _own_threads(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``method`` with the anchor's torch thread count and give the previous one back: the anchor
    trains best on every core, while the model beside it in the same run keeps ``learner.threads``."""

    @functools.wraps(method)
    def wrapper(self: SASRecAnchor, *args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(self.settings.threads)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


class SASRecAnchor:
    """Train SASRec on per-user training sequences, then score histories (frozen)."""

    def __init__(self, n_items: int, settings: SASRecSettings | None = None) -> None:
        self.n_items = int(n_items)
        self.settings = settings or SASRecSettings()
        torch.manual_seed(self.settings.seed)
        self.model = SASRecModel(self.n_items, self.settings)

    @_own_threads
    def fit(self, sequences: list[np.ndarray], epochs: int | None = None, log_every: int = 1,
            val: tuple[list[np.ndarray], np.ndarray] | None = None) -> dict:
        """Train on each user's training items in time order (rows < ``n_items``).

        ``val`` = (histories, target rows): after every epoch HR@``val_k`` is measured (history items
        excluded); training stops after ``patience`` epochs without improvement and the best epoch's
        weights are restored.
        """
        s = self.settings
        epochs = epochs or s.epochs
        for seq in sequences:
            if len(seq) and (int(np.max(seq)) >= self.n_items or int(np.min(seq)) < 0):
                raise ValueError(f"training items must be rows in [0, {self.n_items})")
        windows = torch.from_numpy(training_windows(sequences, s.max_len))
        if len(windows) == 0:
            raise ValueError("no user has two training events: nothing to learn")
        gen = torch.Generator().manual_seed(s.seed)
        opt = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        stats: dict = {"windows": len(windows), "transitions": int((windows[:, 1:] > 0).sum()),
                       "loss": [], "val_hr": [], "best_epoch": None}
        best, best_state, stale, t0 = -1.0, None, 0, time.perf_counter()
        for epoch in range(1, epochs + 1):
            self.model.train()
            total, count = 0.0, 0
            for idx in torch.randperm(len(windows), generator=gen).split(s.batch):
                w = windows[idx]
                tgt = w[:, 1:]
                h = self.model(w[:, :-1])
                on = tgt > 0
                loss = nn.functional.cross_entropy(self.model.logits(h[on]), tgt[on] - 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(on.sum())
                total += float(loss.detach()) * n
                count += n
            stats["loss"].append(total / count)
            msg = f"sasrec epoch {epoch}/{epochs}: loss {total / count:.4f}"
            if val is not None:
                hr = self.hit_rate(val[0], val[1], s.val_k)
                stats["val_hr"].append(hr)
                msg += f", val HR@{s.val_k} {hr:.4f}"
                if hr > best:
                    best, best_state, stale, stats["best_epoch"] = hr, copy.deepcopy(
                        self.model.state_dict()), 0, epoch
                else:
                    stale += 1
            if log_every and epoch % log_every == 0:
                log.info("%s (%.1fs)", msg, time.perf_counter() - t0)
            if val is not None and stale >= s.patience:
                log.info("sasrec early stop after epoch %d (best %d)", epoch, stats["best_epoch"])
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        stats["epochs_run"] = epoch
        stats["seconds"] = time.perf_counter() - t0
        return stats

    def _tokens(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Left-padded tokens of the last ``max_len`` known items (rows unknown at fit time dropped)."""
        h = self.settings.max_len
        out = np.zeros((len(histories), h), dtype=np.int64)
        for r, hist in enumerate(histories):
            hist = np.asarray(hist, dtype=np.int64)
            hist = hist[(hist >= 0) & (hist < self.n_items)][-h:]
            if hist.size:
                out[r, h - hist.size:] = hist + 1
        return torch.from_numpy(out)

    @_own_threads
    @torch.no_grad()
    def scores(self, histories: list[np.ndarray], n_items: int | None = None) -> np.ndarray:
        """float32 (len(histories), n_items) next-item scores; history = items before the event,
        most recent last. Rows >= the fit-time ``n_items`` score -inf; an empty history scores 0."""
        n_out = self.n_items if n_items is None else int(n_items)
        out = np.full((len(histories), n_out), -np.inf, dtype=np.float32)
        k = min(n_out, self.n_items)
        self.model.eval()
        for lo in range(0, len(histories), self.settings.score_batch):
            tokens = self._tokens(histories[lo:lo + self.settings.score_batch])
            logits = self.model.logits(self.model(tokens)[:, -1]).numpy()
            logits[(tokens[:, -1] == 0).numpy()] = 0.0
            out[lo:lo + len(tokens), :k] = logits[:, :k]
        return out

    def hit_rate(self, histories: list[np.ndarray], targets: np.ndarray, k: int) -> float:
        """HR@k of target rows among items not in the history (ties count for the target)."""
        targets = np.asarray(targets, dtype=np.int64)
        sc = self.scores(histories).astype(np.float64)
        for r, hist in enumerate(histories):
            hist = np.asarray(hist, dtype=np.int64)
            sc[r, hist[(hist >= 0) & (hist < self.n_items) & (hist != targets[r])]] = -np.inf
        known = (targets >= 0) & (targets < self.n_items)
        tscore = np.full(len(targets), np.inf)
        tscore[known] = sc[np.flatnonzero(known), targets[known]]
        rank = (sc > tscore[:, None]).sum(axis=1)
        return float(np.mean(known & (rank < k))) if len(targets) else 0.0
