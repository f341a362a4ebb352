"""`hwq codesign` against a uniform grid over the same space, at an equal wall-clock budget.

First the co-design run of --space (its own generations and budgets); its wall time T is
the grid's budget. The grid (hwq.codesign.grid) is what `hwq sweep` measures: uniform
weight width in every layer, each activation width, accumulator width and overflow mode,
each square array of the space, on the space's first dataflow and buffer sizes, started
as the space starts (sweep without --train-budget). Its points are taken in a seeded
random order until T is spent, each costed and scored by the same code as the co-design
candidates (val accuracy on accel_sim, one per numerics; energy and cycles per image from
the timing model; Yosys area), and only those meeting the space's constraints count, as
for the co-design front. Both hypervolumes are computed against one reference point
(accuracy 0; the largest energy, area and cycles measured by either). The most accurate
uniform W4A8 grid point (measured outside the budget so it is always there) is compared
with the co-design points within 0.5 point of float accuracy. The grid is written to
--out/grid.json, so `hwq report --codesign OUT` draws it beside the front.

    python bench/bench_codesign.py --space examples/codesign/resnet20_space.toml \
        --checkpoint ../shared/models/resnet20-12fca82f.th --data ../shared/data/cifar10-subset \
        --out runs/bench_codesign
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from hwq.codesign.front import hypervolume, non_dominated
from hwq.codesign.grid import grid_designs, measure_grid, write_grid
from hwq.codesign.run import Codesign, CodesignConfig, codesign
from hwq.data import load_split
from hwq.quant.evaluate import evaluate_model
from hwq.quant.model import load_float_model
from hwq.results import write_json

FLOAT_MARGIN = 0.005


def best_w4a8(run: Codesign) -> dict | None:
    """The most accurate uniform W4A8 point of the grid (the lowest energy among equals),
    measured outside the grid's time budget so that it is always there."""
    points, _ = measure_grid(run, math.inf, designs=grid_designs(run, weight_bits=(4,), act_bits=(8,)))
    feasible = [p for p in points if p["feasible"]]
    return min(feasible, key=lambda p: (-p["accuracy"], p["energy_uj"])) if feasible else None


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
    if Path(args.out).exists():
        sys.exit(f"{args.out} exists: the grid's budget is a fresh co-design run's wall time; remove it")
    cfg = CodesignConfig(space=args.space, checkpoint=args.checkpoint, out=args.out, data=args.data)
    start = time.perf_counter()
    summary = codesign(cfg)
    seconds = time.perf_counter() - start
    run = Codesign(cfg, resume=True)
    run.pool.close()
    ours = run.evaluated_points()
    grid_start = time.perf_counter()
    measured, grid_size = measure_grid(run, seconds, args.seed)
    write_grid(run.dir, measured, grid_size, round(time.perf_counter() - grid_start, 1), args.seed)
    grid = [q for q in measured if q["feasible"]]
    objectives = run.space.objectives
    everything = ours + grid
    reference = {"accuracy": 0.0}
    for name, field in (("energy", "energy_uj"), ("area", "area_um2"), ("cycles", "cycles")):
        reference[name] = max(p[field] for p in everything)
    hv_ours, hv_grid = hypervolume(ours, objectives, reference), hypervolume(grid, objectives, reference)
    val = load_split(run.settings.data, "val")
    float_accuracy = evaluate_model(load_float_model(run.settings.checkpoint), val, desc="float").accuracy
    w4a8 = best_w4a8(run)
    close = [q for q in ours if q["accuracy"] >= float_accuracy - FLOAT_MARGIN]
    frugal = min(close, key=lambda q: q["energy_uj"]) if close else None
    result = {
        "codesign_seconds": round(seconds, 1),
        "codesign_candidates": summary["candidates"],
        "codesign_finetuned": summary["finetuned"],
        "grid_points_measured": len(measured),
        "grid_points_feasible": len(grid),
        "grid_size": grid_size,
        "reference": reference,
        "hypervolume_codesign": hv_ours,
        "hypervolume_grid": hv_grid,
        "float_val_accuracy": float_accuracy,
        "best_w4a8_grid_point": w4a8,
        "lowest_energy_codesign_point_within_0.5": frugal,
        "codesign_front": non_dominated(ours, objectives),
        "grid_front": non_dominated(grid, objectives),
    }
    write_json(Path(args.out) / "bench.json", result)
    print(
        f"co-design: {summary['candidates']} designs ({summary['finetuned']} fine-tuned) in {seconds:.0f} s"
    )
    print(f"grid:      {len(measured)} of {grid_size} uniform points in the same time ({len(grid)} feasible)")
    ratio = hv_ours / max(hv_grid, 1e-30)
    print(f"hypervolume  co-design {hv_ours:.4f}  grid {hv_grid:.4f}  ratio {ratio:.2f}x")
    print(f"float val accuracy {100 * float_accuracy:.2f} %")
    print(f"best W4A8 grid point: {describe(w4a8)}")
    print(f"lowest-energy co-design point within 0.5 point of float: {describe(frugal)}")
    print(json.dumps({k: result[k] for k in ("hypervolume_codesign", "hypervolume_grid")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
