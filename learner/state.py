"""What one training step works on: the learner's state as the stepper sees it, and the step's report.

:class:`~mfli.learner.learner.MFLILearner` owns the state; :class:`~mfli.learner.stepper.Stepper` is
handed it and runs one step on it. :class:`LearnerState` names exactly what a step reads and writes, as
a structural type, so the stepper depends on this contract instead of importing the learner (which
imports the stepper): no cycle, and a change to the learner that a step relies on shows up here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from mfli.config import ModelSettings
from mfli.learner.catalogue import ItemCatalogue
from mfli.learner.counts import DecayedCounts
from mfli.learner.encoder import QueryTower
from mfli.learner.history import UserHistories
from mfli.learner.quantizer import ResidualQuantizer
from mfli.learner.replay import ReplayBuffer

#: where a step's wall time goes (``StepStats.seconds``; ``mfli bench learn`` reports each)
PHASES = ("bookkeeping", "pooling", "forward", "quantisation", "backward", "collective", "optimiser")


@dataclass
class StepStats:
    """What one ``learn`` call did."""

    events: int = 0
    trained: int = 0  # events whose user had a history (the others only start one)
    new_items: int = 0
    new_users: int = 0
    loss: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)  # "f{facet}/{objective}/{kind}" -> value
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def merge(self, other: StepStats) -> None:
        """Add a later step of the same ``learn`` call: counts and seconds add up, losses are the
        latest step's (what the metrics export after each step anyway)."""
        self.events += other.events
        self.trained += other.trained
        self.new_items += other.new_items
        self.new_users += other.new_users
        self.loss = other.loss
        self.losses.update(other.losses)
        for phase, seconds in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class LearnerState(Protocol):
    """The learner's state a training step reads and writes (see the module docstring)."""

    settings: ModelSettings
    items: ItemCatalogue
    users: UserHistories
    rq: ResidualQuantizer
    freq: DecayedCounts  # log-Q sampling-probability estimate
    popularity: DecayedCounts  # the prior
    replay: ReplayBuffer
    tower: QueryTower
    weights: dict[str, torch.Tensor]  # objective -> per-facet loss weight
    gen: torch.Generator
    rng: np.random.Generator
    step: int
    events_seen: int

    def touch(self, rows: np.ndarray, ts: int) -> None:
        """Mark ``rows`` changed by this step (their deltas carry ``ts``, the newest event time)."""
        ...
