"""`hwq verify`: run lowered layers on the Verilog MAC array and compare with accel_sim."""

from __future__ import annotations

import argparse
from pathlib import Path

from accel_sim.ir import load_program, program_digest
from hwq import HwqError, __version__
from hwq.data import load_split
from hwq.flags import accumulator_override, add_accumulator_flags, add_data_flags, output_file, positive_int
from hwq.results import write_json


def cmd_verify(args: argparse.Namespace) -> None:
    # Imported here: the RTL tools (cocotb, a simulator) are needed by this command only.
    try:
        from rtl_models.cosim import verify_program
    except ImportError as exc:
        raise HwqError(f"hwq verify --rtl needs {exc.name}: pip install -e '.[dev]'") from None
    if args.rtl is None:
        raise HwqError("say what to verify against: --rtl [icarus|verilator]")
    program = load_program(args.ir)
    program = program.with_accumulator(accumulator_override(args, program.accumulator))
    layers = [op.name for op in program.conv_ops()] if args.layer in (None, ["all"]) else args.layer
    ds = load_split(args.data, args.split, args.val_fraction, args.split_seed).head(args.limit or 1)
    reports = verify_program(
        program, ds.images, layers, args.rows, args.cols, args.rtl, Path(args.build_dir), args.pixels
    )
    print_verify(args, len(ds), reports)
    if args.json:
        write_json(
            args.json,
            {
                "command": "verify",
                "hwq_version": __version__,
                "ir": args.ir,
                "ir_sha256": program_digest(program),
                "images": len(ds),
                "layers": [r.to_json() for r in reports],
            },
        )
    if not all(r.match and r.cycles_match for r in reports):
        raise SystemExit(1)


def print_verify(args: argparse.Namespace, images: int, reports: list) -> None:
    print(
        f"{args.ir} on a {args.rows}x{args.cols} mac_tile ({args.rtl}), {images} image(s), "
        f"accumulator {reports[0].config.acc_bits}-bit {reports[0].config.overflow}"
    )
    print(
        f"  {'layer':<16} {'outputs':>10} {'K':>5} {'tiles':>6}  {'values':<8} "
        f"{'cycles/tile RTL':>15} {'formula':>8} {'total cycles':>13}"
    )
    for r in reports:
        rtl = ",".join(str(c) for c in r.rtl_tile_cycles)
        values = "match" if r.match else "MISMATCH"
        print(
            f"  {r.name:<16} {f'{r.m}x{r.n}':>10} {r.k:>5} {r.tiles:>6}  {values:<8} "
            f"{rtl:>15} {r.formula_tile_cycles:>8} {r.total_cycles:>13,}"
        )
    for r in reports:
        if r.mismatch:
            print(f"  {r.mismatch}")
    values = "match accel_sim bit for bit" if all(r.match for r in reports) else "DO NOT match accel_sim"
    cycles = "equal" if all(r.cycles_match for r in reports) else "DIFFER FROM"
    print(
        f"{len(reports)} layer(s): outputs {values}; cycles per tile {cycles} accel_sim's formula "
        f"(requantized outputs leave {reports[0].requant_latency} cycles after the array's)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="run lowered layers on the RTL and compare with accel_sim")
    p.add_argument(
        "--rtl",
        nargs="?",
        const="icarus",
        choices=("icarus", "verilator"),
        help="run on the Verilog MAC array with this simulator (default icarus)",
    )
    p.add_argument("--ir", required=True, help="the IR file whose layers run")
    p.add_argument("--layer", action="append", help="conv layer to run, repeatable (default or 'all': all)")
    p.add_argument(
        "--rows", type=positive_int, default=8, help="rows of the MAC array (output pixels per tile)"
    )
    p.add_argument(
        "--cols", type=positive_int, default=8, help="columns of the MAC array (output channels per tile)"
    )
    p.add_argument(
        "--pixels", type=positive_int, help="only the first N output pixels of each layer (a quick check)"
    )
    add_data_flags(p)
    add_accumulator_flags(p)
    p.add_argument("--build-dir", default="sim_build", help="where simulator builds are kept and reused")
    p.add_argument("--json", type=output_file, help="write the per-layer results to this JSON file")
    p.set_defaults(func=cmd_verify)
