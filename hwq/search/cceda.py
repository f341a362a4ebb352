"""Cooperative-coevolution EDA over low-bit integer weights (after Peng et al., arXiv 2112.14834).

The search variables are the integer weights of the chosen layers, flattened into one
vector. Each weight may take the `2*radius + 1` levels around its round-to-nearest value
(clipped to the weight range) and has a categorical distribution over them, initially
concentrated on that value. Cooperative coevolution repeatedly picks the group of weights
whose distributions are least confident (lowest maximum probability) and runs an EDA on
that group alone, every other weight held at the best solution so far (the context).

This module is the search algorithm only (ask/tell, in the EvoTorch manner): it knows
nothing of networks or simulators; `hwq.evaluator` scores what it proposes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from accel_sim.ir import WEIGHT, ParamKey

from .. import HwqError


@dataclass(frozen=True)
class SearchSpace:
    """Which integer weights are searched, where they start and which values they may take.

    `position` is each weight's real value in units of its quantization step (the float
    weight divided by its scale); `base` is its round-to-nearest level. Without a float
    network (a search resumed from an IR) the position is the level itself.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    base: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    radius: int
    position: np.ndarray

    @property
    def size(self) -> int:
        return len(self.base)

    @property
    def levels(self) -> int:
        return 2 * self.radius + 1

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in self.shapes])])

    def layer_index(self) -> np.ndarray:
        """The layer (index into `names`) of every searched weight."""
        return np.repeat(np.arange(len(self.names)), np.diff(self.offsets))

    def valid(self) -> np.ndarray:
        """(size, levels) mask of the levels inside each weight's range."""
        values = self.base[:, None] + np.arange(-self.radius, self.radius + 1)[None, :]
        return (values >= self.lo[:, None]) & (values <= self.hi[:, None])

    def values(self, categories: np.ndarray) -> np.ndarray:
        return self.base + categories - self.radius

    def unflatten(self, values: np.ndarray) -> dict[str, np.ndarray]:
        off = self.offsets
        return {
            n: values[off[i] : off[i + 1]].reshape(s)
            for i, (n, s) in enumerate(zip(self.names, self.shapes, strict=True))
        }

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, np.ndarray],
        bits: dict[str, int],
        radius: int,
        positions: dict[str, np.ndarray] | None = None,
        narrow: bool = True,
    ) -> SearchSpace:
        """Weights of `bits` bits; `narrow` keeps them symmetric ([-(2^(b-1)-1), 2^(b-1)-1])
        like Brevitas' weight quantizers, so the brevitas target can represent every level."""
        if radius < 1:
            raise HwqError(f"search radius must be at least 1 (got {radius})")
        names = tuple(weights)
        base = np.concatenate([weights[n].reshape(-1) for n in names]).astype(np.int64)
        hi = np.concatenate([np.full(weights[n].size, (1 << (bits[n] - 1)) - 1) for n in names])
        lo = -hi if narrow else -hi - 1
        position = base.astype(np.float64)
        if positions is not None:
            position = np.concatenate([np.asarray(positions[n], dtype=np.float64).reshape(-1) for n in names])
            if position.shape != base.shape or np.any(np.abs(position - base) > 0.5 + 1e-6):
                raise HwqError("float positions do not round to the integer weights they start from")
        return cls(names, tuple(weights[n].shape for n in names), base, lo, hi, radius, position)


@dataclass(frozen=True)
class EDAConfig:
    """Hyper-parameters; docs/training.md gives each one's reason and default."""

    population: int = 16
    selected: int = 4
    learning_rate: float = 0.3
    init_sigma: float = 0.4
    min_prob: float = 0.02
    group_size: int = 256
    generations_per_group: int = 4
    group_scope: str = "layer"

    def validate(self) -> None:
        if self.population < 2:
            raise HwqError("--population must be at least 2")
        if not 1 <= self.selected <= self.population:
            raise HwqError("--selected must be between 1 and --population")
        if not 0 < self.learning_rate <= 1:
            raise HwqError("--learning-rate must be in (0, 1]")
        if self.init_sigma <= 0:
            raise HwqError("--init-sigma must be positive")
        if not 0 <= self.min_prob < 0.2:
            raise HwqError("--min-prob must be in [0, 0.2)")
        if self.group_size < 1 or self.generations_per_group < 1:
            raise HwqError("--group-size and --generations-per-group must be positive")
        if self.group_scope not in ("layer", "global"):
            raise HwqError("--group-scope must be 'layer' or 'global'")


def initial_probabilities(space: SearchSpace, sigma: float) -> np.ndarray:
    """A Gaussian of width `sigma` (in levels) around each weight's real position.

    The round-to-nearest level is always the most likely, and the confidence (the largest
    probability) measures how unambiguous the rounding was: a weight that sat halfway
    between two levels starts near 50/50 and is among the first the search examines.
    """
    levels = space.base[:, None] + np.arange(-space.radius, space.radius + 1)[None, :]
    logits = -((levels - space.position[:, None]) ** 2) / (2 * sigma**2)
    logits = np.where(space.valid(), logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def sample_categories(probs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` independent draws per row of `probs` (G, L): returns (count, G) level indices."""
    cumulative = np.cumsum(probs, axis=1)
    cumulative[:, -1] = 1.0
    u = rng.random((count, len(probs)))
    return (u[:, :, None] >= cumulative[None, :, :]).sum(axis=2)


def select_best(fitness: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest fitness values; ties keep the earlier index (stable)."""
    return np.argsort(-fitness, kind="stable")[:k]


def updated_probabilities(
    probs: np.ndarray, chosen: np.ndarray, rate: float, valid: np.ndarray, floor: float = 0.0
) -> np.ndarray:
    """Move each row toward the level frequencies among the selected samples (PBIL/UMDA).

    Every valid level keeps at least `floor` (PBIL's probability margins): without it, the
    distribution of a weight whose better value was never sampled collapses onto the
    incumbent and the search stops exploring it.
    """
    levels = probs.shape[1]
    freq = np.stack([(chosen == level).mean(axis=0) for level in range(levels)], axis=1)
    moved = (1 - rate) * probs + rate * freq
    return with_floor(moved, valid, floor) if floor > 0 else moved


def with_floor(probs: np.ndarray, valid: np.ndarray, floor: float) -> np.ndarray:
    """Raise every valid level to `floor`, taking the mass from the levels above it in
    proportion to their excess, so that a converged weight keeps exactly `floor` on each
    alternative whatever its number of levels (renormalizing instead would leave a weight
    at the edge of the range, with fewer levels, more confident than the rest at rest)."""
    raised = np.where(valid, np.maximum(probs, floor), 0.0)
    over = np.where(valid, np.maximum(probs - floor, 0.0), 0.0)
    total = over.sum(axis=1, keepdims=True)
    excess = raised.sum(axis=1, keepdims=True) - 1
    return raised - np.divide(excess * over, total, out=np.zeros_like(over), where=total > 0)


def confidence(probs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """How sure each weight is of its value: 1 minus the mean probability of its other valid
    levels (the largest probability, for two levels). Every converged weight has exactly
    1 - min_prob, whether it has two levels or five, so none is starved; rounded, so that
    float noise does not order weights that are equally confident."""
    others = np.maximum(valid.sum(axis=1) - 1, 1)
    return np.round(1 - (1 - probs.max(axis=1)) / others, 12)


def least_confident_group(
    confidence: np.ndarray, layer: np.ndarray, size: int, scope: str, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the `size` least confident weights (random tie-break), sorted.

    With scope 'layer', the group is taken within the single layer whose least confident
    `size` weights are least confident on average (ties between layers broken at random),
    so a candidate changes one layer and the evaluator can start from it.
    """
    order = np.lexsort((rng.random(len(confidence)), confidence))
    if scope == "global":
        return np.sort(order[:size])
    ranked_layers = layer[order]
    layers = np.unique(layer)
    groups = [order[ranked_layers == candidate][:size] for candidate in layers]
    means = np.array([confidence[g].mean() for g in groups])
    lowest = np.flatnonzero(means == means.min())
    return np.sort(groups[int(rng.choice(lowest))])


class CCEDA:
    """Ask/tell search state: distributions, the best solution, its fitness, the RNG."""

    def __init__(self, space: SearchSpace, config: EDAConfig, seed: int):
        config.validate()
        if space.levels * config.min_prob > 1:
            raise HwqError(f"--min-prob {config.min_prob} on each of {space.levels} levels exceeds 1")
        self.space = space
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.valid = space.valid()
        self.probs = initial_probabilities(space, config.init_sigma)
        self.best = np.full(space.size, space.radius, dtype=np.int64)
        self.best_fitness: int | None = None
        self.group = np.empty(0, dtype=np.int64)
        self.group_generation = 0
        self.generation = 0
        self.pending: np.ndarray | None = None

    def confidence(self) -> np.ndarray:
        return confidence(self.probs, self.valid)

    def regroup(self) -> None:
        self.group = least_confident_group(
            self.confidence(),
            self.space.layer_index(),
            self.config.group_size,
            self.config.group_scope,
            self.rng,
        )
        self.group_generation = 0

    def needs_group(self) -> bool:
        return len(self.group) == 0 or self.group_generation >= self.config.generations_per_group

    def ask(self) -> np.ndarray:
        """Candidate level indices (P, G) for the current group."""
        if self.needs_group():
            self.regroup()
        self.pending = sample_categories(self.probs[self.group], self.config.population, self.rng)
        return self.pending

    def candidate_values(self, samples: np.ndarray) -> dict[ParamKey, np.ndarray]:
        """Full weight tensors (P, ...) of the layers the group touches, for the evaluator."""
        layer = self.space.layer_index()
        touched = np.unique(layer[self.group])
        off = self.space.offsets
        out = {}
        for index in touched:
            lo, hi = off[index], off[index + 1]
            cats = np.tile(self.best[lo:hi], (len(samples), 1))
            in_layer = (self.group >= lo) & (self.group < hi)
            cats[:, self.group[in_layer] - lo] = samples[:, in_layer]
            values = self.space.base[lo:hi] + cats - self.space.radius
            out[(self.space.names[index], WEIGHT)] = values.reshape(len(samples), *self.space.shapes[index])
        return out

    def tell(self, fitness: np.ndarray) -> bool:
        """Update the group's distributions from the scored candidates; True if the best improved.

        The incumbent best joins the ranking with its known fitness (elitism), so the
        distribution is pulled toward it unless candidates beat it.
        """
        if self.pending is None or self.best_fitness is None:
            raise RuntimeError("tell() needs a prior ask() and a scored best solution")
        samples, self.pending = self.pending, None
        pool = np.vstack([samples, self.best[self.group][None, :]])
        scores = np.append(np.asarray(fitness, dtype=np.int64), self.best_fitness)
        chosen = pool[select_best(scores, self.config.selected)]
        self.probs[self.group] = updated_probabilities(
            self.probs[self.group],
            chosen,
            self.config.learning_rate,
            self.valid[self.group],
            self.config.min_prob,
        )
        self.group_generation += 1
        self.generation += 1
        winner = int(np.argmax(fitness))
        if fitness[winner] > self.best_fitness:
            self.best[self.group] = samples[winner]
            self.best_fitness = int(fitness[winner])
            return True
        return False

    def best_values(self) -> np.ndarray:
        return self.space.values(self.best)

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "rng": self.rng.bit_generator.state,
            "probs": self.probs,
            "best": self.best,
            "best_fitness": self.best_fitness,
            "group": self.group,
            "group_generation": self.group_generation,
            "generation": self.generation,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config):
            raise HwqError("the checkpoint was made with other search settings; resume with the same ones")
        self.rng.bit_generator.state = state["rng"]
        self.probs = np.asarray(state["probs"], dtype=np.float64)
        self.best = np.asarray(state["best"], dtype=np.int64)
        self.best_fitness = state["best_fitness"]
        self.group = np.asarray(state["group"], dtype=np.int64)
        self.group_generation = int(state["group_generation"])
        self.generation = int(state["generation"])
