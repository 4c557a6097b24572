"""One training step of MFLILearner (kept apart so the API module stays readable).

Only the rows a batch touches are gathered (``torch.unique``), normalised, trained and written back:
the step's cost follows the batch, not the catalogue. The delayed start of the codebooks, coarse levels
before fine ones, usage statistics and dead-code resets are scheduled here, between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from mfli import metrics
from mfli.learner.loss import (
    full_softmax,
    item_item_softmax,
    mixture_softmax,
    negative_bias,
    seen_columns,
    seen_pairs,
    window_pairs,
)
from mfli.learner.state import LearnerState, StepStats
from mfli.retrieval.query_model import gap_buckets

_EPS = 1e-10
_MASKED_BIAS = -1.0e4  # as learner/loss.py masks self-negatives


@dataclass
class RowGrads:
    """What one step's backward left to apply: the gradient of the step's mean loss on the item rows it
    touched (``rows`` sorted, ``grad`` ``[u, F*d]``), the codewords' gradient (when RQ is active), the
    events the loss averaged over and the newest event time. The query encoder's gradients stay on its
    parameters (``.grad``). Kept apart from the update so that a data-parallel group can combine every
    rank's share before any rank applies it (learner/distributed.py)."""

    rows: np.ndarray
    grad: torch.Tensor
    codebook_grad: torch.Tensor | None
    events: int
    ts_max: int


class StepSync(Protocol):
    """How a data-parallel group turns one rank's :class:`RowGrads` into the group's (learner/distributed.py).

    ``exchange`` returns the combined rows and gradients (every rank gets the same ones, and the encoder's
    ``.grad`` are combined in place), or None when no rank trained anything this step. ``maintain`` runs the
    codebook upkeep once for the group and hands the result to every rank."""

    def exchange(self, local: RowGrads | None) -> RowGrads | None: ...

    def maintain(self, upkeep) -> None: ...


class Stepper:
    def __init__(self, learner: LearnerState) -> None:
        self.lr = learner
        #: None: a single learner; else the data-parallel group's exchange (learner/distributed.py)
        self.sync: StepSync | None = None
        self._resets_exported: np.ndarray | None = None
        #: whether this learner's events count in ``mfli_learner_events_total``: an ensemble's members all learn
        #: every event, so only rank 0's member counts them (the sum over ranks is the events learned, once)
        self.count_events = True
        #: added to facet labels: an ensemble member's facet in the served model is its rank
        self.facet_offset = 0

    def step(self, users: np.ndarray, items: np.ndarray, values: np.ndarray, ts: np.ndarray,
             group_items: np.ndarray | None = None) -> StepStats:
        """One step on this learner's events. ``group_items``: in a data-parallel group, the item rows of
        every rank's events (in rank order), which the stream-wide counts and the codebook upkeep follow."""
        L, s, cat, rq = self.lr, self.lr.settings, self.lr.items, self.lr.rq
        all_items = items if group_items is None else group_items
        stats = StepStats(events=len(items))
        sec = stats.seconds
        t = time.perf_counter()
        win, win_ts, _, seen = L.users.advance_windows(users, items, ts, with_seen=s.mask_seen_negatives)
        win, win_ts = L.users.keep_only(win, win_ts, cat.live[np.maximum(win, 0)])
        has = win[:, -1] >= 0
        L.freq.add(all_items)
        L.popularity.add(all_items)
        L.events_seen += len(all_items)
        sel = np.flatnonzero(has)
        stats.trained = len(sel)
        local: RowGrads | None = None
        if len(sel):
            tgt = items[sel]
            win, gaps = win[sel], gap_buckets(win_ts[sel])
            # what each event's softmax leaves out: every item its user engaged with before (kept ones), as
            # (event, item row) pairs numbered by position in ``sel``
            if seen is not None:
                at = np.full(len(users), -1, dtype=np.int64)
                at[sel] = np.arange(len(sel))
                mine = at[seen[0]] >= 0
                mask_ev, mask_rows = at[seen[0][mine]], seen[1][mine]
            else:  # mask_seen_negatives off: nothing is left out
                mask_ev = mask_rows = np.empty(0, np.int64)
            n_new = len(sel)
            positive = np.nan_to_num(values[sel], nan=-np.inf) >= s.positive_threshold
            if s.replay_ratio > 0 and len(L.replay):
                # recent examples learned again (learner/replay.py); sampled before this batch joins
                rw, rg, rt, rp = L.replay.sample(int(round(s.replay_ratio * len(sel))), L.rng)
                rw, rg = L.users.keep_only(rw, rg, cat.live[np.maximum(rw, 0)])
                ok = (rw[:, -1] >= 0) & cat.live[rt]
                L.replay.add(win, gaps, tgt, positive)
                win, gaps = np.concatenate([win, rw[ok]]), np.concatenate([gaps, rg[ok]])
                tgt, positive = np.concatenate([tgt, rt[ok]]), np.concatenate([positive, rp[ok]])
            else:
                L.replay.add(win, gaps, tgt, positive)
            if s.mask_seen_negatives and len(tgt) > n_new:  # replayed examples leave out their window
                rep_ev, rep_rows = window_pairs(win[n_new:], first_event=n_new)
                mask_ev, mask_rows = np.concatenate([mask_ev, rep_ev]), np.concatenate([mask_rows, rep_rows])
            # negatives: other events' items in the batch (a random subset when the batch is large) and a
            # uniform sample of the live catalogue shared by the batch
            live = cat.live_rows()
            full = len(live) <= max(s.uniform_negatives, s.full_softmax_items)
            if full:
                # the whole catalogue fits: a full softmax (no sampling, nothing to correct)
                uni, n_in = live, 0
            else:
                uni = live[L.rng.integers(0, len(live), s.uniform_negatives)] if s.uniform_negatives else \
                    np.empty(0, np.int64)
                n_in = min(len(tgt), s.negatives)
            neg_pos = np.arange(len(tgt)) if len(tgt) == n_in else \
                np.sort(L.rng.choice(len(tgt), n_in, replace=False))
            sem_facets = L.weights.get("semantic", torch.zeros(s.facets)) > 0
            sem_anchor_i, sem_mates = (np.empty(0, np.int64),) * 2
            if bool(sem_facets.any()):
                cand = np.arange(len(tgt)) if len(tgt) <= max(s.negatives, 1) else neg_pos
                which, sem_mates = cat.sample_tag_mates(tgt[cand], L.rng)
                sem_anchor_i = cand[which]
            in_window = win >= 0
            all_rows = np.concatenate([tgt, uni, win[in_window], sem_mates])
            uniq, inv = np.unique(all_rows, return_inverse=True)
            inv_t = torch.from_numpy(inv)
            n_t, n_u, n_h = len(tgt), len(uni), int(in_window.sum())
            widx = np.full(win.shape, -1, dtype=np.int64)
            widx[in_window] = inv[n_t + n_u:n_t + n_u + n_h]
            # log-Q: expected copies of an item among the negatives (in-batch by stream frequency, uniform)
            freq = L.freq.values(len(cat))
            expected = n_in * freq / max(L.freq.clock, 1.0) + min(1.0, len(uni) / max(len(live), 1))
            logq = torch.from_numpy(np.log(expected + _EPS).astype(np.float32))
            sec["bookkeeping"] += time.perf_counter() - t

            t = time.perf_counter()
            uniq_t = torch.from_numpy(uniq)
            sub = cat.emb[uniq_t].clone().requires_grad_(True)
            subn = cat.normalise(sub)
            separate = s.encoder_input == "separate"
            ctx = cat.ctx[uniq_t].clone().requires_grad_(True) if separate else subn
            q, log_gates = L.tower.queries(ctx, torch.from_numpy(widx), torch.from_numpy(gaps), train=True)
            sec["pooling"] += time.perf_counter() - t

            t = time.perf_counter()
            e = subn[inv_t[:n_t]].view(-1, s.facets, s.dim)
            pos_logq = logq[torch.from_numpy(tgt)]
            w_event = L.weights["engagement"][None, :] + \
                L.weights.get("positive", torch.zeros(s.facets))[None, :] * torch.from_numpy(positive)[:, None].float()
            if full:  # live rows are sorted, so each target's column is found by bisection
                items_t = subn[inv_t[n_t:n_t + n_u]].view(-1, s.facets, s.dim)
                masked = seen_columns(mask_ev, mask_rows, tgt, uni) if s.mask_seen_negatives else None
                combined, ce = full_softmax(q, log_gates, items_t, torch.from_numpy(np.searchsorted(uni, tgt)),
                                            s.temperature, masked, s.softmax_bf16, s.label_smoothing)
            else:
                neg_rows = np.concatenate([tgt[neg_pos], uni])
                negs = torch.cat([e[torch.from_numpy(neg_pos)], subn[inv_t[n_t:n_t + n_u]].view(-1, s.facets, s.dim)])
                bias = negative_bias(torch.from_numpy(tgt), torch.from_numpy(neg_rows),
                                     logq[torch.from_numpy(neg_rows)])
                if s.mask_seen_negatives:
                    ev, col = seen_pairs(mask_ev, mask_rows, tgt, neg_rows)
                    bias[torch.from_numpy(ev), torch.from_numpy(col)] = _MASKED_BIAS
                combined, ce = mixture_softmax(q, log_gates, e, negs, pos_logq, bias, s.temperature)
            loss = combined.mean() + s.facet_loss_weight * (ce * w_event).mean(0).sum()
            if s.facets > 1 and s.load_balance:
                mean_gate = log_gates.exp().mean(0)
                loss = loss + s.load_balance * s.facets * (mean_gate * mean_gate).sum()
            stats.losses["combined/ssm/continuous"] = float(combined.detach().mean())
            stats.losses.update({f"f{f}/ssm/continuous": float(ce[:, f].detach().mean()) for f in range(s.facets)})
            if len(sem_anchor_i) > 1:
                mates = subn[inv_t[n_t + n_u + n_h:]].view(-1, s.facets, s.dim)
                sem = item_item_softmax(e[torch.from_numpy(sem_anchor_i)], mates, s.temperature)
                loss = loss + (sem.mean(0) * L.weights["semantic"]).sum()
                stats.losses.update({f"f{f}/semantic/continuous": float(sem[:, f].detach().mean())
                                     for f in range(s.facets)})
            sec["forward"] += time.perf_counter() - t

            t = time.perf_counter()
            cb = None
            if rq.active:
                cb = rq.codebooks.clone().requires_grad_(True)
                codes = rq.encode(e.detach())
                e_hat = rq.reconstruct(codes, cb)
                # codewords follow the embeddings; the commitment term keeps embeddings near their codes
                loss = loss + F.mse_loss(e_hat, e.detach()) * s.dim + \
                    s.commitment * F.mse_loss(e, e_hat.detach()) * s.dim
                if s.quantised_loss:
                    # the index ranks reconstructions' clusters, so the combined score is trained on them too
                    # in-batch negatives only (the batch's own reconstructions): re-encoding a large uniform
                    # sample every step doubled the step time
                    # (at most ``negatives`` of them: all n of a replay-doubled batch made this term quadratic
                    # and as costly as the main softmax)
                    e_hat_n = F.normalize(e_hat, dim=2)
                    t_rows = torch.from_numpy(tgt)
                    cols = torch.from_numpy(neg_pos if len(neg_pos) else
                                            np.sort(L.rng.choice(len(tgt), min(len(tgt), s.negatives), replace=False)))
                    in_batch = negative_bias(t_rows, t_rows[cols], pos_logq[cols])
                    comb_q, _ = mixture_softmax(q, log_gates, e_hat_n, e_hat_n[cols], pos_logq, in_batch,
                                                s.temperature)
                    loss = loss + comb_q.mean()
                    stats.losses["combined/ssm/quantised"] = float(comb_q.detach().mean())
            sec["quantisation"] += time.perf_counter() - t

            t = time.perf_counter()
            L.tower.zero_grad()
            loss.backward()
            stats.loss = float(loss.detach())
            sec["backward"] += time.perf_counter() - t
            assert sub.grad is not None
            if separate and ctx.grad is not None:  # the context rows: the same row-wise Adagrad (single learner)
                with torch.no_grad():
                    gc = ctx.grad
                    cat.ctx_acc[uniq_t] += gc.pow(2).mean(dim=1)
                    cat.ctx[uniq_t] = cat.normalise(ctx.detach() - s.learning_rate * gc /
                                                    (cat.ctx_acc[uniq_t].sqrt()[:, None] + _EPS))
            local = RowGrads(uniq, sub.grad, cb.grad if cb is not None else None, len(tgt), int(ts.max()))
        else:
            sec["bookkeeping"] += time.perf_counter() - t
        if self.sync is not None:
            if local is None:  # nothing trained here: the encoder's share is zero, not last step's gradient
                L.tower.zero_grad()
            t = time.perf_counter()
            local = self.sync.exchange(local)
            sec["collective"] = time.perf_counter() - t
        if local is not None:
            t = time.perf_counter()
            self._apply(local)
            sec["optimiser"] += time.perf_counter() - t
        t = time.perf_counter()
        L.step += 1
        if self.upkeep_due():
            if self.sync is None:
                self._schedule(all_items)
            else:  # once for the group, then broadcast
                self.sync.maintain(lambda: self._schedule(all_items))
        self._export_codebook_gauges()
        sec["quantisation"] += time.perf_counter() - t
        self._export(stats)
        return stats

    @torch.no_grad()
    def _apply(self, g: RowGrads) -> None:
        """Row-wise Adagrad on the touched rows (deleted rows never move), Adagrad on the codewords, Adam
        on the encoder: the same update on every rank of a group, since ``g`` is the group's."""
        L, s, cat, rq = self.lr, self.lr.settings, self.lr.items, self.lr.rq
        rows_t = torch.from_numpy(g.rows)
        old = cat.emb[rows_t]
        cat.acc[rows_t] += g.grad.pow(2).mean(dim=1)
        upd = s.learning_rate * g.grad / (cat.acc[rows_t].sqrt()[:, None] + _EPS)
        upd[torch.from_numpy(~cat.live[g.rows])] = 0
        new = cat.normalise(old - upd)
        cat.emb[rows_t] = new
        cat.average(rows_t, s.serving_average)
        if g.codebook_grad is not None:
            rq.adagrad += g.codebook_grad.pow(2)
            rq.codebooks -= s.codebook_learning_rate * g.codebook_grad / (rq.adagrad.sqrt() + _EPS)
        drift = (new - old).view(-1, s.facets, s.dim).norm(dim=2).mean(0)
        L.tower.step()
        L.touch(g.rows, g.ts_max)
        for f in range(s.facets):
            metrics.EMBEDDING_DRIFT.labels(facet=str(f + self.facet_offset)).set(float(drift[f]))

    def upkeep_due(self) -> bool:
        """Whether :meth:`_schedule` has work this step: a function of state every rank of a group holds
        alike, so each rank knows without a collective whether the group's upkeep broadcast comes."""
        L, s, cat, rq = self.lr, self.lr.settings, self.lr.items, self.lr.rq
        due = s.warmup_events + rq.active * s.level_interval_events
        if rq.active < s.levels and L.events_seen >= due and int(cat.live[: len(cat)].sum()) >= 2:
            return True
        return bool(rq.active) and L.step % s.usage_interval_steps == 0

    def _schedule(self, items: np.ndarray) -> None:
        """Delayed start, coarse-before-fine activation, M growth and usage/dead-code upkeep."""
        L, s, cat, rq = self.lr, self.lr.settings, self.lr.items, self.lr.rq
        due = s.warmup_events + rq.active * s.level_interval_events
        live = torch.from_numpy(np.flatnonzero(cat.live[: len(cat)]))
        if rq.active < s.levels and L.events_seen >= due and len(live) >= 2:
            rq.activate_next(cat.vectors(live), L.gen)
        elif rq.active and L.step % s.usage_interval_steps == 0:
            recent = cat.vectors(np.unique(items))
            rq.maybe_grow(len(live), recent, L.gen)
            rq.update_usage(rq.encode(cat.vectors(live)), recent, L.gen)

    def _export_codebook_gauges(self) -> None:
        """Usage gauges after an upkeep (on every rank of a group: the upkeep's result is broadcast)."""
        L, s, rq = self.lr, self.lr.settings, self.lr.rq
        if not rq.active or L.step % s.usage_interval_steps:
            return
        dead = rq.dead_counts()
        before = self._resets_exported
        if before is None or before.shape != rq.resets.shape:
            before = np.zeros_like(rq.resets)
        self._resets_exported = np.copy(rq.resets)
        for f in range(s.facets):
            for lv in range(s.levels):
                lab = {"facet": str(f + self.facet_offset), "level": str(lv)}
                metrics.CODEBOOK_UTILISATION.labels(**lab).set(rq.utilisation[f, lv])
                metrics.CODEBOOK_PERPLEXITY.labels(**lab).set(rq.perplexity[f, lv])
                metrics.CODEBOOK_DEAD.labels(**lab).set(float(dead[f, lv]))
                if rq.resets[f, lv] > before[f, lv]:
                    metrics.CODEBOOK_RESETS.labels(**lab).inc(float(rq.resets[f, lv] - before[f, lv]))

    def _export(self, stats: StepStats) -> None:
        for phase, seconds in stats.seconds.items():
            metrics.LEARNER_STEP_SECONDS.labels(phase=phase).observe(seconds)
        if self.count_events:
            metrics.LEARNER_EVENTS.inc(stats.events)
        metrics.LEARNER_ITEMS.set(len(self.lr.items))
        metrics.LEARNER_USERS.set(len(self.lr.users))
        for key, value in stats.losses.items():
            f, objective, kind = key.split("/")
            metrics.LEARNER_LOSS.labels(facet=f if f == "combined" else str(int(f[1:]) + self.facet_offset),
                                        objective=objective,
                                        kind=kind).set(value)
