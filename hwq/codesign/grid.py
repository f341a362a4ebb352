"""The uniform grid over a co-design space: what `hwq sweep` would measure, costed alike.

A grid point has one weight width in every layer and takes every value of the other
genes that a square array allows (each activation width, accumulator width and overflow
mode, each side in both `rows` and `cols`), on the space's first dataflow and buffer
sizes, started as the space starts (round-to-nearest or PTQ), no CC-EDA. Points are
measured precision by precision in a seeded random order, so a grid cut short by its
time budget is still a fair sample, and each is costed and scored by the same code as a
co-design candidate (one accuracy per numerics_key, as there): the two sets of points
can share one plot and one hypervolume.
`grid.json` (same layout as front.json, every measured point, each marked `feasible` when
it meets the space's constraints) goes beside the front.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..results import write_json
from .candidate import CandidateEvaluator
from .space import Design

if TYPE_CHECKING:
    from .run import Codesign

GRID_FILE = "grid.json"
GRID_DIR = "grid"


def grid_designs(
    run: Codesign, weight_bits: tuple[int, ...] | None = None, act_bits: tuple[int, ...] | None = None
) -> list[Design]:
    s = run.space
    return [
        Design(
            layer_wbits=(wbits,) * len(run.layers),
            act_bits=abits,
            acc_bits=acc,
            overflow=overflow,
            rows=side,
            cols=side,
            dataflow=s.dataflow[0],
            weight_bytes=s.weight_bytes[0],
            input_bytes=s.input_bytes[0],
            output_bytes=s.output_bytes[0],
        )
        for wbits, abits, acc, overflow, side in itertools.product(
            weight_bits or s.weight_bits,
            act_bits or s.act_bits,
            s.acc_bits,
            s.overflow,
            sorted(set(s.rows) & set(s.cols)),
        )
    ]


def grid_order(designs: list[Design], seed: int) -> list[int]:
    """Precisions in a seeded random order, every point of a precision together (one
    lowering per precision, as hwq sweep)."""
    groups: dict[str, list[int]] = {}
    for i, design in enumerate(designs):
        groups.setdefault(design.precision_key, []).append(i)
    keys = list(groups)
    return [i for g in np.random.default_rng(seed).permutation(len(keys)) for i in groups[keys[g]]]


def measure_grid(
    run: Codesign, seconds: float, seed: int = 0, designs: list[Design] | None = None
) -> tuple[list[dict], int]:
    """Grid points (`designs`, by default the whole grid), in grid_order, until `seconds`
    are spent; returns them and the grid's size."""
    from .run import front_point, meets_constraints  # run imports this module

    designs = grid_designs(run) if designs is None else designs
    evaluator = CandidateEvaluator(run.settings)
    points, measured, start = [], {}, time.perf_counter()
    for i in grid_order(designs, seed):
        if time.perf_counter() - start > seconds:
            break
        design = designs[i]
        cost, _ = run.cost(design)
        if cost is None:  # cannot be built
            continue
        key = design.numerics_key  # one accuracy per numerics, as the co-design run measures
        if key not in measured:
            measured[key] = evaluator.screen(design, str(run.dir / GRID_DIR / design.name))
        row = {**measured[key], "generation": -1, "index": i, "phase": "screen"}
        feasible = meets_constraints(run.space, cost, row["accuracy"])
        points.append({**front_point(design, row, cost), "feasible": feasible})
    return points, len(designs)


def write_grid(out: Path, points: list[dict], size: int, seconds: float, seed: int) -> None:
    write_json(out / GRID_FILE, {"grid_size": size, "seconds": seconds, "seed": seed, "points": points})
