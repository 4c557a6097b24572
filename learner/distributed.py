"""Data-parallel learning: N learner ranks, one model, kept identical with ``torch.distributed`` (issue 14).

Each rank reads its own ``mfli.events`` partitions (the topic is keyed by user, so a user's history,
replay examples and de-duplication window live on one rank) and steps on its own events. What must be
the same on every rank is the *model*: item rows, their Adagrad accumulators, the codebooks, the query
encoder and its Adam moments, the id → row numbering, the stream-wide counts (log-Q, popularity) and the
generator that initialises new rows. Per step:

1. **Step meta** (``all_gather_object``): every rank's item ids in event order, plus catalogue changes and
   control flags from rank 0. Every rank then numbers new items from the concatenation in rank order
   (so new rows get the same number and the same random start everywhere), applies catalogue changes in
   the same order, and feeds the group's items to the stream-wide counts: exactly what one learner
   stepping the union batch (rank 0's events, then rank 1's, ...) would do.
2. **Sparse rows** (``all_gather`` of sizes, then of padded row ids and row gradients): each rank's
   gradient is that of its *own* mean loss; scaled by its share of the group's trained events, the sum
   is the gradient of the group's mean loss. Rows are summed per row in rank order, so every rank
   applies the same row-wise Adagrad update to the same rows, bit for bit.
3. **Dense** (one ``all_reduce`` of a flat vector): the encoder's and the codewords' gradients, scaled
   the same way, with one flag per parameter so a parameter no rank touched keeps ``grad=None`` (Adam
   then skips it, as a single learner does).
4. **Codebook upkeep** (k-means start, dead-code reset, growth): rank 0 runs it when due (a function of
   replicated state, so every rank knows when) and broadcasts the quantiser's state with the generator's.

The replay buffer, the user windows and the negative-sampling generator stay per rank.

Exact equality with one learner holds where the step's loss is a mean over events (the default F=1
model with a full softmax or per-rank uniform negatives): in-batch negatives are drawn from the rank's
own batch, which is the data-parallel approximation every sharded trainer makes.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from mfli import metrics
from mfli.config import ModelSettings
from mfli.events import ItemEvent
from mfli.learner.learner import MFLILearner, step_parts
from mfli.learner.state import StepStats
from mfli.learner.stepper import RowGrads

log = logging.getLogger(__name__)

#: learner state that is the model (identical on every rank, checkpointed once); the rest is per rank
MODEL_KEYS = ("settings", "step", "events_seen", "items", "rq", "freq", "popularity", "changed", "deleted",
              "row_version", "gen", "tower")
RANK_KEYS = ("users", "replay", "rng")


@dataclass
class CommStats:
    """What the group's collectives cost on this rank: seconds blocked in them and bytes this rank sent
    (the payload it contributed, not the backend's framing): the basis of the scaling projection."""

    seconds: float = 0.0
    bytes_sent: int = 0
    calls: int = 0
    per_kind: dict[str, float] = field(default_factory=dict)
    bytes_per_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        self.seconds += seconds
        self.bytes_sent += nbytes
        self.calls += 1
        self.per_kind[kind] = self.per_kind.get(kind, 0.0) + seconds
        self.bytes_per_kind[kind] = self.bytes_per_kind.get(kind, 0) + nbytes
        metrics.LEARNER_COLLECTIVE_SECONDS.labels(kind=kind).observe(seconds)
        metrics.LEARNER_COLLECTIVE_BYTES.labels(kind=kind).inc(nbytes)


def init_group(backend: str, rank: int, world: int, init_method: str, timeout_s: float) -> None:
    """Join the process group. ``timeout_s`` bounds every collective: a rank whose peer died raises
    instead of waiting forever, and its supervisor restarts the group from the last checkpoint."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def leave_group() -> None:
    """Leave the process group cleanly, on every rank, after the last collective.

    The barrier comes first: a rank that tears its sockets down while a peer still finishes the last
    collective breaks the peer's transport. Then the group is destroyed while the interpreter is fully
    alive: gloo's worker threads left to interpreter finalisation can abort the process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#179291), and the group launcher reads
    a non-zero exit after a clean stop as a crashed rank. Callers then leave with :func:`exit_now`.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """End a rank process once its state is durable (checkpoint written, consumer closed, group left),
    without the C++ static teardown that can still race gloo's threads: flush logs and streams, then
    ``os._exit``."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class GroupSync:
    """The :class:`~mfli.learner.stepper.StepSync` of a process group (see the module docstring)."""

    def __init__(self, learner: MFLILearner, rank: int, world: int) -> None:
        self.learner, self.rank, self.world = learner, rank, world
        self.comm = CommStats()

    # --- collectives, timed and counted --------------------------------------------------------------
    def gather_objects(self, obj: Any, kind: str = "meta") -> list[Any]:
        t = time.perf_counter()
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        self.comm.add(kind, time.perf_counter() - t, len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
        return out

    def _all_gather(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        t = time.perf_counter()
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous())
        self.comm.add(kind, time.perf_counter() - t, x.numel() * x.element_size())
        return out

    def _all_reduce(self, x: torch.Tensor, kind: str) -> None:
        t = time.perf_counter()
        dist.all_reduce(x)
        self.comm.add(kind, time.perf_counter() - t, x.numel() * x.element_size())

    def barrier_all_ok(self, ok: bool) -> bool:
        """True when every rank says ``ok`` (a barrier that also carries a verdict)."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        self._all_reduce(flag, "barrier")
        return int(flag.item()) == 0

    # --- StepSync ------------------------------------------------------------------------------------
    def exchange(self, local: RowGrads | None) -> RowGrads | None:
        L = self.learner
        s = L.settings
        width = s.facets * s.dim
        sizes = torch.tensor([0, 0, -1] if local is None else [len(local.rows), local.events, local.ts_max],
                             dtype=torch.int64)
        all_sizes = torch.stack(self._all_gather(sizes, "sizes"))
        total = int(all_sizes[:, 1].sum())
        params = [] if L.tower.mean else list(L.tower.encoder.parameters())
        if total == 0:
            for p in params:
                p.grad = None
            return None
        share = (local.events if local is not None else 0) / total
        # dense: encoder gradients, then the codewords', then one "had a gradient" flag per tensor
        dense: list[torch.Tensor] = []
        flags: list[float] = []
        for p in params:
            has = p.grad is not None
            dense.append((p.grad * share).flatten() if has else torch.zeros(p.numel()))
            flags.append(1.0 if has else 0.0)
        rq_active = bool(L.rq.active)
        if rq_active:
            cbg = local.codebook_grad if local is not None else None
            dense.append((cbg * share).flatten() if cbg is not None else torch.zeros(L.rq.codebooks.numel()))
            flags.append(1.0 if cbg is not None else 0.0)
        flat = torch.cat(dense + [torch.tensor(flags)]) if dense else torch.tensor(flags)
        self._all_reduce(flat, "dense")
        n_flags = len(flags)
        got = flat[len(flat) - n_flags:]
        off = 0
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone() if got[i] > 0 else None
            off += n
        codebook_grad = None
        if rq_active:
            n = L.rq.codebooks.numel()
            if got[len(params)] > 0:
                codebook_grad = flat[off:off + n].view_as(L.rq.codebooks).clone()
            off += n
        # sparse: every rank's touched rows and their (share-scaled) gradients, padded to the longest
        most = int(all_sizes[:, 0].max())
        rows = torch.full((most,), -1, dtype=torch.int64)
        grads = torch.zeros(most, width)
        if local is not None:
            rows[: len(local.rows)] = torch.from_numpy(local.rows)
            grads[: len(local.rows)] = local.grad * share
        all_rows = self._all_gather(rows, "rows")
        all_grads = self._all_gather(grads, "rows")
        keep = [int(n) for n in all_sizes[:, 0]]
        cat_rows = torch.cat([r[:k] for r, k in zip(all_rows, keep, strict=True)]).numpy()
        cat_grads = torch.cat([g[:k] for g, k in zip(all_grads, keep, strict=True)])
        uniq, inv = np.unique(cat_rows, return_inverse=True)
        summed = torch.zeros(len(uniq), width).index_add_(0, torch.from_numpy(inv), cat_grads)
        return RowGrads(uniq, summed, codebook_grad, total, int(all_sizes[:, 2].max()))

    def maintain(self, upkeep: Callable[[], None]) -> None:
        L = self.learner
        if self.rank == 0:
            upkeep()
            payload: list[Any] = [L.rq.state(), L.gen.get_state()]
        else:
            payload = [None, None]
        t = time.perf_counter()
        dist.broadcast_object_list(payload, src=0)
        nbytes = len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)) if self.rank == 0 else 0
        self.comm.add("codebooks", time.perf_counter() - t, nbytes)
        if self.rank != 0:
            L.rq.load_state(payload[0])
            L.gen.set_state(payload[1])


class DistributedLearner(MFLILearner):
    """One rank's learner in a data-parallel group; ``learn_group`` is the group's step (every rank must
    call it, with its own events, once per step)."""

    def __init__(self, settings: ModelSettings, rank: int, world: int) -> None:
        if settings.encoder_input != "shared":
            raise ValueError("the data-parallel learner trains encoder_input='shared' only")
        super().__init__(settings)
        self.rank, self.world = rank, world
        if rank:  # rank 0 keeps the single learner's stream of negatives; the others draw their own
            self.rng = np.random.default_rng([settings.seed, rank])
        self.sync = GroupSync(self, rank, world)
        self._stepper.sync = self.sync

    def learn_group(self, user_ids: Sequence[str], item_ids: Sequence[str], values: np.ndarray, ts: np.ndarray,
                    upserts: Sequence[ItemEvent] = (), control: Any = None) -> tuple[StepStats, list[Any]]:
        """One group step on this rank's events (columns as :meth:`learn_columns`). ``upserts``: catalogue
        events this rank read (rank 0 reads ``mfli.items``), applied by every rank in rank order before the
        step; ``control``: any small picklable value, returned from every rank (rank 0 uses it to tell the
        group when to flush, checkpoint or stop, so every rank does it at the same step)."""
        t0 = time.perf_counter()
        item_ids = list(item_ids)
        metas = self.sync.gather_objects({"items": item_ids, "upserts": list(upserts), "control": control})
        for meta in metas:
            if meta["upserts"]:
                self.upsert_items(meta["upserts"])
        counts = [len(m["items"]) for m in metas]
        if not sum(counts):  # an idle poll on every rank: no step (a single learner would not take one)
            return StepStats(), [m["control"] for m in metas]
        all_ids = [i for m in metas for i in m["items"]]
        n_users = len(self.users)
        users = self.users.rows_for(list(user_ids))
        all_rows, new = self.items.rows_for(all_ids, self.gen)
        live = self.items.live[all_rows]
        values, ts = np.asarray(values, np.float32), np.asarray(ts, np.int64)
        offsets = np.cumsum([0, *counts])
        # as many steps as one learner would take on the union's live events; every rank cuts its own live
        # events into that many consecutive parts, so all ranks take the same steps
        parts = step_parts(int(live.sum()), self.settings.step_events)
        cuts = [np.array_split(offsets[r] + np.flatnonzero(live[offsets[r]:offsets[r + 1]]), parts)
                for r in range(self.world)]
        stats = StepStats()
        for j in range(parts):
            mine = cuts[self.rank][j]
            local = mine - offsets[self.rank]
            stats.merge(self._stepper.step(users[local], all_rows[mine], values[local], ts[local],
                                           group_items=all_rows[np.concatenate([c[j] for c in cuts])]))
        stats.new_items, stats.new_users = len(new), len(self.users) - n_users
        stats.seconds["bookkeeping"] += time.perf_counter() - t0 - sum(stats.seconds.values())
        return stats, [m["control"] for m in metas]

    # --- the group's checkpoint: the model once, each rank's own state beside it ------------------------
    def model_state(self) -> dict:
        full = self.state_dict()
        return {k: full[k] for k in MODEL_KEYS}

    def rank_state(self) -> dict:
        full = self.state_dict()
        return {k: full[k] for k in RANK_KEYS}

    def load_group_state(self, model: dict, rank: dict) -> None:
        self.load_state_dict({**model, **rank})


def model_fingerprint(learner: MFLILearner) -> dict[str, torch.Tensor]:
    """The tensors that must be identical on every rank (for tests and the group's self-check)."""
    n = len(learner.items)
    out = {"emb": learner.items.emb[:n].clone(), "acc": learner.items.acc[:n].clone(),
           "codebooks": learner.rq.codebooks.clone(), "rq_adagrad": learner.rq.adagrad.clone(),
           "freq": torch.from_numpy(learner.freq.values(n).copy()),
           "popularity": torch.from_numpy(learner.popularity.values(n).copy())}
    for name, p in learner.tower.encoder.named_parameters():
        out[f"encoder.{name}"] = p.detach().clone()
    if learner.items.avg.shape[0]:
        out["avg"] = learner.items.avg[:n].clone()
    if learner.tower.average is not None:
        for name, p in learner.tower.average.named_parameters():
            out[f"average.{name}"] = p.detach().clone()
    return out
