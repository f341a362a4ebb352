"""Cycle table: the cycles the RTL takes per tile against accel_sim's per-tile formula.

For each array shape and reduction length K, one tile of random operands runs on the RTL
(its outputs are checked against accel_sim as well); the cycles from the edge that takes
the first operands to the edge after which the last accumulator has left the array are
compared with accel_sim.timing.tile_compute_cycles. The requantization lanes add a fixed
latency after that, reported separately.

    python -m rtl_models.cycles [--simulator icarus] [--out results/cycles.csv]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from accel_sim.ir import Accumulator, Requant, TensorSpec
from accel_sim.timing import tile_compute_cycles
from hwq import HwqError
from hwq.results import write_csv

from .cosim import Gemm, first_mismatch, gemm_case, run_gemm
from .sim import DEFAULT_BUILD_ROOT, SIMULATORS

DEFAULT_ARRAYS = ((4, 4), (8, 8), (3, 5), (5, 3))
DEFAULT_KS = (1, 2, 9, 27, 144)
WEIGHT_BITS = 4
ACT = TensorSpec("x", (1, 1, 1), bits=8, signed=False)
OUT = TensorSpec("y", (1, 1, 1), bits=8, signed=False)


def random_tile(rows: int, cols: int, k: int, seed: int = 0) -> Gemm:
    """One full rows x cols tile of W4A8 operands, requantized to 8 bits."""
    rng = np.random.default_rng(seed)
    acts = rng.integers(ACT.qmin, ACT.qmax + 1, (rows, k))
    weights = rng.integers(-(1 << (WEIGHT_BITS - 1)), 1 << (WEIGHT_BITS - 1), (cols, k))
    requant = Requant(
        mult=rng.integers(1, 1 << 12, cols),
        shift=np.full(cols, 12, dtype=np.int64),
        offset=np.zeros(cols, dtype=np.int64),
    )
    return gemm_case(
        acts, weights, ACT, WEIGHT_BITS, np.zeros(cols, dtype=np.int64), requant, OUT, Accumulator(32, "wrap")
    )


def measure(rows: int, cols: int, k: int, simulator: str, build_root: Path = DEFAULT_BUILD_ROOT) -> dict:
    """One row of the table; raises HwqError if the tile's values do not match accel_sim."""
    gemm = random_tile(rows, cols, k)
    result = run_gemm(gemm, rows, cols, simulator, build_root)
    mismatch = first_mismatch(gemm, result, gemm.config(rows, cols))
    if mismatch:
        raise HwqError(mismatch)
    rtl, formula = result.acc_cycles[0], tile_compute_cycles(rows, cols, k)
    return {
        "simulator": simulator,
        "rows": rows,
        "cols": cols,
        "k": k,
        "rtl_cycles": rtl,
        "formula_cycles": formula,
        "equal": rtl == formula,
        "requant_latency": result.y_cycles[0] - rtl,
    }


def cycle_table(
    arrays: list[tuple[int, int]], ks: list[int], simulator: str, build_root: Path = DEFAULT_BUILD_ROOT
) -> list[dict]:
    shapes = itertools.product(arrays, ks)
    return [measure(rows, cols, k, simulator, build_root) for (rows, cols), k in shapes]


def array_shape(text: str) -> tuple[int, int]:
    rows, _, cols = text.partition("x")
    try:
        return int(rows), int(cols)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an array shape like 8x8") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtl_models.cycles", description=__doc__.split("\n\n")[0])
    p.add_argument("--simulator", choices=SIMULATORS, default="icarus")
    p.add_argument("--array", type=array_shape, action="append", help="ROWSxCOLS, repeatable")
    p.add_argument("--k", type=int, action="append", help="reduction length, repeatable")
    p.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_ROOT)
    p.add_argument("--out", help="also write the table to this CSV file")
    args = p.parse_args(argv)
    try:
        rows = cycle_table(
            args.array or list(DEFAULT_ARRAYS), args.k or list(DEFAULT_KS), args.simulator, args.build_dir
        )
    except HwqError as exc:
        print(f"rtl_models.cycles: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'array':>7} {'K':>5} {'RTL':>6} {'formula':>8}  equal  requant latency ({args.simulator})")
    for r in rows:
        print(
            f"{r['rows']:>3}x{r['cols']:<3} {r['k']:>5} {r['rtl_cycles']:>6} {r['formula_cycles']:>8}  "
            f"{'yes' if r['equal'] else 'NO':<5}  +{r['requant_latency']}"
        )
    if args.out:
        write_csv(args.out, rows)
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
