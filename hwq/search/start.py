"""Where a search starts: the round-to-nearest program, or a given one (`--init-ir`).

A given program (GPTQ's, QAT's, A2Q's, an earlier run's) must have the architecture the
checkpoint lowers to at the run's settings: the same ops in the same order over the same
tensors, with the same shapes, bit widths, signedness and zero points; the first
difference is named. Its integer weights become the search's base (the level each
weight's distribution is centred on) and its requantization and biases are used as they
are. The prior over levels comes from the float checkpoint where the program's scales
are the lowering's (its requantization equals the fresh lowering's: round-to-nearest,
GPTQ, GPFQ, learned round, CC-EDA keep the scales); elsewhere (QAT, A2Q learn scales)
the float weights are in other units and each weight's prior is centred on its level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from accel_sim.ir import Conv2d, Program, Requant, load_program, program_digest

from .. import HwqError
from .cceda import weight_levels

POSITIONS_FROM_CHECKPOINT = "checkpoint"  # float weight / the lowering's weight scale
POSITIONS_FROM_LEVELS = "levels"  # the init program's integer levels


@dataclass(frozen=True)
class Start:
    program: Program
    positions: dict[str, np.ndarray]
    source: str  # POSITIONS_FROM_CHECKPOINT or POSITIONS_FROM_LEVELS
    clipped: int  # weights whose float position lay beyond half a level from the init level


def init_digest(path: str) -> str:
    return program_digest(load_program(path))


def structure_mismatch(given: Program, reference: Program) -> str | None:
    """The first difference in architecture, shapes or widths, or None."""
    if given.mult_bits != reference.mult_bits:
        return f"mult_bits is {given.mult_bits}, expected {reference.mult_bits}"
    for i, (a, b) in enumerate(zip(given.ops, reference.ops, strict=False), 1):
        if (a.name, a.kind) != (b.name, b.kind):
            return f"op {i} is {a.kind} {a.name}, expected {b.kind} {b.name}"
        problem = op_mismatch(a, b) or tensor_mismatch(given, reference, a.input, a.output)
        if problem:
            return f"op {a.name}: {problem}"
    if len(given.ops) != len(reference.ops):
        return f"it has {len(given.ops)} ops, expected {len(reference.ops)}"
    if (given.input, given.output) != (reference.input, reference.output):
        return "its input or output tensor differs"
    return None


def op_mismatch(a: object, b: object) -> str | None:
    fields = ["input", "output"]
    if isinstance(a, Conv2d):
        fields += ["weight_bits", "stride", "padding"]
        if a.weight.shape != b.weight.shape:
            return f"weight shape is {a.weight.shape}, expected {b.weight.shape}"
    for name in fields:
        if getattr(a, name) != getattr(b, name):
            return f"{name} is {getattr(a, name)}, expected {getattr(b, name)}"
    ra, rb = a.requant.residual, b.requant.residual
    if (ra is None) != (rb is None):
        return "residual input differs"
    if ra is not None and (ra.input, ra.stride, tuple(ra.channel_pad)) != (
        rb.input,
        rb.stride,
        tuple(rb.channel_pad),
    ):
        return f"residual is {ra.input} (stride {ra.stride}), expected {rb.input} (stride {rb.stride})"
    return None


def tensor_mismatch(given: Program, reference: Program, *names: str) -> str | None:
    for name in names:
        a, b = given.tensors.get(name), reference.tensors.get(name)
        if a is None:
            return f"tensor {name} is missing"
        for attr in ("shape", "bits", "signed"):
            if tuple(np.atleast_1d(getattr(a, attr))) != tuple(np.atleast_1d(getattr(b, attr))):
                return f"tensor {name} {attr} is {getattr(a, attr)}, expected {getattr(b, attr)}"
        if tuple(a.zero_point) != tuple(b.zero_point):
            return f"tensor {name} zero point is {a.zero_point}, expected {b.zero_point}"
    return None


def same_requant(a: Requant, b: Requant) -> bool:
    arrays = [(a.mult, b.mult), (a.shift, b.shift), (a.offset, b.offset)]
    if a.residual is not None and b.residual is not None:
        arrays += [(a.residual.mult, b.residual.mult), (a.residual.shift, b.residual.shift)]
    return all(np.array_equal(x, y) for x, y in arrays)


def same_scales(given: Program, reference: Program) -> bool:
    """True when the program requantizes exactly as the lowering does, so its weights are
    in the units of the lowering's weight scales."""
    return all(
        same_requant(a.requant, b.requant) and np.array_equal(getattr(a, "bias", 0), getattr(b, "bias", 0))
        for a, b in zip(given.ops, reference.ops, strict=True)
    )


def check_weight_range(program: Program, path: str, narrow: bool) -> None:
    """The search keeps weights in the run's range (Brevitas' narrow or full); a base
    outside it has no level."""
    for op in program.conv_ops():
        lo, hi = weight_levels(op.weight_bits, narrow)
        if op.weight.size and (op.weight.min() < lo or op.weight.max() > hi):
            hint = " (a program of --weight-range full?)" if narrow else ""
            raise HwqError(
                f"--init-ir {path}: op {op.name} has a weight outside the "
                f"{'narrow' if narrow else 'full'} range [{lo}, {hi}] that the search uses{hint}"
            )


def start_from(
    path: str,
    reference: Program,
    checkpoint_positions: dict[str, np.ndarray],
    what: str,
    narrow: bool = True,
) -> Start:
    """The given program as the search's start, checked against the lowered `reference`.

    `checkpoint_positions` are the float weights in units of the lowering's weight scales;
    where the program shares those scales they are kept within half a level of the
    program's own level (so that level stays the most likely), otherwise replaced by it."""
    program = load_program(path)
    problem = structure_mismatch(program, reference)
    if problem:
        raise HwqError(f"--init-ir {path} does not match the program lowered from {what}: {problem}")
    check_weight_range(program, path, narrow)
    program = program.with_accumulator(reference.accumulator)
    levels = {op.name: op.weight.astype(np.float64) for op in program.conv_ops()}
    if not same_scales(program, reference):
        return Start(program, levels, POSITIONS_FROM_LEVELS, 0)
    positions, clipped = {}, 0
    for name, level in levels.items():
        position = np.clip(checkpoint_positions[name], level - 0.5, level + 0.5)
        clipped += int((position != checkpoint_positions[name]).sum())
        positions[name] = position
    return Start(program, positions, POSITIONS_FROM_CHECKPOINT, clipped)
