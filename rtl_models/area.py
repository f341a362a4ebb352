"""Area of the MAC array against bit width: Yosys synthesis over a grid of configurations.

Each configuration is synthesized twice: with Yosys' generic `synth` (technology-free
gates, a proxy for ASIC area) and with `synth_ice40` (4-input LUTs, carries and flip-flops
of an iCE40 FPGA; multipliers go to LUTs, not DSPs, so that area follows the bit widths).
One CSV row per (configuration, flavour), written atomically, ready to plot.

    python -m rtl_models.area --out results/area.csv [--rows 4 --cols 4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hwq import HwqError
from hwq.results import write_csv

from .sim import SOURCES, ArrayConfig

FLAVOURS = {"generic": "synth -flatten -top {top}", "ice40": "synth_ice40 -top {top}"}
ARRAY_PARAMETERS = ("ROWS", "COLS", "WEIGHT_BITS", "ACT_BITS", "ACT_SIGNED", "ACC_BITS", "SATURATE")
TOPS = {
    "mac_array": ARRAY_PARAMETERS,
    "mac_tile": tuple(ArrayConfig().parameters()),
    "ws_mac_array": ARRAY_PARAMETERS,
    "ws_mac_tile": tuple(ArrayConfig().parameters()),
}
# Yosys' generic gates as 45 nm standard cells: the X1 cell areas of the NanGate FreePDK45
# Open Cell Library (um^2). ANDNOT/ORNOT map to a 2-input gate with an inverted input, the
# flip-flops with synchronous reset/enable to a DFF plus its reset AND and enable MUX.
# An estimate for comparing designs against each other, not a placed-and-routed area.
CELL_AREA_UM2 = {
    "$_NOT_": 0.532,
    "$_BUF_": 0.798,
    "$_NAND_": 0.798,
    "$_NOR_": 0.798,
    "$_AND_": 1.064,
    "$_OR_": 1.064,
    "$_ANDNOT_": 1.064,
    "$_ORNOT_": 1.064,
    "$_XOR_": 1.596,
    "$_XNOR_": 1.596,
    "$_MUX_": 1.862,
    "$_AOI3_": 1.064,
    "$_OAI3_": 1.064,
    "$_AOI4_": 1.330,
    "$_OAI4_": 1.330,
    "$_DFF_P_": 4.522,
    "$_SDFF_PP0_": 5.586,
    "$_SDFF_PP1_": 5.586,
    "$_DFFE_PP_": 6.384,
    "$_SDFFE_PP0P_": 7.448,
    "$_SDFFE_PP1P_": 7.448,
}
DEFAULT_WEIGHT_BITS = "2-8"
DEFAULT_ACT_BITS = "4-8"
DEFAULT_ACC_BITS = "16,24,32"


def int_list(text: str) -> list[int]:
    """'2-8' or '16,24,32' or '4' -> a list of ints."""
    try:
        values: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            values.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise HwqError(f"{text!r} is not a list of integers like 2-8 or 16,24,32") from None
    return values


def yosys_script(config: ArrayConfig, top: str, flavour: str, stat_file: Path) -> str:
    params = config.parameters()
    sets = " ".join(f"-set {name} {params[name]}" for name in TOPS[top])
    return "; ".join(
        [
            "read_verilog " + " ".join(str(s) for s in SOURCES),
            f"chparam {sets} {top}",
            FLAVOURS[flavour].format(top=top),
            f"tee -q -o {stat_file} stat -json",
        ]
    )


def count(cells: dict[str, int], *needles: str) -> int:
    return sum(n for cell, n in cells.items() if any(needle in cell for needle in needles))


def cell_area_um2(cells: dict[str, int]) -> float:
    """The 45 nm area of a generic-synthesis netlist (CELL_AREA_UM2); a cell type without
    an entry is an error rather than a silent zero."""
    unknown = sorted(set(cells) - set(CELL_AREA_UM2))
    if unknown:
        raise HwqError(f"no 45 nm area for Yosys cell {unknown[0]} (rtl_models.area.CELL_AREA_UM2)")
    return sum(CELL_AREA_UM2[cell] * n for cell, n in cells.items())


def synthesize(config: ArrayConfig, top: str, flavour: str) -> dict:
    """One Yosys run; the design's cell counts as a CSV row."""
    with tempfile.TemporaryDirectory(prefix="hwq-area-") as tmp:
        stat_file = Path(tmp) / "stat.json"
        start = time.perf_counter()
        done = subprocess.run(
            ["yosys", "-q", "-p", yosys_script(config, top, flavour, stat_file)],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0 or not stat_file.exists():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise HwqError(f"yosys {flavour} synthesis of {config.name} failed: {last[0]}")
        design = json.loads(stat_file.read_text())["design"]
    cells = design["num_cells_by_type"]
    fpga = flavour == "ice40"
    return {
        "flavour": flavour,
        "top": top,
        "rows": config.rows,
        "cols": config.cols,
        "weight_bits": config.weight_bits,
        "act_bits": config.act_bits,
        "acc_bits": config.acc_bits,
        "overflow": config.overflow,
        "cells": design["num_cells"],
        "flip_flops": count(cells, "DFF"),
        "luts": count(cells, "LUT") if fpga else None,
        "carries": count(cells, "CARRY") if fpga else None,
        "area_um2": None if fpga else round(cell_area_um2(cells), 3),
        "seconds": round(seconds, 1),
    }


def grid(
    rows: int, cols: int, weight_bits: list[int], act_bits: list[int], acc_bits: list[int], overflow: str
) -> list[ArrayConfig]:
    configs = [
        ArrayConfig(rows=rows, cols=cols, weight_bits=w, act_bits=a, acc_bits=acc, overflow=overflow)
        for w, a, acc in itertools.product(weight_bits, act_bits, acc_bits)
    ]
    for config in configs:
        config.validate()
    return configs


def area_table(configs: list[ArrayConfig], top: str, flavours: list[str], jobs: int) -> list[dict]:
    """Synthesize every (configuration, flavour), `jobs` Yosys processes at a time."""
    if shutil.which("yosys") is None:
        raise HwqError("Yosys is not installed (apt-get install yosys)")
    runs = list(itertools.product(configs, flavours))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda run: synthesize(run[0], top, run[1]), runs))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtl_models.area", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--weight-bits", default=DEFAULT_WEIGHT_BITS, help="e.g. 2-8 or 2,4,8")
    p.add_argument("--act-bits", default=DEFAULT_ACT_BITS)
    p.add_argument("--acc-bits", default=DEFAULT_ACC_BITS)
    p.add_argument("--overflow", choices=("wrap", "saturate"), default="wrap")
    p.add_argument(
        "--flavour",
        choices=tuple(FLAVOURS),
        action="append",
        help="generic, ice40 (repeatable; default both)",
    )
    p.add_argument(
        "--top",
        choices=tuple(TOPS),
        default="mac_array",
        help="mac_array (the output-stationary MAC array), mac_tile (with the requantization lanes), "
        "ws_mac_array / ws_mac_tile (the weight-stationary ones)",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Yosys runs in parallel")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs = grid(
            args.rows,
            args.cols,
            int_list(args.weight_bits),
            int_list(args.act_bits),
            int_list(args.acc_bits),
            args.overflow,
        )
        rows = area_table(configs, args.top, args.flavour or list(FLAVOURS), max(1, args.jobs))
    except HwqError as exc:
        print(f"rtl_models.area: error: {exc}", file=sys.stderr)
        return 2
    write_csv(args.out, rows)
    for row in rows:
        luts = f", {row['luts']} LUTs" if row["luts"] is not None else ""
        print(
            f"{row['flavour']:<8} W{row['weight_bits']} A{row['act_bits']} ACC{row['acc_bits']}: "
            f"{row['cells']} cells, {row['flip_flops']} FFs{luts}"
        )
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
