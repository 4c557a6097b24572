"""A data-parallel learner rank for tests (run as a script: one process per rank) and the stream it learns.

``python tests/dist_harness.py RANK WORLD INIT_FILE OUT`` joins a gloo group through a file store, steps a
:class:`~mfli.learner.distributed.DistributedLearner` over its users' share of :func:`stream` and saves its
model fingerprint to OUT. The test runs one learner on the union of the same batches and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from mfli.config import ModelSettings

STEPS, BATCH, USERS, ITEMS = 40, 48, 40, 90


def settings() -> ModelSettings:
    """A small model on which the group's step is exactly the union's: F=1, a full softmax (the catalogue
    is smaller than ``uniform_negatives``), no replay, no in-batch quantised term. The codebooks start,
    add their second level and run usage upkeep inside the run, so the upkeep broadcast is exercised.

    The group and one learner sum the same gradients in a different order, so they agree to float rounding
    (~1e-7) -- unless an item sits on a near-tie of a codeword assignment, where that rounding flips the
    code and the codebook then differs by 1e-3..1e-2 (seeds 7 and 8 have such a tie at the default
    temperature 0.1; 7 had none at 0.05). The seed is one without a tie; the ranks must still be bit-equal
    to each other, and the single learner runs on one thread like the ranks, so its sums do not depend
    on the machine's core count. The softmax runs in float32 (``softmax_precision``): in bfloat16 the two
    halves' products round differently from the union's (~1e-3), which would hide a real divergence."""
    return ModelSettings(members=1, facets=1, dim=16, history=8, levels=2, codewords=8, warmup_events=400,
                         level_interval_events=400, usage_interval_steps=3, dead_code_window=2, replay_ratio=0.0,
                         quantised_loss=False, uniform_negatives=4096, seed=9, softmax_precision="float32",
                         step_events=int(os.environ.get("HARNESS_STEP_EVENTS", "0")))


def stream(seed: int = 3) -> list[tuple[list[str], list[str], np.ndarray, np.ndarray]]:
    """STEPS batches of (user ids, item ids, values, ts): skewed items, users with tastes."""
    rng = np.random.default_rng(seed)
    out, t = [], 1_000_000
    for step in range(STEPS):
        u = rng.integers(0, USERS, BATCH)
        if step == STEPS // 2:  # a batch only rank 0's users are in: rank 1 takes the step with nothing
            u = u - u % 2
        it = (u * 7 + rng.zipf(1.6, BATCH)) % ITEMS
        values = rng.integers(1, 6, BATCH).astype(np.float32)
        ts = t + np.arange(BATCH, dtype=np.int64) * 1000
        t += BATCH * 1000
        out.append(([f"u{x}" for x in u], [f"i{x}" for x in it], values, ts))
    return out


def shard(batch, rank: int, world: int):
    """The events of the users rank ``rank`` owns (user number mod world), in stream order."""
    users, items, values, ts = batch
    keep = np.asarray([int(x[1:]) % world == rank for x in users])
    return [x for x, k in zip(users, keep, strict=True) if k], \
        [x for x, k in zip(items, keep, strict=True) if k], values[keep], ts[keep]


def union(batch, world: int):
    """The batch as the group concatenates it: rank 0's events, then rank 1's, ..."""
    parts = [shard(batch, r, world) for r in range(world)]
    return [x for p in parts for x in p[0]], [x for p in parts for x in p[1]], \
        np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])


def ensemble_settings(world: int) -> ModelSettings:
    """The same model as an ensemble of ``world`` members (``HARNESS_MEMBERS=1``: one member per rank)."""
    return settings().model_copy(update={"members": world, "seed": 4})


def members_main(rank: int, world: int, out: str) -> None:
    """An ensemble group's rank: learn member ``rank`` on the group's events, then one publish exchange
    (rank 0 asks for rows 0..9 and the encoders) whose result rank 0 saves beside the member."""
    from mfli.learner.distributed import model_fingerprint
    from mfli.learner.members import EnsembleView, MemberLearner

    learner = MemberLearner(ensemble_settings(world), rank, world)
    learner.learn_group([], [], np.zeros(0, np.float32), np.zeros(0, np.int64))
    for batch in stream():
        learner.learn_group(*shard(batch, rank, world))
    fp = model_fingerprint(learner)
    fp["step"] = torch.tensor(learner.step)
    fp["events_seen"] = torch.tensor(learner.events_seen)
    fp["item_ids"] = learner.items.ids.ids()
    view = EnsembleView(learner) if rank == 0 else None
    plan = None
    if view is not None:
        learner.mark_changed(range(10))
        plan = {"rows": view.plan_rows(), "model": True}
    shared = learner.share_for_publish(plan)
    if view is not None and shared is not None and plan is not None:
        view.install(plan["rows"], shared)
        deltas = view.drain_changed()
        fp["delta_rows"] = torch.tensor([d.row for d in deltas])
        fp["delta_vectors"] = torch.from_numpy(np.stack([d.vectors for d in deltas]))
        fp["ensemble_codebooks"] = torch.from_numpy(view.codebook_snapshot().codebooks)
        model = view.query_model()
        fp["model_members"] = torch.tensor(model.members)
        fp["model_facets"] = torch.tensor(model.facets)
    torch.save(fp, out)


def main(rank: int, world: int, init_file: str, out: str) -> None:
    from mfli.learner.distributed import DistributedLearner, exit_now, init_group, leave_group, model_fingerprint

    init_group("gloo", rank, world, f"file://{init_file}", timeout_s=60)
    if os.environ.get("HARNESS_MEMBERS") == "1":
        members_main(rank, world, out)
        leave_group()
        exit_now(0)
    learner = DistributedLearner(settings(), rank, world)
    learner.learn_group([], [], np.zeros(0, np.float32), np.zeros(0, np.int64))  # idle on every rank: no step
    for batch in stream():
        learner.learn_group(*shard(batch, rank, world))
    fp = model_fingerprint(learner)
    fp["rq_active"] = torch.tensor(learner.rq.active)
    fp["step"] = torch.tensor(learner.step)
    fp["resets"] = torch.from_numpy(learner.rq.resets.copy())
    fp["comm_bytes"] = torch.tensor(learner.sync.comm.bytes_sent)
    fp["item_ids"] = learner.items.ids.ids()
    torch.save(fp, out)
    leave_group()
    exit_now(0)  # as a learner rank leaves: a CI run once aborted (SIGABRT) in gloo's teardown after the save


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
