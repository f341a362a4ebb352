"""`hwq sim`: the timing model's cycles, utilization, DRAM traffic and energy of a program.

This command imports no torch when given an IR file: the timing model is closed-form and
runs in milliseconds, so the command starts and finishes in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses

from hwq import __version__
from hwq.flags import add_model_flags, output_file, positive_int, program_from_args
from hwq.results import percent, write_csv, write_json

from .hardware import load_accelerator
from .ir import Program, program_digest
from .timing import ProgramTiming, program_timing


def cmd_sim(args: argparse.Namespace) -> None:
    accelerator = load_accelerator(args.hw)
    program = program_from_args(args)
    timing = program_timing(program, accelerator, args.batch)
    print_sim(program, timing)
    layers = [layer.to_json() for layer in timing.layers]
    if args.json:
        write_json(
            args.json,
            {
                "command": "sim",
                "hwq_version": __version__,
                "hw": args.hw,
                "accelerator": dataclasses.asdict(accelerator),
                "ir": args.ir,
                "checkpoint": args.checkpoint,
                "ir_sha256": program_digest(program),
                "layers": layers,
                "total": timing.total_json(),
            },
        )
    if args.csv:
        write_csv(args.csv, layers)


SIM_COLUMNS = "  {:<16} {:>16} {:>6} {:>10} {:>9} {:>8} {:>9} {:>10}"


def sim_row(name: str, shape: str, tiles: object, row: dict) -> str:
    return SIM_COLUMNS.format(
        name,
        shape,
        tiles,
        f"{row['cycles']:,}",
        f"{row['stall_cycles']:,}",
        percent(row["utilization"]),
        f"{row['dram_bytes'] / 1e3:.1f}",
        f"{row['energy_pj'] / 1e6:.3f}",
    )


def print_sim(program: Program, timing: ProgramTiming) -> None:
    hw, acc = timing.accelerator, program.accumulator
    widths = f"W{hw.weight_bits}A{hw.act_bits}" if hw.weight_bits and hw.act_bits else "program widths"
    print(
        f"{hw.name}: {hw.rows}x{hw.cols} {hw.dataflow} array at {hw.clock_mhz:g} MHz, {widths}, "
        f"{hw.acc_bits}-bit {hw.overflow} accumulator, batch {timing.batch}"
    )
    if acc != hw.accumulator():
        print(
            f"  note: the program was lowered for a {acc.bits}-bit {acc.overflow} accumulator; "
            f"hwq eval --acc-bits {hw.acc_bits} --overflow {hw.overflow} gives its accuracy here"
        )
    print(SIM_COLUMNS.format("layer", "M x N x K", "tiles", "cycles", "stalls", "util", "DRAM kB", "uJ"))
    for layer in timing.layers:
        shape = f"{layer.gemm.m}x{layer.gemm.n}x{layer.gemm.k}" if layer.gemm else "-"
        print(sim_row(layer.name, shape, layer.mapping.tiles if layer.mapping else "-", layer.to_json()))
    total = timing.total_json()
    print(sim_row("total", "", "", total))
    print(
        f"latency {1e3 * timing.latency_s:.3f} ms, {timing.fps:,.0f} frames/s, "
        f"{total['energy_per_inference_pj'] / 1e6:.2f} uJ per inference"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="cycles, utilization, DRAM traffic and energy on an accelerator config")
    p.add_argument("--hw", required=True, help="accelerator description, a TOML file (examples/*.toml)")
    p.add_argument("--ir", help="an IR file (from hwq train or --save-ir) instead of a checkpoint")
    add_model_flags(p)
    p.add_argument("--data", help="CIFAR-10 directory for calibration with --checkpoint")
    p.add_argument(
        "--batch", type=positive_int, default=1, help="images per run; weights are fetched once per run"
    )
    p.add_argument("--json", type=output_file, help="write per-layer results and totals to this JSON file")
    p.add_argument("--csv", type=output_file, help="write the per-layer table to this CSV file")
    p.set_defaults(func=cmd_sim)
