"""Which integer parameters of a program the search may change, and within which ranges.

Every number the accelerator uses is an integer the search could choose. Besides the
weights (one integer level per step, `cceda.weight_block`), a layer's per-output-channel
integer **bias** (in accumulator LSBs; it starts the accumulator, docs/datapath.md) and
its requantization **multiplier** (the per-channel gain) can be searched, each in steps
sized to what they change:

- a bias step is one output LSB of its channel, `2**shift / |mult|` accumulator LSBs (at
  least one);
- a multiplier step is 1/MULT_STEP_DIVISOR of its value (at least one), about 3 % of the
  channel's gain; a multiplier keeps its sign (it never reaches zero).

Both start with BIAS_RADIUS = MULT_RADIUS = 1 step each side, like the weights, and widen
with `--widen-after` as the weights do.

Nothing says which way a bias or a gain should move, so their initial distributions are
flat (PRIOR_SIGMA): the least confident parameters of the space (a flat three-level
distribution is less sure than any weight's prior, even a weight halfway between two
levels), they are the first the cooperative coevolution visits, and cheap to score (few
per layer, evaluated from their layer on). With the weights' prior (0.4 levels) they would
look surer than every ambiguous weight and wait behind all of them.

The ranges stay inside the IR's limits: |bias| and |mult| are bounded by the validator
(MAX_OFFSET, `mult_bits`), and the requantization bound grows with |mult|. Every check of
the validator is monotone in each parameter's magnitude and the parameters are boxed
independently, so a program with every searched parameter at the end of its range that
lies farther from zero passes the validator if and only if every candidate does;
`check_extremes` proves it before the search starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from accel_sim.ir import BIAS, MAX_OFFSET, MULT, WEIGHT, Conv2d, IRError, ParamKey, Program

from .. import HwqError
from .cceda import ParamBlock, SearchSpace, weight_block

# --search names, as the user writes them, and the IR field each one searches.
SEARCHABLE = {"weights": WEIGHT, "bias": BIAS, "mult": MULT}
BIAS_RADIUS = 1
MULT_RADIUS = 1
MULT_STEP_DIVISOR = 32
PRIOR_SIGMA = math.inf  # flat


def parse_search(text: str) -> tuple[str, ...]:
    """`weights,bias,mult` (any non-empty subset, in any order) as the canonical tuple."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SEARCHABLE]
    if unknown or not names:
        raise HwqError(f"--search {text!r}: choose from {','.join(SEARCHABLE)} (comma-separated)")
    return tuple(n for n in SEARCHABLE if n in names)


def stepped_block(
    op: str,
    field: str,
    base: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    step: np.ndarray,
    radius: int,
    max_radius: int,
) -> ParamBlock:
    """A per-channel block whose levels are `step` apart, centred on `base`, with a flat prior."""
    position = base.astype(np.float64)
    return ParamBlock(op, field, base.shape, base, lo, hi, position, radius, max_radius, step, PRIOR_SIGMA)


def bias_block(op: Conv2d, max_radius: int) -> ParamBlock:
    """The conv's integer biases, in steps of one output LSB of each channel."""
    base = op.bias.astype(np.int64)
    mult = np.abs(op.requant.mult.astype(np.int64))
    out_lsb = np.where(mult > 0, (1 << op.requant.shift.astype(np.int64)) // np.maximum(mult, 1), 1)
    step = np.maximum(out_lsb, 1)
    reach = step * max_radius
    limit = MAX_OFFSET - 1
    lo = np.where(mult > 0, np.maximum(base - reach, -limit), base)  # a dead channel stays as it is
    hi = np.where(mult > 0, np.minimum(base + reach, limit), base)
    return stepped_block(op.name, BIAS, base, lo, hi, step, BIAS_RADIUS, max_radius)


def mult_block(op: Conv2d, mult_bits: int, max_radius: int) -> ParamBlock:
    """The conv's requantization multipliers, in steps of 1/MULT_STEP_DIVISOR of each value,
    never changing sign and within `mult_bits` bits."""
    base = op.requant.mult.astype(np.int64)
    magnitude = np.abs(base)
    step = np.maximum(magnitude // MULT_STEP_DIVISOR, 1)
    reach = step * max_radius
    largest = (1 << (mult_bits - 1)) - 1
    low = np.clip(magnitude - reach, 1, None)
    high = np.minimum(magnitude + reach, largest)
    sign = np.sign(base)
    lo = np.where(sign > 0, low, np.where(sign < 0, -high, 0))
    hi = np.where(sign > 0, high, np.where(sign < 0, -low, 0))
    return stepped_block(op.name, MULT, base, lo, hi, step, MULT_RADIUS, max_radius)


def program_space(
    program: Program,
    layers: Sequence[str] | None,
    search: Sequence[str],
    radius: int,
    max_radius: int,
    positions: dict[str, np.ndarray],
    narrow: bool = True,
) -> SearchSpace:
    """The search space over `layers` (default every conv): their weights at `radius`
    (widening up to `max_radius`, within the narrow or full range), then, as `search` asks,
    their biases and multipliers (widening as far beyond their own radius as the weights may)."""
    convs = {op.name: op for op in program.conv_ops()}
    names = tuple(layers or convs)
    unknown = [n for n in names if n not in convs]
    if unknown:
        raise HwqError(f"--layers names unknown layers {unknown}; the program has {list(convs)}")
    extra = max_radius - radius
    blocks: list[ParamBlock] = []
    if "weights" in search:
        blocks += [
            weight_block(
                n, convs[n].weight, convs[n].weight_bits, radius, positions.get(n), max_radius, narrow
            )
            for n in names
        ]
    if "bias" in search:
        blocks += [bias_block(convs[n], BIAS_RADIUS + extra) for n in names]
    if "mult" in search:
        blocks += [mult_block(convs[n], program.mult_bits, MULT_RADIUS + extra) for n in names]
    space = SearchSpace(tuple(blocks))
    check_extremes(program, space)
    return space


def extremes(space: SearchSpace) -> dict[ParamKey, np.ndarray]:
    """Every parameter at the end of its range farther from zero."""
    far = np.where(np.abs(space.hi) >= np.abs(space.lo), space.hi, space.lo)
    return space.unflatten(far)


def check_extremes(program: Program, space: SearchSpace) -> None:
    """Refuse a space whose candidates the validator could reject (see the module's doc)."""
    try:
        program.with_params(extremes(space))
    except IRError as exc:
        raise HwqError(f"the search ranges reach a program the IR rejects: {exc}") from None
