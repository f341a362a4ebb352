"""`hwq verify`: run lowered layers on the Verilog MAC array and compare with accel_sim."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from accel_sim.ir import load_program, program_digest
from hwq import HwqError, __version__
from hwq.data import load_split
from hwq.flags import (
    accumulator_override,
    add_accumulator_flags,
    add_data_flags,
    nonnegative_int,
    output_file,
    positive_int,
)
from hwq.results import write_json


def cmd_verify(args: argparse.Namespace) -> None:
    # Imported here: the RTL tools (cocotb, a simulator) are needed by this command only.
    try:
        from rtl_models.cosim import verify_program
    except ImportError as exc:
        raise HwqError(f"hwq verify --rtl needs {exc.name}: pip install -e '.[dev]'") from None
    if args.whole_network:
        args.rtl = args.rtl or "verilator"
        check_whole_network_flags(args)
    elif args.rtl is None:
        raise HwqError("say what to verify against: --rtl [icarus|verilator] (or --whole-network)")
    program = load_program(args.ir)
    program = program.with_accumulator(accumulator_override(args, program.accumulator))
    ds = load_split(args.data, args.split, args.val_fraction, args.split_seed)
    if args.whole_network:
        verify_whole_network(args, program, ds)
        return
    layers = [op.name for op in program.conv_ops()] if args.layer in (None, ["all"]) else args.layer
    ds = ds.head(args.limit or 1)
    reports = verify_program(
        program,
        ds.images,
        layers,
        args.rows,
        args.cols,
        args.rtl,
        Path(args.build_dir),
        args.pixels,
        args.dataflow,
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


def check_whole_network_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--layer", args.layer), ("--pixels", args.pixels), ("--limit", args.limit)):
        if value is not None:
            raise HwqError(f"--whole-network runs every layer of one image (--image N): drop {flag}")


def verify_whole_network(args: argparse.Namespace, program, ds) -> None:
    from rtl_models.network import run_network

    if args.image >= len(ds):
        raise HwqError(f"--image {args.image} is past the end of the {args.split} split ({len(ds)} images)")
    image = ds.images[args.image : args.image + 1]
    spec = program.tensors[program.input]
    if tuple(image.shape[1:]) != spec.shape:
        raise HwqError(f"the images are {tuple(image.shape[1:])}, the program's input is {spec.shape}")
    start = time.perf_counter()
    run = run_network(program, image, args.rows, args.cols, args.dataflow, args.rtl, Path(args.build_dir))
    wall = time.perf_counter() - start
    print_network(args, program, run, int(ds.labels[args.image]), wall)
    if args.json:
        write_json(
            args.json,
            {
                "command": "verify --whole-network",
                "hwq_version": __version__,
                "ir": args.ir,
                "ir_sha256": program_digest(program),
                "split": args.split,
                "image": args.image,
                "rows": args.rows,
                "cols": args.cols,
                "dataflow": args.dataflow,
                "simulator": args.rtl,
                "match": run.match,
                "cycles_match": run.cycles_match,
                "rtl_logits": None if run.rtl_logits is None else run.rtl_logits[0].tolist(),
                "accel_sim_logits": run.sim_logits[0].tolist(),
                "rtl_cycles": run.rtl_cycles,
                "model_cycles": run.model_cycles,
                "wall_s": round(wall, 1),
                "layers": [layer.to_json() for layer in run.layers],
                "not_run": run.skipped,
            },
        )
    if not (run.match and run.cycles_match):
        raise SystemExit(1)


def print_network(args: argparse.Namespace, program, run, label: int, wall: float) -> None:
    acc = program.accumulator
    print(
        f"{args.ir}, {args.split} image {args.image} (label {label}), whole network on a {args.rows}x"
        f"{args.cols} {args.dataflow} array ({args.rtl}), accumulator {acc.bits}-bit {acc.overflow}"
    )
    header = ("layer", "on", "output", "values", "tiles", "RTL cycles", "hwq sim")
    print("  {:<16} {:<8} {:<14} {:<8} {:>6} {:>11} {:>9}".format(*header))
    for layer in run.layers:
        on_rtl = layer.engine == "rtl"
        print(
            "  {:<16} {:<8} {:<14} {:<8} {:>6} {:>11} {:>9}".format(
                layer.name,
                layer.engine,
                "x".join(str(d) for d in layer.shape[1:]),
                "match" if layer.match else "MISMATCH",
                layer.tiles if on_rtl else "",
                f"{layer.rtl_cycles:,}" if on_rtl else "-",
                f"{layer.model_cycles:,}" if on_rtl else "-",
            )
        )
    for layer in run.layers:
        if layer.mismatch:
            print(f"  {layer.mismatch}")
    if run.skipped:
        print(f"  not run (their inputs would differ): {', '.join(run.skipped)}")
    else:
        same = "equal" if np.array_equal(run.rtl_logits, run.sim_logits) else "DIFFER FROM"
        print(
            f"integer logits {same} accel_sim's: RTL {run.rtl_logits[0].tolist()} "
            f"(class {int(run.rtl_logits[0].argmax())})"
        )
    cycles = "equal" if run.cycles_match else "DIFFER FROM"
    latency = max(layer.requant_latency for layer in run.layers)
    print(
        f"array cycles {run.rtl_cycles:,} {cycles} hwq sim's compute cycles {run.model_cycles:,} "
        f"(not counted in either: memory stalls; +{latency} per layer for the requantization drain); "
        f"wall time {wall:.1f} s"
    )


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
    p.add_argument(
        "--simulator", dest="rtl", choices=("icarus", "verilator"), help="the same as --rtl SIMULATOR"
    )
    p.add_argument("--ir", required=True, help="the IR file whose layers run")
    p.add_argument(
        "--whole-network",
        action="store_true",
        help="run every layer of one image (--image), each fed the RTL's own outputs "
        "(default simulator: verilator)",
    )
    p.add_argument(
        "--image", type=nonnegative_int, default=0, help="with --whole-network: which image of the split"
    )
    p.add_argument(
        "--dataflow", choices=("os", "ws"), default="os", help="output- or weight-stationary array"
    )
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
