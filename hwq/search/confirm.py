"""A second batch of fresh training images a generation's winner must also win on before
it replaces the best solution (`--confirm-images`).

From a strong post-training start, the winner of a generation beats the best on its
256-image fitness batch in about 40 % of generations, mostly by chance: the held-out
accuracy then drifts down and the held-out logit distance up while the fitness rises
(docs/training.md). A change that is also better on images it was not chosen on is far
more often better on the population too; a change of no true effect passes half the
time, a harmful one less often. The test costs one evaluation on the confirmation batch
per winner that beats the best, which is much less than growing the fitness batch itself.
Both batches are drawn together, disjoint, and redrawn together.
"""

from __future__ import annotations

import numpy as np
import torch

from accel_sim.ir import ParamKey

from .evaluator import Evaluator, Targets


class Confirmation:
    """The confirmation batch held by its own evaluator (with its own incremental caches,
    so testing a winner costs only the layers it changes and those after them)."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.batch = np.empty(0, dtype=np.int64)
        self.teacher: torch.Tensor | None = None
        self.best_fitness = 0
        self.tested = 0  # winners tested here
        self.held = 0  # of which beat the best here too

    def set_batch(
        self, batch: np.ndarray, images: torch.Tensor, targets: Targets, best: dict[ParamKey, np.ndarray]
    ) -> None:
        """New images, and the best solution's fitness on them."""
        self.batch, self.teacher = batch, targets.teacher
        self.evaluator.set_batch(images, targets)
        self.best_fitness = self.evaluator.set_solution(best)

    def holds(self, winner: dict[ParamKey, np.ndarray]) -> bool:
        """Whether a winner (its parameters that differ from the best solution, with a
        population axis of one) also beats the best solution on the confirmation batch."""
        self.tested += 1
        held = int(self.evaluator.evaluate(winner)[0]) > self.best_fitness
        self.held += held
        return held

    def accept(self, changed: dict[ParamKey, np.ndarray]) -> None:
        """The confirmed winner is the new best: its parameters replace the best's here too."""
        self.best_fitness = self.evaluator.set_solution(changed)

    def state_dict(self) -> dict:
        return {
            "batch": self.batch,
            "teacher": None if self.teacher is None else self.teacher.numpy(),
            "best_fitness": self.best_fitness,
            "evaluations": self.evaluator.evaluations,
            "macs": self.evaluator.macs,
            "tested": self.tested,
            "held": self.held,
        }
