"""Atomic learner checkpoints: the whole training state plus the source offsets it reflects.

Written to a temporary file in the same directory, fsync'ed, then renamed over the old checkpoint
(and the directory fsync'ed), so a crash leaves either the old or the new checkpoint, never a torn
one. The offsets are stored *with* the state (docs/design.md §Delivery): a restart resumes exactly where the state
ends, and Kafka offsets are committed only after this returns.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from mfli import metrics
from mfli.config import ModelSettings
from mfli.learner.learner import MFLILearner

FORMAT_VERSION = 1
DEDUPE_IDS_KEPT = 100_000  # newest event ids checkpointed: duplicates arrive close to their original


def save_checkpoint(
    learner: MFLILearner, path: str | Path, offsets: dict | None = None, extra: dict | None = None
) -> Path:
    """Write ``learner``'s state, the caller's opaque ``offsets`` and ``extra`` atomically to ``path``.

    ``extra`` is process state that must move together with the model (the learner process keeps its
    recent event ids there so de-duplication survives a restart)."""
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_VERSION, "learner": learner.state_dict(), "offsets": dict(offsets or {}),
               "extra": dict(extra or {})}
    write_atomic(path, payload)
    metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - t0)
    return path


def write_atomic(path: Path, payload: object) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename over ``path``, fsync the directory:
    a crash leaves the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> tuple[MFLILearner, dict]:
    """A learner restored from ``path`` (settings included) and the offsets saved with it."""
    learner, offsets, _ = read_checkpoint(path)
    return learner, offsets


def read_checkpoint(path: str | Path) -> tuple[MFLILearner, dict, dict]:
    """Like :func:`load_checkpoint`, plus the ``extra`` dict saved with it."""
    payload = torch.load(Path(path), weights_only=False)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload.get('format')!r}, expected {FORMAT_VERSION}")
    state = payload["learner"]
    learner = MFLILearner(ModelSettings(**state["settings"]))
    learner.load_state_dict(state)
    return learner, payload["offsets"], payload.get("extra", {})
