"""`hwq codesign` against a uniform grid over the same space, at an equal wall-clock budget.

First the co-design run of --space (its own generations and budgets); its wall time T is
the grid's budget. The grid is what `hwq sweep` measures: uniform weight width in every
layer, each activation width, accumulator width and overflow mode, each square array of
the space, on the space's first dataflow and buffer sizes, round-to-nearest (sweep
without --train-budget). Its points are taken in a seeded random order until T is spent,
each costed and scored by the same code as the co-design candidates (accuracy on the val
split on accel_sim, energy and cycles per image from the timing model, Yosys area). Both
fronts' hypervolumes are computed against one reference point (accuracy 0; the largest
energy, area and cycles measured by either), and the best uniform W4A8 grid point is
compared with the co-design points within 0.5 point of float accuracy.

    python bench/bench_codesign.py --space examples/codesign/resnet20_space.toml \
        --checkpoint ../shared/models/resnet20-12fca82f.th --data ../shared/data/cifar10-subset \
        --out runs/bench_codesign
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from accel_sim.ir import IRError
from hwq.codesign.candidate import CandidateEvaluator
from hwq.codesign.cost import AreaModel, hardware_cost
from hwq.codesign.front import hypervolume, non_dominated
from hwq.codesign.run import AREA_FILE, Codesign, CodesignConfig, codesign, front_point
from hwq.codesign.space import Design
from hwq.data import load_split
from hwq.quant.evaluate import evaluate_model
from hwq.quant.model import load_float_model
from hwq.results import write_json

FLOAT_MARGIN = 0.005


def grid_designs(run: Codesign) -> list[Design]:
    s = run.space
    designs = []
    for wbits, abits, acc, overflow, side in itertools.product(
        s.weight_bits, s.act_bits, s.acc_bits, s.overflow, sorted(set(s.rows) & set(s.cols))
    ):
        designs.append(
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
        )
    return designs


def run_grid(run: Codesign, seconds: float, seed: int) -> tuple[list[dict], int]:
    """Grid points until `seconds` are spent: precisions in a seeded random order, every
    point of a precision together."""
    designs = grid_designs(run)
    groups: dict[str, list[int]] = {}
    for i, design in enumerate(designs):  # one lowering per precision, as hwq sweep
        groups.setdefault(design.precision_key, []).append(i)
    keys = list(groups)
    order = [i for g in np.random.default_rng(seed).permutation(len(keys)) for i in groups[keys[g]]]
    evaluator = CandidateEvaluator(run.settings)
    area = AreaModel(run.dir / AREA_FILE)
    points, start = [], time.perf_counter()
    for i in order:
        if time.perf_counter() - start > seconds:
            break
        design = designs[i]
        try:
            accelerator = run.space.accelerator(design)
        except IRError:
            continue
        cost = hardware_cost(run.reference, design, accelerator, area)
        row = evaluator.screen(design, str(run.dir / "grid" / design.name))
        points.append(
            front_point(design, {**row, "generation": -1, "index": int(i), "phase": "screen"}, cost)
        )
    return points, len(designs)


def describe(point: dict | None) -> str:
    if point is None:
        return "none"
    return f"{point['name']} {100 * point['accuracy']:.2f} % {point['energy_uj']:.2f} uJ/image"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="order of the grid points")
    args = p.parse_args()
    cfg = CodesignConfig(space=args.space, checkpoint=args.checkpoint, out=args.out, data=args.data)
    start = time.perf_counter()
    summary = codesign(cfg, resume=(Path(args.out) / "codesign.json").exists())
    seconds = time.perf_counter() - start
    run = Codesign(cfg, resume=True)
    run.pool.close()
    ours = run.evaluated_points()
    grid, grid_size = run_grid(run, seconds, args.seed)
    objectives = run.space.objectives
    everything = ours + grid
    reference = {"accuracy": 0.0}
    for name, field in (("energy", "energy_uj"), ("area", "area_um2"), ("cycles", "cycles")):
        reference[name] = max(p[field] for p in everything)
    hv_ours, hv_grid = hypervolume(ours, objectives, reference), hypervolume(grid, objectives, reference)
    val = load_split(run.settings.data, "val")
    float_accuracy = evaluate_model(load_float_model(run.settings.checkpoint), val, desc="float").accuracy
    w4a8 = [q for q in grid if set(q["layer_wbits"]) == {4} and q["act_bits"] == 8]
    best_w4a8 = min(w4a8, key=lambda q: q["energy_uj"]) if w4a8 else None
    close = [q for q in ours if q["accuracy"] >= float_accuracy - FLOAT_MARGIN]
    frugal = min(close, key=lambda q: q["energy_uj"]) if close else None
    result = {
        "codesign_seconds": round(seconds, 1),
        "codesign_candidates": summary["candidates"],
        "codesign_finetuned": summary["finetuned"],
        "grid_points_measured": len(grid),
        "grid_size": grid_size,
        "reference": reference,
        "hypervolume_codesign": hv_ours,
        "hypervolume_grid": hv_grid,
        "float_val_accuracy": float_accuracy,
        "best_w4a8_grid_point": best_w4a8,
        "lowest_energy_codesign_point_within_0.5": frugal,
        "codesign_front": non_dominated(ours, objectives),
        "grid_front": non_dominated(grid, objectives),
    }
    write_json(Path(args.out) / "bench.json", result)
    print(
        f"co-design: {summary['candidates']} designs ({summary['finetuned']} fine-tuned) in {seconds:.0f} s"
    )
    print(f"grid:      {len(grid)} of {grid_size} uniform points in the same time")
    ratio = hv_ours / max(hv_grid, 1e-30)
    print(f"hypervolume  co-design {hv_ours:.4f}  grid {hv_grid:.4f}  ratio {ratio:.2f}x")
    print(f"float val accuracy {100 * float_accuracy:.2f} %")
    print(f"best W4A8 grid point: {describe(best_w4a8)}")
    print(f"lowest-energy co-design point within 0.5 point of float: {describe(frugal)}")
    print(json.dumps({k: result[k] for k in ("hypervolume_codesign", "hypervolume_grid")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
