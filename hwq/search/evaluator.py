"""Fitness evaluators: the only thing the search knows about the hardware model.

An evaluator holds a batch of training images and the current best solution (the
context), and scores candidates that differ from it in a few integer parameters, keyed
(op name, field) as in `accel_sim.ir.ParamKey`: a conv's `weight` or `bias`, or an op's
requantization `mult`. The accel_sim evaluator runs in process on any torch device (on a
GPU exactly, see accel_sim/device.py); a multi-process or multi-machine one only has to
implement `Evaluator`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from accel_sim.functional import FunctionalSim, LayerStats
from accel_sim.ir import WEIGHT, Conv2d, ParamKey, Program, output_hw, param_of

from .. import HwqError


@dataclass(frozen=True)
class Targets:
    """What a fitness batch's logits are scored against.

    `teacher` holds the float network's logits for the batch in LSBs of the program's
    integer logits, rounded once when the batch is drawn; only `distill` needs it.
    """

    labels: torch.Tensor
    teacher: torch.Tensor | None = None


def integer_logits(model: torch.nn.Module, images: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """A float network's logits in integer logit LSBs (round half to even)."""
    with torch.no_grad():
        return torch.round(model(images).double() / logit_scale).to(torch.int64)


@dataclass(frozen=True)
class IntegerFitness:
    """An integer score of integer logits, computed with integer operations only.

    Per image, the margin is the true class's logit minus the largest other logit,
    clipped to [-clip, clip] (clip in logit LSBs). `accuracy`: the number of correct
    top-1 predictions (argmax, first index on ties), ties between candidates broken by
    the sum of clipped margins; `margin`: the sum of clipped margins alone; `distill`:
    minus the L1 distance between the logits and the float network's (the teacher's),
    which every image informs, not only the few near the decision boundary.

    `overflow_penalty` > 0 subtracts that many points per accumulator output that overflowed
    on the batch, so the search sees partial sums leaving a narrow accumulator before the
    logits show it. Like the scores it offsets, the count is a sum over images; `accuracy`
    packs its score so that image shards can be recombined, which a penalty would break, so
    it takes none.
    """

    mode: str
    clip: int
    overflow_penalty: int = 0

    def __post_init__(self) -> None:
        if self.overflow_penalty < 0:
            raise HwqError(f"the overflow penalty must be non-negative, not {self.overflow_penalty}")
        if self.overflow_penalty and self.mode == "accuracy":
            raise HwqError("an overflow penalty needs the distill or margin fitness, not accuracy")

    @property
    def needs_teacher(self) -> bool:
        return self.mode == "distill"

    @property
    def counts_overflows(self) -> bool:
        return self.overflow_penalty > 0

    def score(
        self, logits: torch.Tensor, targets: Targets, overflows: np.ndarray | None = None
    ) -> np.ndarray:
        """(P,) scores of logits (P, N, classes), less the penalty for `overflows` (P,)."""
        scores = self.logit_score(logits, targets)
        if self.counts_overflows:
            if overflows is None:
                raise HwqError("an overflow penalty needs the candidates' overflow counts")
            scores = scores - self.overflow_penalty * np.asarray(overflows, dtype=np.int64)
        return scores

    def logit_score(self, logits: torch.Tensor, targets: Targets) -> np.ndarray:
        if self.needs_teacher:
            if targets.teacher is None:
                raise HwqError("the distill fitness needs the float network's logits for the batch")
            return -(logits - targets.teacher[None]).abs().sum(dim=(1, 2)).numpy()
        index = targets.labels.to(torch.int64)
        labels = index.view(1, -1, 1).expand(len(logits), -1, 1)
        n = logits.shape[1]
        true = logits.gather(2, labels).squeeze(2)
        others = logits.scatter(2, labels, torch.iinfo(torch.int64).min)
        margin = (true - others.max(dim=2).values).clamp(-self.clip, self.clip).sum(dim=1)
        if self.mode == "margin":
            return margin.numpy()
        correct = (logits.argmax(dim=2) == index.view(1, -1)).sum(dim=1)
        return (correct * (2 * self.clip * n + 1) + margin + self.clip * n).numpy()


CPU_MAX_ELEMENTS = 1 << 19
DEVICE_MAX_ELEMENTS = 1 << 25


def conv_macs(program: Program, op: Conv2d) -> int:
    x = program.tensors[op.input]
    hw = output_hw(x.shape[1], op.kernel, op.stride, op.padding)
    return hw * hw * op.out_channels * op.reduction


class Evaluator(ABC):
    """Scores candidates on the current batch; counts evaluations and MACs."""

    def __init__(self) -> None:
        self.evaluations = 0
        self.macs = 0

    @abstractmethod
    def set_batch(self, images: torch.Tensor, targets: Targets) -> None:
        """Images (N, 3, 32, 32) uint8 and what their logits are scored against, from now."""

    @abstractmethod
    def set_solution(self, params: dict[ParamKey, np.ndarray]) -> int:
        """Make `params` (full arrays, e.g. whole weight tensors) the context; returns its
        fitness on the batch."""

    @abstractmethod
    def evaluate(self, candidates: dict[ParamKey, np.ndarray]) -> np.ndarray:
        """Fitness (P,) of candidates: per parameter, (P, ...) values replacing the context's."""

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Release what the evaluator holds beyond memory (worker processes); in process, nothing."""


class SimEvaluator(Evaluator):
    """Fitness on accel_sim, incremental: from the first changed op, on cached activations.

    The activations of the context for the batch are kept for every tensor; a candidate
    population is run from its first changed op in batched calls (`run_population`) of at
    most `max_elements` activation elements entering that op. On the CPU, batching pays
    only while the tensors stay cache-sized: on 2 cores, 16 candidates at once ran a
    layer3 conv 4x slower than one at a time, and the classifier 8x faster
    (bench/bench_fitness.py); on other devices the default is a larger batch
    (DEVICE_MAX_ELEMENTS, not yet tuned). Candidates that the batched form cannot run
    exactly (products beyond 2**53) run one by one. With `incremental=False` every
    candidate runs the whole network on its own (the baseline the benchmark compares
    against). `conv_backend` and `self_check` are FunctionalSim's.
    """

    def __init__(
        self,
        program: Program,
        fitness: IntegerFitness,
        device: str = "cpu",
        compile: bool = False,
        incremental: bool = True,
        max_elements: int | None = None,
        conv_backend: str | None = None,
        self_check: bool | None = None,
    ):
        super().__init__()
        self.program = program
        self.fitness = fitness
        self.compile = compile
        self.incremental = incremental
        self.conv_backend = conv_backend
        self.sim = FunctionalSim(
            program, device, compile=compile, conv_backend=conv_backend, self_check=self_check
        )
        self.device = self.sim.device
        default = CPU_MAX_ELEMENTS if self.device.type == "cpu" else DEVICE_MAX_ELEMENTS
        self.max_elements = max_elements or default
        self.op_index = {op.name: i for i, op in enumerate(program.ops)}
        macs = [conv_macs(program, op) if isinstance(op, Conv2d) else 0 for op in program.ops]
        self.macs_from = np.cumsum(macs[::-1])[::-1]
        self.env: dict[str, torch.Tensor] = {}
        self.targets = Targets(torch.empty(0, dtype=torch.int64))
        self.op_overflows = np.zeros(len(program.ops), dtype=np.int64)  # the context's, per op

    def simulator(self, program: Program) -> FunctionalSim:
        return FunctionalSim(program, self.device, compile=self.compile, conv_backend=self.conv_backend)

    def set_batch(self, images: torch.Tensor, targets: Targets) -> None:
        self.targets = targets
        self.env = {self.program.input: self.sim.input_carrier(images)}
        self.record_overflows(self.sim.execute(self.env))

    def record_overflows(self, stats: dict[str, LayerStats]) -> None:
        for name, layer in stats.items():
            self.op_overflows[self.op_index[name]] = layer.overflows

    def set_solution(self, params: dict[ParamKey, np.ndarray]) -> int:
        changed = {
            key: np.asarray(v)
            for key, v in params.items()
            if not np.array_equal(v, param_of(self.program.op(key[0]), key[1]))
        }
        if changed:
            self.program = self.program.with_params(changed)
            self.sim = self.simulator(self.program)
            if self.env:
                start = min(self.op_index[name] for name, _ in changed)
                self.record_overflows(self.sim.execute(self.env, start))
        logits = self.env[self.program.output].to(torch.int64).flatten(1)
        overflows = np.array([self.op_overflows.sum()])
        return int(self.fitness.score(logits[None].cpu(), self.targets, overflows)[0])

    def evaluate(self, candidates: dict[ParamKey, np.ndarray]) -> np.ndarray:
        start = min(self.op_index[name] for name, _ in candidates) if self.incremental else 0
        population = len(next(iter(candidates.values())))
        n = len(self.targets.labels)
        per_candidate = n * math.prod(self.program.tensors[self.program.ops[start].input].shape)
        chunk = max(1, self.max_elements // max(per_candidate, 1))
        scores = []
        for s in range(0, population, chunk):
            part = {key: v[s : s + chunk] for key, v in candidates.items()}
            logits, overflows = self.population_logits(start, part)
            scores.append(self.fitness.score(logits, self.targets, overflows))
        self.evaluations += population
        self.macs += population * n * int(self.macs_from[start])
        return np.concatenate(scores)

    def population_logits(
        self, start: int, candidates: dict[ParamKey, np.ndarray]
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Logits (P, N, classes) and, when the fitness counts them, each candidate's
        overflowed outputs over the whole network (P,): batched from `start` when
        incremental (the ops before it are the context's); otherwise, or when the batched
        form cannot run exactly, each candidate's whole program from the image."""
        population = len(next(iter(candidates.values())))
        counting = self.fitness.counts_overflows
        if self.incremental:
            overflows = torch.zeros(population, dtype=torch.int64, device=self.device) if counting else None
            logits = self.sim.run_population(self.env, start, candidates, overflows)
            if logits is not None:
                before = self.op_overflows[:start].sum()
                return logits.cpu(), None if overflows is None else overflows.cpu().numpy() + before
        return self.one_by_one(candidates)

    def one_by_one(self, candidates: dict[ParamKey, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        population = len(next(iter(candidates.values())))
        images = self.env[self.program.input].to(torch.int64)
        logits, overflows = [], []
        for p in range(population):
            program = self.program.with_params({key: v[p] for key, v in candidates.items()})
            result = self.simulator(program).run(images)
            logits.append(result.logits.cpu())
            overflows.append(sum(layer.overflows for layer in result.layers.values()))
        return torch.stack(logits), np.asarray(overflows, dtype=np.int64)


class BrevitasEvaluator(Evaluator):
    """Fitness from Brevitas fake-quant inference (float convolutions), for comparison.

    Candidates' integer weights are written into the Brevitas layers (their weight scales
    are frozen parameters, see hwq.model.QuantLayers); the float logits are rounded to the
    integer program's logit LSB, so both targets share one fitness function.
    """

    def __init__(self, qmodel: torch.nn.Module, program: Program, fitness: IntegerFitness):
        super().__init__()
        self.qmodel = qmodel
        self.fitness = fitness
        self.logit_scale = program.tensors[program.output].scale
        modules = dict(qmodel.named_modules())
        self.layers = {name: modules[path] for name, path in program.meta["weight_sources"].items()}
        self.scales = {name: m.quant_weight().scale.detach() for name, m in self.layers.items()}
        self.macs_per_image = sum(conv_macs(program, op) for op in program.conv_ops())
        self.images = torch.empty(0)
        self.targets = Targets(torch.empty(0, dtype=torch.int64))

    def load(self, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, w in weights.items():
                layer = self.layers[name]
                ints = torch.as_tensor(w, dtype=torch.float32).reshape(layer.weight.shape)
                layer.weight.copy_(ints * self.scales[name])

    def integer_logits(self) -> torch.Tensor:
        return integer_logits(self.qmodel, self.images, self.logit_scale)

    def set_batch(self, images: torch.Tensor, targets: Targets) -> None:
        self.images, self.targets = images, targets

    @staticmethod
    def weights_of(params: dict[ParamKey, np.ndarray]) -> dict[str, np.ndarray]:
        other = sorted(f"{name}.{fld}" for name, fld in params if fld != WEIGHT)
        if other:
            raise HwqError(f"the brevitas target can search weights only, not {', '.join(other)}")
        return {name: v for (name, _), v in params.items()}

    def set_solution(self, params: dict[ParamKey, np.ndarray]) -> int:
        self.context = {name: np.array(w) for name, w in self.weights_of(params).items()}
        self.load(self.context)
        return int(self.fitness.score(self.integer_logits()[None], self.targets)[0])

    def evaluate(self, candidates: dict[ParamKey, np.ndarray]) -> np.ndarray:
        weights = self.weights_of(candidates)
        population = len(next(iter(weights.values())))
        scores = []
        for p in range(population):
            self.load({name: w[p] for name, w in weights.items()})
            scores.append(self.fitness.score(self.integer_logits()[None], self.targets)[0])
        self.load({name: self.context[name] for name in weights})
        self.evaluations += population
        self.macs += population * len(self.targets.labels) * self.macs_per_image
        return np.asarray(scores)
