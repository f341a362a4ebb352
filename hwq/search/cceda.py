"""Cooperative-coevolution EDA over integer parameters (after Peng et al., arXiv 2112.14834).

The search variables are integer parameters of the network, in named blocks (a layer's
weights; later also its per-channel biases and multipliers), flattened into one vector.
Each parameter may take the levels within its radius of its starting value (clipped to
its block's range) and has a categorical distribution over them. Cooperative
coevolution repeatedly picks the group of parameters whose distributions are least
confident and runs an EDA on that group alone, every other parameter held at the best
solution so far (the context). A parameter whose distribution stays flat over several
visits may have its radius widened (`--widen-after`), up to its block's `max_radius`.

This module is the search algorithm only (ask/tell, in the EvoTorch manner): it knows
nothing of networks or simulators; `hwq.search.evaluator` scores what it proposes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from accel_sim.ir import WEIGHT, ParamKey

from .. import HwqError


@dataclass(frozen=True)
class ParamBlock:
    """One op's field of integer parameters, with where each starts and what it may take.

    `position` is each parameter's real value in units of its quantization step (for a
    weight, the float weight divided by its scale); `base` is its starting level (the
    round-to-nearest one). `lo`/`hi` bound every level; a parameter starts with `radius`
    levels each side and may be widened to `max_radius`. Level `k` of a parameter is the
    value `base + k * step`: a weight moves by one integer level, a bias or a multiplier
    (hwq.search.space) by a step sized to what it changes.
    """

    op: str
    field: str
    shape: tuple[int, ...]
    base: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    position: np.ndarray
    radius: int
    max_radius: int
    step: np.ndarray | None = None  # per parameter, >= 1; None: 1
    prior_sigma: float | None = None  # width in levels of the initial distributions; None: --init-sigma

    @property
    def steps(self) -> np.ndarray:
        return np.ones(self.size, dtype=np.int64) if self.step is None else self.step

    @property
    def key(self) -> ParamKey:
        return (self.op, self.field)

    @property
    def size(self) -> int:
        return len(self.base)

    def validate(self) -> None:
        if self.radius < 1:
            raise HwqError(f"search radius must be at least 1 (got {self.radius})")
        if self.max_radius < self.radius:
            raise HwqError(f"--max-radius {self.max_radius} is below the radius {self.radius}")
        if np.any(self.base < self.lo) or np.any(self.base > self.hi):
            raise HwqError(f"{self.op}.{self.field} starts outside its range")
        if self.steps.shape != self.base.shape or np.any(self.steps < 1):
            raise HwqError(f"{self.op}.{self.field}: steps must be positive, one per parameter")
        if np.any(np.abs(self.position - self.base) > 0.5 + 1e-6):
            raise HwqError("float positions do not round to the integer weights they start from")


def weight_levels(bits: int, narrow: bool) -> tuple[int, int]:
    """The lowest and highest level of a `bits`-bit weight: symmetric when `narrow`, like
    Brevitas' default quantizers, else the whole two's-complement range (--weight-range)."""
    hi = (1 << (bits - 1)) - 1
    return (-hi if narrow else -hi - 1), hi


def weight_block(
    op: str,
    weight: np.ndarray,
    bits: int,
    radius: int,
    position: np.ndarray | None = None,
    max_radius: int | None = None,
    narrow: bool = True,
) -> ParamBlock:
    """A layer's `bits`-bit weights within `weight_levels`, the run's quantizer's range, so
    the brevitas target can represent every level. Without a float network (a search
    resumed from an IR) the position is the level itself."""
    base = np.asarray(weight).reshape(-1).astype(np.int64)
    low, high = weight_levels(bits, narrow)
    lo, hi = np.full(base.shape, low, dtype=np.int64), np.full(base.shape, high, dtype=np.int64)
    pos = base.astype(np.float64) if position is None else np.asarray(position, np.float64).reshape(-1)
    if pos.shape != base.shape:
        raise HwqError("float positions do not round to the integer weights they start from")
    block = ParamBlock(op, WEIGHT, tuple(weight.shape), base, lo, hi, pos, radius, max_radius or radius)
    block.validate()
    return block


@dataclass(frozen=True)
class SearchSpace:
    """The searched parameters: a sequence of blocks, flattened in order.

    Levels are indexed by category `0 .. 2*max_radius`, category `max_radius` being the
    starting value, for every parameter whatever its own radius: a narrower parameter has
    its outer categories invalid (probability 0), so widening one only validates levels.
    """

    blocks: tuple[ParamBlock, ...]

    def __post_init__(self) -> None:
        keys = [b.key for b in self.blocks]
        if len(set(keys)) != len(keys):
            raise HwqError(f"a parameter block is listed twice: {keys}")

    @cached_property
    def base(self) -> np.ndarray:
        return np.concatenate([b.base for b in self.blocks])

    @cached_property
    def lo(self) -> np.ndarray:
        return np.concatenate([b.lo for b in self.blocks])

    @cached_property
    def hi(self) -> np.ndarray:
        return np.concatenate([b.hi for b in self.blocks])

    @cached_property
    def position(self) -> np.ndarray:
        return np.concatenate([b.position for b in self.blocks])

    @cached_property
    def step(self) -> np.ndarray:
        """Every parameter's value step between adjacent levels."""
        return np.concatenate([b.steps for b in self.blocks])

    def prior_sigma(self, default: float) -> np.ndarray:
        """Every parameter's initial width in levels: its block's, or `default`."""
        widths = [default if b.prior_sigma is None else b.prior_sigma for b in self.blocks]
        return np.repeat(widths, [b.size for b in self.blocks])

    @cached_property
    def radius(self) -> np.ndarray:
        """Every parameter's starting radius."""
        return np.repeat([b.radius for b in self.blocks], [b.size for b in self.blocks])

    @cached_property
    def max_radius(self) -> np.ndarray:
        """How far every parameter's radius may be widened."""
        return np.repeat([b.max_radius for b in self.blocks], [b.size for b in self.blocks])

    @property
    def width(self) -> int:
        """The largest radius of any parameter; categories run over `2*width + 1` levels."""
        return int(max(b.max_radius for b in self.blocks))

    @property
    def levels(self) -> int:
        return 2 * self.width + 1

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def keys(self) -> tuple[ParamKey, ...]:
        return tuple(b.key for b in self.blocks)

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([b.size for b in self.blocks])])

    @cached_property
    def block_index(self) -> np.ndarray:
        """The block (index into `blocks`) of every parameter."""
        return np.repeat(np.arange(len(self.blocks)), [b.size for b in self.blocks])

    @property
    def level_offsets(self) -> np.ndarray:
        """(levels,) the level offset of each category: -width .. width."""
        return np.arange(-self.width, self.width + 1)

    def valid(self, radius: np.ndarray | None = None, index: np.ndarray | None = None) -> np.ndarray:
        """(n, levels) mask of the levels within each parameter's radius (its starting one,
        or `radius`) and inside its range; for all parameters, or those at `index`."""
        index = slice(None) if index is None else index
        radius = self.radius[index] if radius is None else radius
        offsets = self.level_offsets[None, :]
        values = self.base[index, None] + offsets * self.step[index, None]
        inside = (values >= self.lo[index, None]) & (values <= self.hi[index, None])
        return inside & (np.abs(offsets) <= np.asarray(radius)[:, None])

    def values(self, categories: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """Parameter values of category indices (of all parameters, or those at `index`)."""
        index = slice(None) if index is None else index
        return self.base[index] + (categories - self.width) * self.step[index]

    def unflatten(self, values: np.ndarray) -> dict[ParamKey, np.ndarray]:
        off = self.offsets
        return {b.key: values[off[i] : off[i + 1]].reshape(b.shape) for i, b in enumerate(self.blocks)}

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, np.ndarray],
        bits: dict[str, int],
        radius: int,
        positions: dict[str, np.ndarray] | None = None,
        narrow: bool = True,
        max_radius: int | None = None,
    ) -> SearchSpace:
        """The weights of the given layers, one block each (see `weight_block`)."""
        return cls(
            tuple(
                weight_block(
                    n, w, bits[n], radius, None if positions is None else positions[n], max_radius, narrow
                )
                for n, w in weights.items()
            )
        )


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
    widen_after: int = 0
    widen_below: float = 0.75

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
        if self.widen_after < 0:
            raise HwqError("--widen-after must be 0 (off) or a number of visits")
        if not 0 < self.widen_below <= 1:
            raise HwqError("--widen-below must be in (0, 1]")


def initial_probabilities(space: SearchSpace, sigma: float) -> np.ndarray:
    """A Gaussian of width `sigma` (in levels; a block may set its own) around each
    parameter's real position, over the levels within its starting radius.

    The round-to-nearest level is always the most likely, and the confidence (the largest
    probability) measures how unambiguous the rounding was: a weight that sat halfway
    between two levels starts near 50/50 and is among the first the search examines.
    """
    centre = (space.position - space.base) / space.step  # in levels
    width = space.prior_sigma(sigma)[:, None]
    logits = -((space.level_offsets[None, :] - centre[:, None]) ** 2) / (2 * width**2)
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


def widened_probabilities(probs: np.ndarray, old: np.ndarray, new: np.ndarray, floor: float) -> np.ndarray:
    """Distributions over a wider set of valid levels (`new` includes `old`).

    Each new level starts at half the probability of its inner neighbour (the level one
    step closer to the start), as if the distribution's tail went on, then every row is
    renormalized and floored: a flat distribution spreads onto the new levels, a peaked
    one barely notices them.
    """
    width = probs.shape[1] // 2
    out = np.where(old, probs, 0.0)
    added = new & ~old
    for distance in range(1, width + 1):
        for side in (-1, 1):
            category = width + side * distance
            rows = added[:, category]
            out[rows, category] = out[rows, category - side] / 2
    out /= out.sum(axis=1, keepdims=True)
    return with_floor(out, new, floor) if floor > 0 else out


class CCEDA:
    """Ask/tell search state: distributions, radii, the best solution, its fitness, the RNG."""

    def __init__(self, space: SearchSpace, config: EDAConfig, seed: int):
        config.validate()
        if space.levels * config.min_prob > 1:
            raise HwqError(f"--min-prob {config.min_prob} on each of {space.levels} levels exceeds 1")
        self.space = space
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.radius = space.radius.copy()
        self.valid = space.valid(self.radius)
        self.visits = np.zeros(space.size, dtype=np.int64)
        self.probs = initial_probabilities(space, config.init_sigma)
        self.best = np.full(space.size, space.width, dtype=np.int64)
        self.best_fitness: int | None = None
        self.group = np.empty(0, dtype=np.int64)
        self.group_generation = 0
        self.generation = 0
        self.pending: np.ndarray | None = None

    def confidence(self) -> np.ndarray:
        return confidence(self.probs, self.valid)

    def regroup(self) -> None:
        self.leave_group()
        self.group = least_confident_group(
            self.confidence(),
            self.space.block_index,
            self.config.group_size,
            self.config.group_scope,
            self.rng,
        )
        self.group_generation = 0

    def leave_group(self) -> None:
        """Count the visit of the group's parameters and widen those that stayed flat."""
        self.visits[self.group] += 1
        if self.config.widen_after:
            self.widen(self.flat_after_visits(self.group))

    def flat_after_visits(self, index: np.ndarray) -> np.ndarray:
        """The parameters at `index` whose every `widen_after`-th visit left them less
        confident than `widen_below`, and that may still widen."""
        due = self.visits[index] % self.config.widen_after == 0
        flat = confidence(self.probs[index], self.valid[index]) < self.config.widen_below
        return index[due & flat & (self.radius[index] < self.space.max_radius[index])]

    def widen(self, index: np.ndarray) -> None:
        """One more level each side for the parameters at `index`, within their range."""
        if len(index) == 0:
            return
        self.radius[index] += 1
        wider = self.space.valid(self.radius[index], index)
        floor = self.config.min_prob
        self.probs[index] = widened_probabilities(self.probs[index], self.valid[index], wider, floor)
        self.valid[index] = wider

    def needs_group(self) -> bool:
        return len(self.group) == 0 or self.group_generation >= self.config.generations_per_group

    def ask(self) -> np.ndarray:
        """Candidate level indices (P, G) for the current group."""
        if self.needs_group():
            self.regroup()
        self.pending = sample_categories(self.probs[self.group], self.config.population, self.rng)
        return self.pending

    def candidate_values(self, samples: np.ndarray) -> dict[ParamKey, np.ndarray]:
        """Whole blocks (P, ...) of the blocks the group touches, for the evaluator."""
        touched = np.unique(self.space.block_index[self.group])
        off = self.space.offsets
        out = {}
        for index in touched:
            lo, hi = off[index], off[index + 1]
            cats = np.tile(self.best[lo:hi], (len(samples), 1))
            in_block = (self.group >= lo) & (self.group < hi)
            cats[:, self.group[in_block] - lo] = samples[:, in_block]
            block = self.space.blocks[index]
            out[block.key] = self.space.values(cats, np.arange(lo, hi)).reshape(len(samples), *block.shape)
        return out

    def tell(self, fitness: np.ndarray, holds: Callable[[int], bool] | None = None) -> bool:
        """Update the group's distributions from the scored candidates; True if the best improved.

        The incumbent best joins the ranking with its known fitness (elitism), so the
        distribution is pulled toward it unless candidates beat it. The winner replaces the
        best only if it beats it and, when `holds` is given, `holds(winner)` confirms it.
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
        if fitness[winner] > self.best_fitness and (holds is None or holds(winner)):
            self.best[self.group] = samples[winner]
            self.best_fitness = int(fitness[winner])
            return True
        return False

    def best_values(self) -> np.ndarray:
        return self.space.values(self.best)

    def state_dict(self) -> dict:
        """JSON values and numpy arrays only."""
        return {
            "config": asdict(self.config),
            "rng": self.rng.bit_generator.state,
            "probs": self.probs,
            "radius": self.radius,
            "visits": self.visits,
            "best": self.best,
            "best_fitness": self.best_fitness,
            "group": self.group,
            "group_generation": self.group_generation,
            "generation": self.generation,
        }

    def load_state_dict(self, state: dict) -> None:
        if EDAConfig(**state["config"]) != self.config:
            raise HwqError("the checkpoint was made with other search settings; resume with the same ones")
        self.rng.bit_generator.state = state["rng"]
        self.probs = np.array(state["probs"], dtype=np.float64)
        self.radius = np.array(state.get("radius", self.space.radius), dtype=np.int64)
        self.valid = self.space.valid(self.radius)
        self.visits = np.array(state.get("visits", np.zeros(self.space.size)), dtype=np.int64)
        self.best = np.array(state["best"], dtype=np.int64)
        self.best_fitness = state["best_fitness"]
        self.group = np.array(state["group"], dtype=np.int64)
        self.group_generation = int(state["group_generation"])
        self.generation = int(state["generation"])
