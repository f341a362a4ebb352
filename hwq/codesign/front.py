"""The Pareto front of evaluated designs, its files, and its hypervolume.

Objectives are minimized as pymoo minimizes them: accuracy enters as its negative. The
front holds every feasible design no other feasible design dominates, over all
generations (not only the last population: a design NSGA-II dropped may still be on the
front of everything measured). front.json and front.csv carry, per point, its IR file and
everything measured about it.
"""

from __future__ import annotations

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from ..results import write_csv, write_json

OBJECTIVE_FIELDS = {"accuracy": "accuracy", "energy": "energy_uj", "area": "area_um2", "cycles": "cycles"}


def minimized(points: list[dict], objectives: tuple[str, ...]) -> np.ndarray:
    """(n, objectives) array to minimize: -accuracy, energy, area, cycles."""
    columns = []
    for name in objectives:
        values = np.array([float(p[OBJECTIVE_FIELDS[name]]) for p in points], dtype=np.float64)
        columns.append(-values if name == "accuracy" else values)
    return np.stack(columns, axis=1) if points else np.empty((0, len(objectives)))


def non_dominated(points: list[dict], objectives: tuple[str, ...]) -> list[dict]:
    """The points no other point dominates (one of several equal points: the first)."""
    if not points:
        return []
    f = minimized(points, objectives)
    _, first = np.unique(f, axis=0, return_index=True)
    distinct = sorted(first)
    front = NonDominatedSorting().do(f[distinct], only_non_dominated_front=True)
    return [points[distinct[i]] for i in sorted(front)]


def hypervolume(points: list[dict], objectives: tuple[str, ...], reference: dict[str, float]) -> float:
    """Hypervolume of the points against `reference` (per objective: the worst value that
    still counts, e.g. accuracy 0), each objective divided by its reference so that joules
    and square microns weigh alike. Points beyond the reference add nothing."""
    if not points:
        return 0.0
    f = minimized(points, objectives)
    ref = np.array([-reference[n] if n == "accuracy" else reference[n] for n in objectives], dtype=np.float64)
    scale = np.array([1.0 if n == "accuracy" else reference[n] for n in objectives], dtype=np.float64)
    return float(HV(ref_point=ref / scale)(f / scale))


def flat(point: dict) -> dict:
    """A front point as a CSV row: the per-layer widths as one column."""
    row = {k: v for k, v in point.items() if not isinstance(v, dict | list)}
    row["layer_wbits"] = " ".join(str(b) for b in point["layer_wbits"])
    return row


def write_front(out, points: list[dict], objectives: tuple[str, ...], extra: dict) -> list[dict]:
    front = sorted(non_dominated(points, objectives), key=lambda p: (-p["accuracy"], p["energy_uj"]))
    write_json(out / "front.json", {"objectives": list(objectives), **extra, "points": front})
    write_csv(out / "front.csv", [flat(p) for p in front] or [{"name": None}])
    return front
