"""`hwq eval`: accuracy of a checkpoint as float, Brevitas fake-quant and integer program."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from accel_sim.ir import Accumulator, load_program, program_digest, save_program

from .. import HwqError, __version__
from ..data import load_split
from ..flags import (
    accumulator_fit,
    accumulator_override,
    add_accumulator_flags,
    add_data_flags,
    add_fit_flag,
    add_model_flags,
    output_file,
    positive_int,
    quant_config,
    torch_device,
)
from ..results import percent, write_json
from . import DEFAULT_BATCH

if TYPE_CHECKING:
    from .evaluate import ModeResult

MODES = ("float", "brevitas", "accel_sim")


def cmd_eval(args: argparse.Namespace) -> None:
    if bool(args.checkpoint) == bool(args.ir):
        raise HwqError("give exactly one of --checkpoint or --ir")
    torch_device(args.device)
    modes = MODES if args.mode == "all" else (args.mode,)
    if args.ir and modes != ("accel_sim",):
        if args.mode != "all":
            raise HwqError(f"--mode {args.mode} needs --checkpoint (an IR file only runs on accel_sim)")
        modes = ("accel_sim",)
    ds = load_split(args.data, args.split, args.val_fraction, args.split_seed).head(args.limit)
    if len(ds) == 0:
        raise HwqError(f"split {args.split} is empty")
    from .evaluate import evaluate_model, evaluate_program, layer_lsb_differences, prepare

    prepared = None
    if args.ir:
        if args.fit_accumulator is not None:
            raise HwqError("--fit-accumulator calibrates a --checkpoint; an IR file is already lowered")
        program = load_program(args.ir)
    else:
        target = None if args.acc_bits is None else accumulator_override(args, Accumulator())
        prepared = prepare(
            args.checkpoint,
            quant_config(args),
            args.data,
            args.calibration_images,
            args.val_fraction,
            args.split_seed,
            mult_bits=args.mult_bits,
            fit=accumulator_fit(args.fit_accumulator, target),
        )
        program = prepared.program
    program = program.with_accumulator(accumulator_override(args, program.accumulator))
    if args.save_ir:
        save_program(program, args.save_ir)
    results: dict[str, ModeResult] = {}
    if "float" in modes:
        results["float"] = evaluate_model(prepared.float_model, ds, args.batch_size, "float")
    if "brevitas" in modes:
        results["brevitas"] = evaluate_model(prepared.qmodel, ds, args.batch_size, "brevitas")
    if "accel_sim" in modes:
        results["accel_sim"] = evaluate_program(program, ds, args.batch_size, args.device)
    report = {
        "command": "eval",
        "hwq_version": __version__,
        "config": {
            "checkpoint": args.checkpoint,
            "ir": args.ir,
            "split": args.split,
            "n": len(ds),
            "val_fraction": args.val_fraction,
            "split_seed": args.split_seed,
            "accumulator": {"bits": program.accumulator.bits, "overflow": program.accumulator.overflow},
            "program": {
                k: program.meta.get(k)
                for k in ("model", "wbits", "abits", "per_channel", "first_wbits", "last_wbits")
            }
            | {"weight_range": program.meta.get("weight_range", "narrow")},
            "ir_sha256": program_digest(program),
        },
    }
    report.update({mode: r.to_json() for mode, r in results.items()})
    if "brevitas" in results and "accel_sim" in results:
        agree = float((results["brevitas"].predictions == results["accel_sim"].predictions).float().mean())
        lsb = layer_lsb_differences(prepared.qmodel, program, ds.images[: args.batch_size])
        report["agreement"] = {
            "top1_brevitas_vs_accel_sim": agree,
            "max_lsb_difference": lsb,
            "lsb_images": min(args.batch_size, len(ds)),
        }
    print_eval(report, results)
    if args.json:
        write_json(args.json, report)


def print_eval(report: dict, results: dict[str, ModeResult]) -> None:
    cfg = report["config"]
    prog = cfg["program"]
    per = "per-channel" if prog["per_channel"] else "per-tensor"
    print(
        f"{prog['model']} W{prog['wbits']}A{prog['abits']} ({per} weights), split {cfg['split']}, "
        f"{cfg['n']} images, accumulator {cfg['accumulator']['bits']}-bit {cfg['accumulator']['overflow']}"
    )
    for mode, r in results.items():
        print(f"  {mode:<10} {percent(r.accuracy)}  ({r.correct}/{r.n})")
    if "accel_sim" in results:
        layers = results["accel_sim"].layers.values()
        widest = max(layers, key=lambda s: s.worst_case_bits)
        total = sum(s.overflows for s in layers)
        print(
            f"  accumulator: worst case {widest.worst_case_bits} bits ({widest.name}); "
            f"overflowed outputs: {total}"
        )
        for s in layers:
            if s.overflows:
                print(f"    {s.name:<16} {s.overflows} of {s.outputs} outputs overflowed")
    if "agreement" in report:
        a = report["agreement"]
        print(f"  top-1 agreement brevitas vs accel_sim: {percent(a['top1_brevitas_vs_accel_sim'])}")
        print(f"  max |accel_sim - brevitas| in LSB ({a['lsb_images']} images; local = same inputs):")
        diffs = a["max_lsb_difference"]
        for name, local in diffs["local"].items():
            print(f"    {name:<16} local {local:>6g}   end-to-end {diffs['end_to_end'][name]:>6g}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy as float, Brevitas fake-quant and on accel_sim")
    p.add_argument("--ir", help="an IR file (from hwq train or --save-ir) instead of a checkpoint")
    add_model_flags(p)
    add_data_flags(p)
    add_accumulator_flags(p)
    add_fit_flag(p)
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device for accel_sim (cpu, cuda)")
    p.add_argument("--json", type=output_file, help="write the results to this JSON file")
    p.add_argument("--save-ir", type=output_file, help="write the lowered integer program to this file")
    p.set_defaults(func=cmd_eval)
