"""The data-parallel learner's step (learner/distributed.py): two real gloo ranks in two processes.

Both ranks must end with the same model bit for bit (else they drift apart for good), and that model
must be the one a single learner reaches on the union of the same batches (else the group learns
something else than the model it scales out).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dist_harness
import numpy as np
import torch

from mfli.learner.distributed import model_fingerprint
from mfli.learner.learner import MFLILearner

HARNESS = Path(dist_harness.__file__)


def _run_group(tmp_path: Path, world: int, step_events: int = 0, members: bool = False) -> list[dict]:
    init = tmp_path / "init"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_STEP_EVENTS": str(step_events),
           "HARNESS_MEMBERS": "1" if members else "0"}
    procs = [subprocess.Popen([sys.executable, str(HARNESS), str(r), str(world), str(init), str(outs[r])], env=env)
             for r in range(world)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    return [torch.load(o, weights_only=False) for o in outs]


def test_two_ranks_hold_one_model_equal_to_a_single_learner_on_the_union(tmp_path: Path) -> None:
    r0, r1 = _run_group(tmp_path, 2)
    assert int(r0["rq_active"]) == 2, "the codebook start and its broadcast were not exercised"
    assert int(r0["step"]) == dist_harness.STEPS, "an idle poll is no step"
    assert r0["item_ids"] == r1["item_ids"]
    for key, value in r0.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, r1[key]) or key == "comm_bytes", f"ranks differ on {key}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same summation order on any machine
    try:
        single = MFLILearner(dist_harness.settings())
        for batch in dist_harness.stream():
            single.learn_columns(*dist_harness.union(batch, 2))
    finally:
        torch.set_num_threads(threads)
    ref = model_fingerprint(single)
    assert single.items.ids.ids() == r0["item_ids"]
    assert single.rq.active == 2 and single.step == dist_harness.STEPS
    # every tensor, including encoder.wk.bias: the encoder no longer feeds the key bias into the graph (it is
    # a per-position constant the softmax ignores), so Adam no longer turns rounding noise into steps there
    for key, value in ref.items():
        assert torch.allclose(value, r0[key], rtol=1e-5, atol=1e-5), \
            f"{key}: max diff {(value - r0[key]).abs().max():.3g}"
    # and the group really learned: every row's Adagrad saw gradients, the encoder left its start
    assert bool((r0["acc"] > 0).all())
    fresh = model_fingerprint(MFLILearner(dist_harness.settings()))
    moved = [k for k in fresh if k.startswith("encoder.") and not torch.allclose(fresh[k], r0[k], atol=1e-3)]
    assert moved


def test_a_group_cuts_each_batch_into_the_steps_one_learner_would_take(tmp_path: Path) -> None:
    """model.step_events in a group: every batch of 48 events is learned in ceil(48 / 20) = 3 steps on
    every rank, also when one rank holds none of a batch's events, and the ranks stay bit-equal."""
    r0, r1 = _run_group(tmp_path, 2, step_events=20)
    assert int(r0["step"]) == int(r1["step"]) == 3 * dist_harness.STEPS
    for key, value in r0.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, r1[key]) or key == "comm_bytes", f"ranks differ on {key}"
    assert bool((r0["acc"] > 0).all())


HANG = """
import sys, time
import torch, torch.distributed as dist
from mfli.learner.distributed import DistributedLearner, exit_now, init_group
from mfli.config import ModelSettings
rank, init = int(sys.argv[1]), sys.argv[2]
init_group("gloo", rank, 2, init, timeout_s=3)
learner = DistributedLearner(ModelSettings(members=1, dim=8, history=4), rank, 2)
if rank == 1:
    time.sleep(60)  # alive, connected, never enters the step: a hung peer
t = time.monotonic()
try:
    learner.learn_group(["u"], ["i"], torch.ones(1).numpy(), torch.ones(1, dtype=torch.int64).numpy())
except RuntimeError as exc:
    print(f"FAILED after {time.monotonic() - t:.1f}s: {type(exc).__name__}", flush=True)
    exit_now(3)  # sys.exit would finalise the interpreter under gloo's threads: SIGABRT, seen once here
"""


def test_a_hung_peer_fails_the_collective_within_the_timeout(tmp_path: Path) -> None:
    """A peer that is alive but stuck (no connection reset to notice) must still not hang the group:
    the collective's timeout fails the waiting rank, which exits non-zero for its launcher to see."""
    init = f"file://{tmp_path / 'init'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", HANG, str(r), init], env=env, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=50)
        assert procs[0].returncode == 3, out
        assert "FAILED after" in out
        assert float(out.split("after ")[1].split("s")[0]) < 15
    finally:
        procs[1].kill()
        procs[1].wait()


def test_an_ensemble_groups_members_are_single_learners_on_the_union_and_publish_as_facets(tmp_path: Path) -> None:
    """``model.members`` = 2 as a group (learner/members.py): rank r's member is exactly the single learner
    of member r's seed stepped on the union of the ranks' batches (nothing is exchanged while learning),
    and rank 0 publishes member r's vectors as facet r."""
    from mfli.learner.ensemble import member_settings

    ranks = _run_group(tmp_path, 2, members=True)
    ens = dist_harness.ensemble_settings(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        singles = []
        for r in range(2):
            single = MFLILearner(member_settings(ens, r))
            for batch in dist_harness.stream():
                single.learn_columns(*dist_harness.union(batch, 2))
            singles.append(single)
    finally:
        torch.set_num_threads(threads)
    assert [s.settings.seed for s in singles] == [8, 9]
    for r, (single, got) in enumerate(zip(singles, ranks, strict=True)):
        assert got["item_ids"] == single.items.ids.ids()
        assert int(got["events_seen"]) == single.events_seen == dist_harness.STEPS * dist_harness.BATCH
        for key, value in model_fingerprint(single).items():  # float rounding: numpy's k-means start may thread
            assert torch.allclose(value, got[key], rtol=1e-5, atol=1e-5), \
                f"member {r} differs from its single learner on {key}: {(value - got[key]).abs().max():.3g}"
    assert not torch.allclose(ranks[0]["emb"], ranks[1]["emb"], atol=1e-3), "the members are independent"
    r0 = ranks[0]
    rows = r0["delta_rows"].numpy()
    assert set(range(10)) <= set(rows.tolist())  # the rows rank 0 marked, and those training changed
    for r, single in enumerate(singles):
        np.testing.assert_allclose(r0["delta_vectors"][:, r].numpy(), single.serving_vectors()[rows, 0], atol=1e-5)
        np.testing.assert_allclose(r0["ensemble_codebooks"][r].numpy(), single.rq.codebooks[0].numpy(), atol=1e-5)
    assert int(r0["model_members"]) == int(r0["model_facets"]) == 2
